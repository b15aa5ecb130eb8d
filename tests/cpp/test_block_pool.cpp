#include <catch2/catch.hpp>

#include <set>

#include "pagedkv/block_pool.h"

using namespace pagedkv;

TEST_CASE("pool grows lazily in chunks and reuses freed blocks") {
  BlockPool pool(100, 4);
  CHECK(pool.capacity() == 0);
  CHECK(pool.num_chunks() == 0);
  auto a = pool.allocate(3);
  CHECK(pool.capacity() == 4);
  CHECK(pool.num_chunks() == 1);
  CHECK(a == std::vector<int32_t>{0, 1, 2});
  auto b = pool.allocate(2);  // needs a second chunk
  CHECK(pool.num_chunks() == 2);
  CHECK(pool.num_used() == 5);
  pool.decref(a[1]);
  CHECK(pool.allocate_one() == a[1]);
  pool.check_invariants();
}

TEST_CASE("refcounts: shared blocks return to the free list at zero; double free throws") {
  BlockPool pool(8, 2);
  const int32_t b = pool.allocate_one();
  pool.incref(b);
  CHECK(pool.refcount(b) == 2);
  pool.decref(b);
  CHECK(pool.num_free() == 1);
  pool.decref(b);
  CHECK(pool.num_free() == 2);
  CHECK_THROWS_WITH(pool.decref(b), Catch::Contains("double free"));
  CHECK_THROWS_WITH(pool.incref(b), Catch::Contains("incref of free block"));
  CHECK_THROWS(pool.decref(99));
  pool.check_invariants();
}

TEST_CASE("block budget: all-or-nothing, short last chunk, ids stay chunk-aligned") {
  BlockPool pool(10, 4, /*max_blocks=*/6);
  auto a = pool.allocate(5);
  CHECK(pool.capacity() == 6);  // second chunk cut to 2 blocks by the budget
  CHECK(pool.chunk_blocks(1) == 2);
  CHECK_THROWS_AS(pool.allocate(2), BudgetError);
  CHECK(pool.num_used() == 5);  // unchanged by the failed call
  pool.check_invariants();
  pool.set_max_blocks(12);
  auto c = pool.allocate(3);
  for (int32_t id : c) CHECK(id >= 4);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(c.begin(), c.end());
  CHECK(all.size() == 8);
  for (int32_t id : all) CHECK(!(id >= 6 && id < 8));  // holes of the short chunk never appear
  CHECK(pool.id_space() == 12);
  pool.check_invariants();
  CHECK_THROWS(pool.set_max_blocks(3));
}

TEST_CASE("byte budget shared by two pools") {
  auto budget = std::make_shared<MemoryBudget>(1000);
  BlockPool p1(100, 4, -1, budget);
  BlockPool p2(50, 4, -1, budget);
  p1.allocate(5);  // 8 blocks = 800 bytes
  CHECK(budget->reserved_bytes() == 800);
  p2.allocate(4);  // 200 bytes
  CHECK(budget->reserved_bytes() == 1000);
  CHECK_THROWS_AS(p2.allocate(1), BudgetError);
  CHECK_THROWS_AS(p1.allocate(4), BudgetError);
  CHECK(p1.can_allocate(3));
  CHECK(!p1.can_allocate(4));
}
