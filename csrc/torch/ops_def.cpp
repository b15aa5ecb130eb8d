// Every schema of the pagedkv op library, once. Implementations: ops_cpu.cpp (and ops_cuda.cu).
//
// Shared arguments:
//   pages            list of uint8 chunk tensors [<= blocks_per_chunk, block_bytes] of one of K/V of one layer
//   format, role     pagedkv::Format and pagedkv::Role as ints (python/pagedkv/config.py names them)
//   group            tokens per key group or channels per value group (grouped formats), else ignored
#include <torch/library.h>

TORCH_LIBRARY(pagedkv, m) {
  // Quantize src [num_tokens, num_kv_heads, head_dim] and write token t to slot slot_mapping[t]
  // (block * block_size + offset); -1 skips the token.
  m.def(
      "append(Tensor src, Tensor(a!)[] pages, Tensor slot_mapping, int format, int role, int group, "
      "int block_size, int blocks_per_chunk) -> ()");
  // Dequantize to [num_seqs, num_kv_heads, out_len, head_dim] of `dtype`; positions at and past
  // seq_lens[s] are zero. skip[s] positions of the first listed block are skipped.
  m.def(
      "gather(Tensor[] pages, Tensor block_table, Tensor seq_lens, Tensor? skip, int format, int role, "
      "int group, int block_size, int blocks_per_chunk, int num_kv_heads, int head_dim, int out_len, "
      "ScalarType dtype) -> Tensor");
  // Copy whole blocks pairs[i, 0] -> pairs[i, 1] (copy-on-write); pairs is int64 [num_pairs, 2].
  // True when every element of a and b is finite (one pass, no temporaries; CPU).
  m.def("all_finite(Tensor a, Tensor b) -> bool");
  m.def("copy_blocks(Tensor(a!)[] pages, Tensor pairs, int block_bytes, int blocks_per_chunk) -> ()");
  // Fused attention of query [num_seqs, num_q_heads, q_len, head_dim] over each sequence's paged
  // entries (seq_lens[s] positions from skip[s] in its block-table row) followed by the dense tail
  // k_tail/v_tail [num_seqs, num_kv_heads, tail_len, head_dim]; causal for the last q_len entries,
  // optional sliding window (0: none), logit soft-cap (0: none) and padding mask kv_mask[s,
  // mask_offset + entry]. num_splits: 0 picks the split count. Returns [num_seqs, q_len, num_q_heads,
  // head_dim] in the query's dtype (fp32 accumulation).
  m.def(
      "paged_attention(Tensor query, Tensor[] k_pages, Tensor[] v_pages, Tensor block_table, Tensor seq_lens, "
      "Tensor? skip, Tensor? k_tail, Tensor? v_tail, Tensor? kv_mask, int mask_offset, int k_format, int v_format, "
      "int k_group, int v_group, int block_size, int blocks_per_chunk, int num_kv_heads, float scale, "
      "float softcap, int window, int num_splits) -> Tensor");
}
