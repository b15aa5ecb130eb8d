// Fused paged attention: attention of a query chunk over quantized pages plus a full-precision tail,
// reading the compressed bytes directly (no dense K/V is ever materialized). Torch-free.
//
// Sequence s sees n_s = seq_lens[s] + tail_len key/value entries, in order: paged entries
// (positions skip[s] + e of its block-table row) then the tail [tail_len] entries. Query token t
// of q_len sits at entry n_s - q_len + t and sees entries e <= it (causal) and, with a window w > 0,
// e > it - w. kv_mask (optional) masks entries whose byte kv_mask[s, mask_offset + e] is 0 (padding).
//
// The context of each (sequence, KV head) is cut into splits of split_tokens entries (flash
// decoding). Each split writes a partial (max, sum, unnormalized accumulator) per query row; a merge
// pass combines them with the numerically stable rescaling. With one split the merge is skipped.
#pragma once

#include <cstdint>

#include "kv_cpu.h"

namespace pagedkv {

struct AttentionParams {
  PagedView k, v;                        // key and value pages (layouts carry format and group)
  const int32_t* block_table = nullptr;  // [num_seqs, max_blocks_per_seq]
  int64_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;     // [num_seqs] paged entries
  const int32_t* skip = nullptr;         // [num_seqs] or null: positions skipped in the first block

  const void* query = nullptr;           // [num_seqs, num_q_heads, q_len, head_dim] strided, head_dim contiguous
  int64_t q_stride[3] = {0, 0, 0};       // seq, head, token (elements)
  const void* k_tail = nullptr;          // [num_seqs, num_kv_heads, tail_len, head_dim] or null
  const void* v_tail = nullptr;
  int64_t kt_stride[3] = {0, 0, 0};
  int64_t vt_stride[3] = {0, 0, 0};
  int64_t tail_len = 0;
  DType dtype = DType::kF32;             // of query, tails and out

  const uint8_t* kv_mask = nullptr;      // [num_seqs, mask_len] (row stride mask_stride) or null
  int64_t mask_stride = 0;
  int64_t mask_len = 0;
  int64_t mask_offset = 0;

  void* out = nullptr;                   // [num_seqs, q_len, num_q_heads, head_dim] contiguous
  int64_t num_seqs = 0;
  int64_t num_q_heads = 0;
  int64_t q_len = 0;
  float scale = 1.0f;
  float softcap = 0.0f;                  // <= 0: none
  int64_t window = 0;                    // <= 0: none

  int64_t split_tokens = 0;              // entries per split
  int64_t num_splits = 1;                // max splits per sequence
  float* partial_acc = nullptr;          // [num_seqs, num_kv_heads, num_splits, rows, head_dim]
  float* partial_ml = nullptr;           // [num_seqs, num_kv_heads, num_splits, rows, 2] (max, sum)

  int64_t num_kv_heads() const { return k.layout.num_kv_heads; }
  int64_t head_dim() const { return k.layout.head_dim; }
  int64_t group_size() const { return num_q_heads / num_kv_heads(); }
  int64_t rows() const { return group_size() * q_len; }  // query rows per KV head: (token, head in group)
  int64_t max_entries() const;                          // max over sequences of n_s (host pointers)
};

// Throws Error naming the bad field (shapes, lengths, block ids, mask length). Host pointers only.
void attention_validate(const AttentionParams& p);

// Picks split_tokens / num_splits so that num_seqs * num_kv_heads * num_splits work items keep
// `parallelism` workers busy without splits shorter than `min_split` entries.
void attention_plan(AttentionParams& p, int64_t max_entries, int64_t parallelism, int64_t min_split);

// Work items: (seq, kv head, split). With num_splits == 1 the result goes straight to out.
int64_t attention_work_items(const AttentionParams& p);
void attention_cpu(const AttentionParams& p, int64_t begin, int64_t end);
// Merge work items: (seq, kv head). Only when num_splits > 1.
void attention_merge_cpu(const AttentionParams& p, int64_t begin, int64_t end);

}  // namespace pagedkv
