#include <catch2/catch.hpp>

#include "pagedkv/block_tables.h"

using namespace pagedkv;

TEST_CASE("append assigns slots block by block") {
  auto pool = std::make_shared<BlockPool>(64, 8);
  BlockTables t(pool, 16);
  const int64_t s = t.add_sequence();
  AppendPlan p = t.append({s}, 20);
  REQUIRE(p.slots.size() == 20);
  const auto& blocks = t.blocks(s);
  REQUIRE(blocks.size() == 2);
  CHECK(p.slots[0] == blocks[0] * 16);
  CHECK(p.slots[17] == blocks[1] * 16 + 1);
  CHECK(t.num_tokens(s) == 20);
  CHECK(p.copies.empty());
}

TEST_CASE("fork shares blocks; writing a shared tail copies it first") {
  auto pool = std::make_shared<BlockPool>(64, 8);
  BlockTables t(pool, 16);
  const int64_t a = t.add_sequence();
  t.append({a}, 20);
  const int64_t b = t.fork(a);
  CHECK(pool->refcount(t.blocks(a)[0]) == 2);
  CHECK(pool->refcount(t.blocks(a)[1]) == 2);
  CHECK(t.blocks_needed({a, b}, 1) == 1);  // one copy serves both: the second writer owns the original
  AppendPlan p = t.append({a, b}, 1);
  REQUIRE(p.copies.size() == 1);
  CHECK(t.blocks(a)[1] != t.blocks(b)[1]);
  CHECK(t.blocks(a)[0] == t.blocks(b)[0]);
  CHECK(pool->refcount(t.blocks(a)[1]) == 1);
  CHECK(pool->refcount(t.blocks(b)[1]) == 1);
  t.free_sequence(a);
  t.free_sequence(b);
  CHECK(pool->num_used() == 0);
  pool->check_invariants();
}

TEST_CASE("full shared tail needs no copy") {
  auto pool = std::make_shared<BlockPool>(64, 8);
  BlockTables t(pool, 16);
  const int64_t a = t.add_sequence();
  t.append({a}, 32);
  const int64_t b = t.fork(a);
  AppendPlan p = t.append({b}, 1);
  CHECK(p.copies.empty());
  CHECK(t.blocks(b).size() == 3);
}

TEST_CASE("truncate frees blocks past the end; drop_front frees leading blocks") {
  auto pool = std::make_shared<BlockPool>(64, 8);
  BlockTables t(pool, 16);
  const int64_t s = t.add_sequence();
  t.append({s}, 50);
  CHECK(pool->num_used() == 4);
  t.truncate(s, 17);
  CHECK(pool->num_used() == 2);
  CHECK(t.num_tokens(s) == 17);
  CHECK_THROWS_WITH(t.truncate(s, 18), Catch::Contains("cannot truncate"));
  t.append({s}, 40);  // 57 tokens, 4 blocks
  t.drop_front(s, 35);
  CHECK(t.dropped_blocks(s) == 2);
  CHECK(t.blocks(s).size() == 2);
  CHECK(pool->num_used() == 2);
  AppendPlan p = t.append({s}, 8);  // positions 57..64 -> 5th block at position 64
  CHECK(p.slots.back() == t.blocks(s).back() * 16);
  CHECK_THROWS(t.drop_front(s, 10));
  pool->check_invariants();
}

TEST_CASE("skip_to frees every block and continues past positions never stored") {
  auto pool = std::make_shared<BlockPool>(64, 8);
  BlockTables t(pool, 16);
  const int64_t s = t.add_sequence();
  t.append({s}, 20);
  const int64_t f = t.fork(s);  // shares both blocks: skipping one sequence keeps the other's
  CHECK_THROWS_WITH(t.skip_to(s, 40), Catch::Contains("multiple of the block size 16"));
  CHECK_THROWS_WITH(t.skip_to(s, 16), Catch::Contains("at or past the stored end 20"));
  t.skip_to(s, 48);
  CHECK(t.num_tokens(s) == 48);
  CHECK(t.start(s) == 48);
  CHECK(t.dropped_blocks(s) == 3);
  CHECK(t.blocks(s).empty());
  CHECK(pool->num_used() == 2);  // the fork's
  AppendPlan p = t.append({s}, 20);  // positions 48..67: two new blocks
  CHECK(t.blocks(s).size() == 2);
  CHECK(p.slots.front() == t.blocks(s).front() * 16);
  CHECK(p.slots.back() == t.blocks(s).back() * 16 + 3);
  t.truncate(s, 48);
  CHECK(t.blocks(s).empty());
  t.free_sequence(f);
  CHECK(pool->num_used() == 0);
  pool->check_invariants();
}

TEST_CASE("append is all-or-nothing under a budget") {
  auto pool = std::make_shared<BlockPool>(64, 2, /*max_blocks=*/3);
  BlockTables t(pool, 16);
  const int64_t a = t.add_sequence();
  const int64_t b = t.add_sequence();
  t.append({a, b}, 16);
  CHECK_THROWS_AS(t.append({a, b}, 1), BudgetError);
  CHECK(t.num_tokens(a) == 16);
  CHECK(t.num_tokens(b) == 16);
  CHECK(pool->num_used() == 2);
  CHECK_THROWS_WITH(t.append({a, a}, 1), Catch::Contains("appears twice"));
  CHECK_THROWS_WITH(t.append({a, 77}, 1), Catch::Contains("unknown sequence id 77"));
  CHECK(t.num_tokens(a) == 16);
  pool->check_invariants();
}
