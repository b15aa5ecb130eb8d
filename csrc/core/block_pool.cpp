#include "pagedkv/block_pool.h"

#include <algorithm>

namespace pagedkv {

void MemoryBudget::set_limit_bytes(int64_t limit) {
  PKV_CHECK(limit < 0 || limit >= reserved_bytes_, "max_memory_bytes=", limit,
            " is below the bytes already reserved (", reserved_bytes_, ")");
  limit_bytes_ = limit;
}

void MemoryBudget::reserve(int64_t bytes) {
  PKV_CHECK(bytes >= 0, "bytes must be >= 0, got ", bytes);
  if (limit_bytes_ >= 0 && reserved_bytes_ + bytes > limit_bytes_) {
    throw BudgetError(detail::concat("KV memory budget exhausted: need ", bytes,
                                     " more bytes, ", reserved_bytes_, " of max_memory_bytes=",
                                     limit_bytes_, " already reserved"));
  }
  reserved_bytes_ += bytes;
}

void MemoryBudget::release(int64_t bytes) {
  PKV_CHECK(bytes >= 0 && bytes <= reserved_bytes_, "cannot release ", bytes, " bytes of ",
            reserved_bytes_);
  reserved_bytes_ -= bytes;
}

BlockPool::BlockPool(int64_t bytes_per_block, int32_t blocks_per_chunk, int64_t max_blocks,
                     std::shared_ptr<MemoryBudget> budget)
    : bytes_per_block_(bytes_per_block),
      blocks_per_chunk_(blocks_per_chunk),
      max_blocks_(max_blocks),
      budget_(std::move(budget)) {
  PKV_CHECK(bytes_per_block > 0, "bytes_per_block must be positive, got ", bytes_per_block);
  PKV_CHECK(blocks_per_chunk > 0, "blocks_per_chunk must be positive, got ", blocks_per_chunk);
  PKV_CHECK(max_blocks >= -1, "max_blocks must be >= 0 or -1 (unlimited), got ", max_blocks);
}

BlockPool::~BlockPool() {
  if (budget_) budget_->release(reserved_bytes());
}

int32_t BlockPool::chunk_blocks(int64_t i) const {
  PKV_CHECK(i >= 0 && i < num_chunks(), "chunk index ", i, " out of range [0, ", num_chunks(), ")");
  return chunk_sizes_[i];
}

void BlockPool::set_max_blocks(int64_t max_blocks) {
  PKV_CHECK(max_blocks == -1 || max_blocks >= capacity_, "max_blocks=", max_blocks,
            " is below the pool's current capacity (", capacity_, " blocks)");
  max_blocks_ = max_blocks;
}

int64_t BlockPool::growth_limit() const {
  int64_t limit = INT32_MAX - capacity_;
  if (max_blocks_ >= 0) limit = std::min(limit, max_blocks_ - capacity_);
  if (budget_ && budget_->available_bytes() >= 0) {
    limit = std::min(limit, budget_->available_bytes() / bytes_per_block_);
  }
  return std::max<int64_t>(limit, 0);
}

bool BlockPool::can_allocate(int64_t n) const {
  const int64_t direct = num_free() + growth_limit();
  return n <= direct || (reclaimer_ != nullptr && n <= direct + reclaimer_->reclaimable());
}

void BlockPool::grow(int64_t min_blocks) {
  // Whole chunks, so chunk tensors stay few; a budget may cut the last one short. Chunk k always
  // holds ids [k * blocks_per_chunk, k * blocks_per_chunk + chunk_blocks(k)), so a kernel finds a
  // block's chunk by one division; ids past a short chunk's end simply never exist.
  const int64_t want = (min_blocks + blocks_per_chunk_ - 1) / blocks_per_chunk_ * blocks_per_chunk_;
  const int64_t add_total = std::min(want, growth_limit());
  PKV_CHECK(add_total >= min_blocks, "internal: grow called beyond the budget");
  if (budget_) budget_->reserve(add_total * bytes_per_block_);
  int64_t left = add_total;
  while (left > 0) {
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(left, blocks_per_chunk_));
    const int64_t first = num_chunks() * blocks_per_chunk_;
    chunk_sizes_.push_back(n);
    refcounts_.resize(first + blocks_per_chunk_, kAbsent);
    for (int64_t b = first + n - 1; b >= first; --b) {  // reversed: lowest id handed out first
      refcounts_[b] = 0;
      free_.push_back(static_cast<int32_t>(b));
    }
    left -= n;
  }
  capacity_ += add_total;
}

