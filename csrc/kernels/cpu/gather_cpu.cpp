// CPU gather: dequantize sequences' pages to dense [num_seqs, num_kv_heads, out_len, head_dim].
#include <cstring>
#include <vector>

#include "kv_cpu.h"

namespace pagedkv {

void gather_validate(const GatherParams& p) {
  const PageLayout& L = p.src.layout;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t len = p.seq_lens[s];
    const int64_t skip = p.skip ? p.skip[s] : 0;
    PKV_CHECK(len >= 0 && len <= p.out_len, "seq_lens[", s, "]=", len, " is out of range [0, ", p.out_len, "]");
    PKV_CHECK(skip >= 0 && skip < L.block_size, "skip[", s, "]=", skip, " is out of range [0, ", L.block_size, ")");
    const int64_t blocks = len == 0 ? 0 : (skip + len + L.block_size - 1) / L.block_size;
    PKV_CHECK(blocks <= p.max_blocks_per_seq, "seq_lens[", s, "]=", len, " needs ", blocks,
              " blocks but block_table has ", p.max_blocks_per_seq, " columns");
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t id = p.block_table[s * p.max_blocks_per_seq + b];
      PKV_CHECK(p.src.has_block(id), "block_table[", s, ", ", b, "]=", id,
                " is not a block of these pages (ids [0, ", p.src.id_space(), "))");
    }
  }
}

namespace {
inline void store_row(void* out, DType dt, int64_t offset, int n, const float* v) {
  switch (dt) {
    case DType::kF32:
      memcpy(static_cast<float*>(out) + offset, v, sizeof(float) * n);
      return;
    case DType::kBF16: {
      uint16_t* o = static_cast<uint16_t*>(out) + offset;
      for (int i = 0; i < n; ++i) o[i] = bf16_from_float(v[i]);
      return;
    }
    case DType::kF16: {
      uint16_t* o = static_cast<uint16_t*>(out) + offset;
      for (int i = 0; i < n; ++i) o[i] = fp16_from_float(v[i]);
      return;
    }
  }
}
inline int64_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }
}  // namespace

void gather_cpu(const GatherParams& p, int64_t begin, int64_t end) {
  const PageLayout& L = p.src.layout;
  const int H = L.num_kv_heads;
  const int D = L.head_dim;
  std::vector<float> row(D);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t s = w / H;
    const int64_t h = w % H;
    const int64_t len = p.seq_lens[s];
    const int64_t skip = p.skip ? p.skip[s] : 0;
    const int64_t base = (s * H + h) * p.out_len * D;
    for (int64_t t = 0; t < len; ++t) {
      const int64_t pos = t + skip;
      const int32_t block = p.block_table[s * p.max_blocks_per_seq + pos / L.block_size];
      decode_token(L, p.src.head_ptr(block, h), pos % L.block_size, row.data());
      store_row(p.out, p.out_dtype, base + t * D, D, row.data());
    }
    if (len < p.out_len) {
      memset(static_cast<char*>(p.out) + (base + len * D) * dtype_size(p.out_dtype), 0,
             (p.out_len - len) * D * dtype_size(p.out_dtype));
    }
  }
}

}  // namespace pagedkv
