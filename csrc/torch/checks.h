// Argument checks and conversions shared by the torch op implementations. The only directory that
// includes torch headers is csrc/torch.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "../kernels/cpu/kv_cpu.h"
#include "pagedkv/formats.h"

namespace pagedkv {

inline DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t);
  }
  return DType::kF32;
}

inline Format to_format(int64_t f) {
  TORCH_CHECK_VALUE(f >= 0 && f < kNumFormats, "format must be in [0, ", kNumFormats, "), got ", f);
  return static_cast<Format>(f);
}
inline Role to_role(int64_t r) {
  TORCH_CHECK_VALUE(r == 0 || r == 1, "role must be 0 (key) or 1 (value), got ", r);
  return static_cast<Role>(r);
}

// Holds the chunk pointer table for a PagedView built from a list of chunk tensors.
struct ChunkList {
  std::vector<uint8_t*> ptrs;
  std::vector<int64_t> sizes;
};

// Checks every chunk: uint8, contiguous, [n <= blocks_per_chunk, block_bytes], on `device`, and
// only the last one may be short of blocks_per_chunk.
inline PagedView make_view(const at::TensorList& pages, const PageLayout& layout, int64_t blocks_per_chunk,
                           const at::Device& device, ChunkList& holder) {
  TORCH_CHECK_VALUE(blocks_per_chunk > 0, "blocks_per_chunk must be positive, got ", blocks_per_chunk);
  holder.ptrs.clear();
  holder.sizes.clear();
  for (size_t i = 0; i < pages.size(); ++i) {
    const at::Tensor& c = pages[i];
    TORCH_CHECK_TYPE(c.scalar_type() == at::kByte, "pages[", i, "] must be uint8, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.device() == device, "pages[", i, "] is on ", c.device(), " but the inputs are on ", device);
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(1) == layout.block_bytes && c.size(0) <= blocks_per_chunk,
                      "pages[", i, "] must have shape [<=", blocks_per_chunk, ", ", layout.block_bytes,
                      "], got ", c.sizes());
    TORCH_CHECK_VALUE(c.is_contiguous(), "pages[", i, "] must be contiguous");
    holder.ptrs.push_back(c.data_ptr<uint8_t>());
    holder.sizes.push_back(c.size(0));
  }
  PagedView v;
  v.layout = layout;
  v.chunks = holder.ptrs.data();
  v.num_chunks = static_cast<int64_t>(holder.ptrs.size());
  v.blocks_per_chunk = static_cast<int32_t>(blocks_per_chunk);
  v.chunk_blocks = holder.sizes.data();
  return v;
}

// Runs a core call and turns pagedkv::Error into a ValueError carrying its message.
template <typename F>
auto translate_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace pagedkv