std::vector<int32_t> BlockPool::allocate(int64_t n) {
  PKV_CHECK(n >= 0, "number of blocks must be >= 0, got ", n);
  if (!can_allocate(n)) {
    throw BudgetError(detail::concat(
        "KV cache budget exhausted: need ", n, " blocks, ", num_free(),
        " free, room to grow by ", growth_limit(), " and ", reclaimer_ ? reclaimer_->reclaimable() : 0,
        " evictable cached blocks (capacity ", capacity_, " blocks, max_blocks=", max_blocks_,
        ", max_memory_bytes=", budget_ ? budget_->limit_bytes() : -1, ", ", bytes_per_block_,
        " bytes per block)"));
  }
  // Grow first: cached blocks are kept until space is really needed.
  const int64_t short_by = n - num_free() - growth_limit();
  if (short_by > 0) {
    const int64_t got = reclaimer_->reclaim(short_by);
    PKV_CHECK(got >= short_by, "internal: reclaimer freed ", got, " of ", short_by, " blocks it promised");
  }
  if (n > num_free()) grow(n - num_free());
  std::vector<int32_t> out(n);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = free_.back();
    free_.pop_back();
    refcounts_[out[i]] = 1;
  }
  return out;
}

void BlockPool::check_id(int32_t block) const {
  PKV_CHECK(block >= 0 && block < static_cast<int64_t>(refcounts_.size()) && refcounts_[block] != kAbsent,
            "block id ", block, " does not exist in this pool (", capacity_, " blocks in ",
            num_chunks(), " chunks of ", blocks_per_chunk_, ")");
}

void BlockPool::incref(int32_t block) {
  check_id(block);
  PKV_CHECK(refcounts_[block] > 0, "incref of free block ", block);
  ++refcounts_[block];
}

void BlockPool::decref(int32_t block) {
  check_id(block);
  PKV_CHECK(refcounts_[block] > 0, "double free of block ", block);
  if (--refcounts_[block] == 0) free_.push_back(block);
}

int32_t BlockPool::refcount(int32_t block) const {
  check_id(block);
  return refcounts_[block];
}

void BlockPool::check_invariants() const {
  const int64_t id_space = static_cast<int64_t>(refcounts_.size());
  PKV_CHECK(id_space == num_chunks() * blocks_per_chunk_, "id space ", id_space, " != chunks x blocks_per_chunk");
  std::vector<char> on_free(id_space, 0);
  for (int32_t b : free_) {
    PKV_CHECK(b >= 0 && b < id_space && refcounts_[b] != kAbsent, "free list holds a nonexistent block ", b);
    PKV_CHECK(!on_free[b], "block ", b, " is on the free list twice");
    PKV_CHECK(refcounts_[b] == 0, "block ", b, " is free but has refcount ", refcounts_[b]);
    on_free[b] = 1;
  }
  int64_t existing = 0;
  for (int64_t b = 0; b < id_space; ++b) {
    if (refcounts_[b] == kAbsent) continue;
    ++existing;
    PKV_CHECK(refcounts_[b] >= 0, "block ", b, " has negative refcount ", refcounts_[b]);
    PKV_CHECK(on_free[b] || refcounts_[b] > 0, "block ", b, " is neither free nor referenced");
  }
  int64_t chunk_total = 0;
  for (int32_t c : chunk_sizes_) chunk_total += c;
  PKV_CHECK(chunk_total == capacity_ && existing == capacity_, "chunks hold ", chunk_total,
            " blocks, ", existing, " exist, capacity is ", capacity_);
}

}  // namespace pagedkv
