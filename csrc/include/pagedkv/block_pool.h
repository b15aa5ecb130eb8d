// pagedkv/block_pool.h: block ids, reference counts, lazy chunked growth and budgets (torch-free).
//
// The pool owns no memory. It decides how many blocks exist (its capacity, grown in chunks) and who
// holds them. The owner of the page tensors (python/pagedkv/storage.py) allocates one tensor per
// chunk per layer whenever num_chunks() grows, so growing never copies existing pages and never
// needs twice the memory. Capacity only grows when a block is needed and none is free.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pagedkv/common.h"

namespace pagedkv {

// A byte budget shared by several pools (one per attention group of a cache).
class MemoryBudget {
 public:
  explicit MemoryBudget(int64_t limit_bytes = -1) : limit_bytes_(limit_bytes) {}
  int64_t limit_bytes() const { return limit_bytes_; }
  int64_t reserved_bytes() const { return reserved_bytes_; }
  // Bytes still reservable; -1 when unlimited.
  int64_t available_bytes() const {
    return limit_bytes_ < 0 ? -1 : limit_bytes_ - reserved_bytes_;
  }
  void set_limit_bytes(int64_t limit);  // may not go below what is reserved
  void reserve(int64_t bytes);          // throws BudgetError
  void release(int64_t bytes);

 private:
  int64_t limit_bytes_;
  int64_t reserved_bytes_ = 0;
};

// Something that can free unreferenced blocks on demand (the prefix cache's eviction). The pool
// asks it only when it cannot grow within its budgets.
class BlockReclaimer {
 public:
  virtual ~BlockReclaimer() = default;
  // Blocks reclaim() could free right now.
  virtual int64_t reclaimable() const = 0;
  // Frees up to n blocks back to the pool; returns how many it freed.
  virtual int64_t reclaim(int64_t n) = 0;
};

class BlockPool {
 public:
  // bytes_per_block: bytes of one block summed over every layer that uses this pool (K and V).
  // max_blocks: block budget, -1 for none. budget: shared byte budget, may be null.
  BlockPool(int64_t bytes_per_block, int32_t blocks_per_chunk, int64_t max_blocks = -1,
            std::shared_ptr<MemoryBudget> budget = nullptr);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // All-or-nothing: returns `n` blocks with refcount 1, growing capacity if needed and then
  // evicting through the reclaimer, or throws BudgetError and changes nothing (evicts nothing).
  std::vector<int32_t> allocate(int64_t n);
  int32_t allocate_one() { return allocate(1)[0]; }
  // Whether allocate(n) would succeed right now (eviction included).
  bool can_allocate(int64_t n) const;
  // One reclaimer at a time; it must outlive its registration (set nullptr to detach).
  void set_reclaimer(BlockReclaimer* r) { reclaimer_ = r; }
  BlockReclaimer* reclaimer() const { return reclaimer_; }

  void incref(int32_t block);
  // Drops one reference; the block returns to the free list at zero.
  void decref(int32_t block);
  int32_t refcount(int32_t block) const;

  int64_t capacity() const { return capacity_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used() const { return capacity_ - num_free(); }
  int32_t blocks_per_chunk() const { return blocks_per_chunk_; }
  // Ids are < id_space(); kernels bound-check block ids against it.
  int64_t id_space() const { return static_cast<int64_t>(refcounts_.size()); }
  int64_t num_chunks() const { return static_cast<int64_t>(chunk_sizes_.size()); }
  // Blocks in chunk i (the last chunk may be short when a budget cut it).
  int32_t chunk_blocks(int64_t i) const;
  int64_t bytes_per_block() const { return bytes_per_block_; }
  int64_t reserved_bytes() const { return capacity_ * bytes_per_block_; }
  int64_t max_blocks() const { return max_blocks_; }
  void set_max_blocks(int64_t max_blocks);

  // Invariant check for tests: every block is either free (refcount 0, on the free list once) or
  // referenced. Throws Error on a violation.
  void check_invariants() const;

 private:
  // Blocks the next growth step may add, honouring both budgets (0 if none).
  int64_t growth_limit() const;
  void check_id(int32_t block) const;
  static constexpr int32_t kAbsent = -1;  // refcount of an id past a short chunk's end
  void grow(int64_t min_blocks);

  int64_t bytes_per_block_;
  int32_t blocks_per_chunk_;
  int64_t max_blocks_;
  std::shared_ptr<MemoryBudget> budget_;
  int64_t capacity_ = 0;
  std::vector<int32_t> refcounts_;     // [num_chunks * blocks_per_chunk], kAbsent for holes
  std::vector<int32_t> free_;          // stack; lowest ids handed out first
  std::vector<int32_t> chunk_sizes_;   // [num_chunks]
  BlockReclaimer* reclaimer_ = nullptr;
};

}  // namespace pagedkv
