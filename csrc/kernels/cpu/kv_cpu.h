// Raw-pointer CPU kernels for append (quantize + scatter) and gather (dequantize). Torch-free.
// Each kernel is split into a validation pass, which throws before anything is written, and a
// range function over independent work items, which the torch layer runs under at::parallel_for.
#pragma once

#include <cstdint>

#include "pagedkv/page_codec.h"

namespace pagedkv {

enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct AppendParams {
  const void* src = nullptr;  // [num_tokens, num_kv_heads, head_dim], head_dim contiguous
  DType src_dtype = DType::kF32;
  int64_t num_tokens = 0;
  int64_t token_stride = 0;  // elements
  int64_t head_stride = 0;   // elements
  const int64_t* slot_mapping = nullptr;  // [num_tokens], -1 = skip
  PagedView dst;
};

// Work items: (token, head) pairs, or (token group, head) pairs for grouped keys.
void append_validate(const AppendParams& p);  // throws Error naming the bad slot
int64_t append_work_items(const AppendParams& p);
void append_cpu(const AppendParams& p, int64_t begin, int64_t end);

struct GatherParams {
  PagedView src;
  const int32_t* block_table = nullptr;  // [num_seqs, max_blocks_per_seq]
  int64_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;     // [num_seqs] positions to produce
  const int32_t* skip = nullptr;         // [num_seqs] or null: positions skipped in the first block
  int64_t num_seqs = 0;
  int64_t out_len = 0;                   // >= max(seq_lens); the tail is zero-filled
  void* out = nullptr;                   // [num_seqs, num_kv_heads, out_len, head_dim] contiguous
  DType out_dtype = DType::kF32;
};

// Work items: (seq, head) pairs.
void gather_validate(const GatherParams& p);  // throws on a length or block id out of range
void gather_cpu(const GatherParams& p, int64_t begin, int64_t end);

// Copies whole blocks: pairs [num_pairs, 2] (src, dst), e.g. for copy-on-write.
void copy_blocks_cpu(const PagedView& pages, const int64_t* pairs, int64_t num_pairs);

}  // namespace pagedkv
