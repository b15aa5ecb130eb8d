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

// Checks the arguments and builds host-side params (validated: nothing is written on failure).
// `slots` receives the contiguous slot tensor the params point into.
inline AppendParams prepare_append(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping,
                   int64_t format, int64_t role, int64_t group, int64_t block_size,
                   int64_t blocks_per_chunk, ChunkList& holder, at::Tensor& slots) {
  TORCH_CHECK_VALUE(src.dim() == 3, "src must be [num_tokens, num_kv_heads, head_dim], got shape ", src.sizes());
  TORCH_CHECK_VALUE(src.stride(2) == 1, "src must be contiguous in head_dim, got strides ", src.strides());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ", slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == src.size(0),
                    "slot_mapping must be [num_tokens=", src.size(0), "], got shape ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.device() == src.device(), "slot_mapping is on ", slot_mapping.device(),
                    " but src is on ", src.device());
  // Validation reads indices on the host (a no-op copy for CPU tensors).
  slots = slot_mapping.to(at::kCPU).contiguous();
  const PageLayout layout = translate_errors([&] {
    return make_page_layout(to_format(format), to_role(role), static_cast<int32_t>(src.size(1)),
                            static_cast<int32_t>(src.size(2)), static_cast<int32_t>(block_size),
                            static_cast<int32_t>(group));
  });
  AppendParams p;
  p.dst = make_view(pages, layout, blocks_per_chunk, src.device(), holder);
  p.src = src.data_ptr();
  p.src_dtype = to_dtype(src.scalar_type(), "src");
  p.num_tokens = src.size(0);
  p.token_stride = src.stride(0);
  p.head_stride = src.stride(1);
  p.slot_mapping = slots.data_ptr<int64_t>();
  translate_errors([&] { append_validate(p); });
  return p;
}

// Checks the arguments and builds host-side params; `keep` holds the contiguous index tensors.
inline GatherParams prepare_gather(at::TensorList pages, const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& skip, int64_t format, int64_t role, int64_t group,
                         int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads, int64_t head_dim,
                         int64_t out_len, at::ScalarType dtype, ChunkList& holder,
                                   std::vector<at::Tensor>& keep) {
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt, "block_table must be int32, got ", block_table.scalar_type());
  TORCH_CHECK_VALUE(block_table.dim() == 2, "block_table must be [num_seqs, max_blocks_per_seq], got shape ", block_table.sizes());
  TORCH_CHECK_TYPE(seq_lens.scalar_type() == at::kInt, "seq_lens must be int32, got ", seq_lens.scalar_type());
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == block_table.size(0),
                    "seq_lens must be [num_seqs=", block_table.size(0), "], got shape ", seq_lens.sizes());
  TORCH_CHECK_VALUE(out_len >= 0, "out_len must be >= 0, got ", out_len);
  const at::Device device = block_table.device();
  TORCH_CHECK_VALUE(seq_lens.device() == device, "seq_lens is on ", seq_lens.device(), " but block_table is on ", device);
  const PageLayout layout = translate_errors([&] {
    return make_page_layout(to_format(format), to_role(role), static_cast<int32_t>(num_kv_heads),
                            static_cast<int32_t>(head_dim), static_cast<int32_t>(block_size),
                            static_cast<int32_t>(group));
  });
  const at::Tensor table = block_table.to(at::kCPU).contiguous();
  const at::Tensor lens = seq_lens.to(at::kCPU).contiguous();
  at::Tensor skip_c;
  if (skip.has_value()) {
    TORCH_CHECK_TYPE(skip->scalar_type() == at::kInt, "skip must be int32, got ", skip->scalar_type());
    TORCH_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == block_table.size(0),
                      "skip must be [num_seqs=", block_table.size(0), "], got shape ", skip->sizes());
    skip_c = skip->to(at::kCPU).contiguous();
  }
  GatherParams p;
  p.src = make_view(pages, layout, blocks_per_chunk, device, holder);
  p.block_table = table.data_ptr<int32_t>();
  p.max_blocks_per_seq = table.size(1);
  p.seq_lens = lens.data_ptr<int32_t>();
  p.skip = skip_c.defined() ? skip_c.data_ptr<int32_t>() : nullptr;
  p.num_seqs = table.size(0);
  p.out_len = out_len;
  p.out_dtype = to_dtype(dtype, "dtype");
  keep = {table, lens, skip_c};
  translate_errors([&] { gather_validate(p); });
  return p;
}

}  // namespace pagedkv
