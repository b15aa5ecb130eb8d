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
  m.def("copy_blocks(Tensor(a!)[] pages, Tensor pairs, int block_bytes, int blocks_per_chunk) -> ()");
}
