// pagedkv/block_tables.h: per-sequence block tables over one BlockPool (torch-free).
//
// A sequence stores token positions [start, num_tokens) in blocks; position p lives in block
// blocks[p / block_size - dropped_blocks] at offset p % block_size. Its slot id (what append kernels
// take) is block_id * block_size + offset. Blocks are shared between sequences by reference count
// (fork, beam reorder, later prefix caching); writing into a shared block copies it first.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "pagedkv/block_pool.h"

namespace pagedkv {

struct AppendPlan {
  std::vector<int64_t> slots;                      // [num_seqs * n], row-major (sequence, token)
  std::vector<std::pair<int32_t, int32_t>> copies;  // copy-on-write (src block, dst block)
};

class BlockTables {
 public:
  BlockTables(std::shared_ptr<BlockPool> pool, int32_t block_size);
  ~BlockTables();
  BlockTables(const BlockTables&) = delete;
  BlockTables& operator=(const BlockTables&) = delete;

  int64_t add_sequence();
  void free_sequence(int64_t seq);
  // A new sequence sharing every block of `seq` (one more reference each).
  int64_t fork(int64_t seq);
  // A new sequence holding positions [0, num_tokens) in the given blocks (a cached prefix; one more
  // reference each). num_tokens must fill exactly blocks.size() blocks' worth of positions.
  int64_t add_sequence_with_blocks(const std::vector<int32_t>& blocks, int64_t num_tokens);
  bool has_sequence(int64_t seq) const { return seqs_.count(seq) != 0; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  int64_t num_tokens(int64_t seq) const;
  int64_t start(int64_t seq) const;  // first position still stored (after drop_front)
  const std::vector<int32_t>& blocks(int64_t seq) const;
  int64_t dropped_blocks(int64_t seq) const;

  // Reserve positions [num_tokens, num_tokens + n) of every sequence in `seqs`. Allocates blocks
  // and copies shared tail blocks first. All-or-nothing: on BudgetError nothing changed.
  AppendPlan append(const std::vector<int64_t>& seqs, int64_t n);
  // Blocks append(seqs, n) would take from the pool, copy-on-write included.
  int64_t blocks_needed(const std::vector<int64_t>& seqs, int64_t n) const;
  // Keep positions up to new_len (>= the first kept block's start); frees blocks past the new end.
  void truncate(int64_t seq, int64_t new_len);
  // Forget positions before new_start; frees the whole blocks that lie entirely before it.
  void drop_front(int64_t seq, int64_t new_start);
  // Forget every position before new_start, a block boundary at or past num_tokens: frees every
  // kept block, and the sequence goes on at new_start (the positions in between are never stored;
  // a sliding window that a long append overtakes).
  void skip_to(int64_t seq, int64_t new_start);

  // Dense block table of the kept blocks, -1 padded: out [seqs.size(), max_blocks].
  void fill_block_table(const std::vector<int64_t>& seqs, int32_t* out, int64_t max_blocks) const;
  int64_t max_kept_blocks(const std::vector<int64_t>& seqs) const;

  int32_t block_size() const { return block_size_; }
  BlockPool& pool() { return *pool_; }
  const BlockPool& pool() const { return *pool_; }

 private:
  struct Seq {
    std::vector<int32_t> blocks;  // kept blocks, in position order
    int64_t num_tokens = 0;
    int64_t start = 0;
    int64_t dropped_blocks = 0;
  };
  Seq& get(int64_t seq);
  const Seq& get(int64_t seq) const;

  std::shared_ptr<BlockPool> pool_;
  int32_t block_size_;
  int64_t next_id_ = 0;
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace pagedkv
