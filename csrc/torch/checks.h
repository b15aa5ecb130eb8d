// Argument checks and conversions shared by the torch op implementations. The only directory that
// includes torch headers is csrc/torch.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "../kernels/cpu/attention_cpu.h"
#include "pagedkv/formats.h"

namespace pagedkv {

// Torch values in error messages, as strings (pagedkv/common.h: no std::ostream in messages).
template <typename T>
const T& msg_arg(const T& x) {
  return x;
}
inline const char* msg_arg(at::ScalarType t) { return c10::toString(t); }
inline std::string msg_arg(const c10::Device& d) { return d.str(); }
inline std::string msg_arg(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename... Args>
std::string msg(const Args&... args) {
  return detail::concat(msg_arg(args)...);
}

}  // namespace pagedkv

// torch's checks with the message built by pagedkv::msg: ValueError, TypeError, RuntimeError.
#define PKV_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::pagedkv::msg(__VA_ARGS__))
#define PKV_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::pagedkv::msg(__VA_ARGS__))
#define PKV_CHECK_RUNTIME(cond, ...) TORCH_CHECK(cond, ::pagedkv::msg(__VA_ARGS__))

namespace pagedkv {

inline DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    default:
      PKV_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t);
  }
  return DType::kF32;
}

inline Format to_format(int64_t f) {
  PKV_CHECK_VALUE(f >= 0 && f < kNumFormats, "format must be in [0, ", kNumFormats, "), got ", f);
  return static_cast<Format>(f);
}
inline Role to_role(int64_t r) {
  PKV_CHECK_VALUE(r == 0 || r == 1, "role must be 0 (key) or 1 (value), got ", r);
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
  PKV_CHECK_VALUE(blocks_per_chunk > 0, "blocks_per_chunk must be positive, got ", blocks_per_chunk);
  holder.ptrs.clear();
  holder.sizes.clear();
  for (size_t i = 0; i < pages.size(); ++i) {
    const at::Tensor& c = pages[i];
    PKV_CHECK_TYPE(c.scalar_type() == at::kByte, "pages[", i, "] must be uint8, got ", c.scalar_type());
    PKV_CHECK_VALUE(c.device() == device, "pages[", i, "] is on ", c.device(), " but the inputs are on ", device);
    PKV_CHECK_VALUE(c.dim() == 2 && c.size(1) == layout.block_bytes && c.size(0) <= blocks_per_chunk,
                      "pages[", i, "] must have shape [<=", blocks_per_chunk, ", ", layout.block_bytes,
                      "], got ", c.sizes());
    PKV_CHECK_VALUE(c.is_contiguous(), "pages[", i, "] must be contiguous");
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
    PKV_CHECK_VALUE(false, e.what());
  }
}

// Checks the arguments and builds host-side params (validated: nothing is written on failure).
// `slots` receives the contiguous slot tensor the params point into: a host copy when
// `validate_slots` (the slots are then checked), else slot_mapping itself (CUDA graph capture, where
// the host cannot read device memory).
inline AppendParams prepare_append(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping,
                   int64_t format, int64_t role, int64_t group, int64_t block_size,
                   int64_t blocks_per_chunk, ChunkList& holder, at::Tensor& slots, bool validate_slots = true) {
  PKV_CHECK_VALUE(src.dim() == 3, "src must be [num_tokens, num_kv_heads, head_dim], got shape ", src.sizes());
  PKV_CHECK_VALUE(src.stride(2) == 1, "src must be contiguous in head_dim, got strides ", src.strides());
  PKV_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ", slot_mapping.scalar_type());
  PKV_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == src.size(0),
                    "slot_mapping must be [num_tokens=", src.size(0), "], got shape ", slot_mapping.sizes());
  PKV_CHECK_VALUE(slot_mapping.device() == src.device(), "slot_mapping is on ", slot_mapping.device(),
                    " but src is on ", src.device());
  // Validation reads indices on the host (a no-op copy for CPU tensors).
  slots = validate_slots ? slot_mapping.to(at::kCPU).contiguous() : slot_mapping.contiguous();
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
  if (validate_slots) translate_errors([&] { append_validate(p); });
  return p;
}

// Checks the arguments and builds host-side params; `keep` holds the contiguous index tensors.
inline GatherParams prepare_gather(at::TensorList pages, const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& skip, int64_t format, int64_t role, int64_t group,
                         int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads, int64_t head_dim,
                         int64_t out_len, at::ScalarType dtype, ChunkList& holder,
                                   std::vector<at::Tensor>& keep) {
  PKV_CHECK_TYPE(block_table.scalar_type() == at::kInt, "block_table must be int32, got ", block_table.scalar_type());
  PKV_CHECK_VALUE(block_table.dim() == 2, "block_table must be [num_seqs, max_blocks_per_seq], got shape ", block_table.sizes());
  PKV_CHECK_TYPE(seq_lens.scalar_type() == at::kInt, "seq_lens must be int32, got ", seq_lens.scalar_type());
  PKV_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == block_table.size(0),
                    "seq_lens must be [num_seqs=", block_table.size(0), "], got shape ", seq_lens.sizes());
  PKV_CHECK_VALUE(out_len >= 0, "out_len must be >= 0, got ", out_len);
  const at::Device device = block_table.device();
  PKV_CHECK_VALUE(seq_lens.device() == device, "seq_lens is on ", seq_lens.device(), " but block_table is on ", device);
  const PageLayout layout = translate_errors([&] {
    return make_page_layout(to_format(format), to_role(role), static_cast<int32_t>(num_kv_heads),
                            static_cast<int32_t>(head_dim), static_cast<int32_t>(block_size),
                            static_cast<int32_t>(group));
  });
  const at::Tensor table = block_table.to(at::kCPU).contiguous();
  const at::Tensor lens = seq_lens.to(at::kCPU).contiguous();
  at::Tensor skip_c;
  if (skip.has_value()) {
    PKV_CHECK_TYPE(skip->scalar_type() == at::kInt, "skip must be int32, got ", skip->scalar_type());
    PKV_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == block_table.size(0),
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

// Checks a strided [num_seqs, heads, tokens, head_dim] tensor with a contiguous last dimension.
inline void check_bhtd(const at::Tensor& t, const char* name, int64_t num_seqs, int64_t heads, int64_t head_dim,
                       const at::Tensor& query) {
  PKV_CHECK_VALUE(t.dim() == 4 && t.size(0) == num_seqs && t.size(1) == heads && t.size(3) == head_dim,
                    name, " must be [num_seqs=", num_seqs, ", num_kv_heads=", heads, ", tokens, head_dim=", head_dim,
                    "], got shape ", t.sizes());
  PKV_CHECK_TYPE(t.scalar_type() == query.scalar_type(), name, " must have the query's dtype ",
                   query.scalar_type(), ", got ", t.scalar_type());
  PKV_CHECK_VALUE(t.device() == query.device(), name, " is on ", t.device(), " but query is on ", query.device());
  PKV_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, name, " must be contiguous in head_dim, got strides ",
                    t.strides());
}

// Index tensors the attention params point into (host copies for validation; device ones for CUDA).
struct AttentionHold {
  ChunkList k_chunks, v_chunks;
  at::Tensor table, lens, skip, mask, k_tail, v_tail, query;
};

// Checks the arguments of paged_attention and builds params whose index pointers are HOST copies
// (validated: nothing runs on failure). Output, splits and workspace are left to the caller.
inline AttentionParams prepare_attention(
    const at::Tensor& query, at::TensorList k_pages, at::TensorList v_pages, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& k_tail,
    const std::optional<at::Tensor>& v_tail, const std::optional<at::Tensor>& kv_mask, int64_t mask_offset,
    int64_t k_format, int64_t v_format, int64_t k_group, int64_t v_group, int64_t block_size,
    int64_t blocks_per_chunk, int64_t num_kv_heads, double scale, double softcap, int64_t window,
    AttentionHold& hold, bool validate_indices) {
  PKV_CHECK_VALUE(query.dim() == 4, "query must be [num_seqs, num_q_heads, q_len, head_dim], got shape ",
                    query.sizes());
  const DType dt = to_dtype(query.scalar_type(), "query");
  PKV_CHECK_VALUE(query.size(3) <= 1 || query.stride(3) == 1, "query must be contiguous in head_dim, got strides ",
                    query.strides());
  const at::Device device = query.device();
  const int64_t num_seqs = query.size(0), head_dim = query.size(3);
  PKV_CHECK_VALUE(num_kv_heads > 0 && query.size(1) % num_kv_heads == 0, "query has ", query.size(1),
                    " heads, which is not a multiple of num_kv_heads=", num_kv_heads);
  PKV_CHECK_TYPE(block_table.scalar_type() == at::kInt, "block_table must be int32, got ", block_table.scalar_type());
  PKV_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == num_seqs,
                    "block_table must be [num_seqs=", num_seqs, ", max_blocks_per_seq], got shape ", block_table.sizes());
  PKV_CHECK_TYPE(seq_lens.scalar_type() == at::kInt, "seq_lens must be int32, got ", seq_lens.scalar_type());
  PKV_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs,
                    "seq_lens must be [num_seqs=", num_seqs, "], got shape ", seq_lens.sizes());
  for (const at::Tensor* t : {&block_table, &seq_lens}) {
    PKV_CHECK_VALUE(t->device() == device, "block_table and seq_lens must be on the query's device ", device,
                      ", got ", t->device());
  }
  PKV_CHECK_VALUE(window >= 0, "window must be >= 0 (0: none), got ", window);
  PKV_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (0: none), got ", softcap);
  PKV_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "scale must be a positive finite float, got ", scale);
  const auto mk = [&](int64_t f, int64_t role, int64_t group) {
    return translate_errors([&] {
      return make_page_layout(to_format(f), to_role(role), static_cast<int32_t>(num_kv_heads),
                              static_cast<int32_t>(head_dim), static_cast<int32_t>(block_size),
                              static_cast<int32_t>(group));
    });
  };
  AttentionParams p;
  p.k = make_view(k_pages, mk(k_format, 0, k_group), blocks_per_chunk, device, hold.k_chunks);
  p.v = make_view(v_pages, mk(v_format, 1, v_group), blocks_per_chunk, device, hold.v_chunks);
  if (validate_indices) {
    hold.table = block_table.to(at::kCPU).contiguous();
    hold.lens = seq_lens.to(at::kCPU).contiguous();
  } else {
    hold.table = block_table.contiguous();
    hold.lens = seq_lens.contiguous();
  }
  p.block_table = hold.table.data_ptr<int32_t>();
  p.max_blocks_per_seq = hold.table.size(1);
  p.seq_lens = hold.lens.data_ptr<int32_t>();
  if (skip.has_value()) {
    PKV_CHECK_TYPE(skip->scalar_type() == at::kInt, "skip must be int32, got ", skip->scalar_type());
    PKV_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == num_seqs, "skip must be [num_seqs=", num_seqs,
                      "], got shape ", skip->sizes());
    PKV_CHECK_VALUE(skip->device() == device, "skip is on ", skip->device(), " but query is on ", device);
    hold.skip = validate_indices ? skip->to(at::kCPU).contiguous() : skip->contiguous();
    p.skip = hold.skip.data_ptr<int32_t>();
  }
  PKV_CHECK_VALUE(k_tail.has_value() == v_tail.has_value(), "k_tail and v_tail must be given together");
  if (k_tail.has_value()) {
    check_bhtd(*k_tail, "k_tail", num_seqs, num_kv_heads, head_dim, query);
    check_bhtd(*v_tail, "v_tail", num_seqs, num_kv_heads, head_dim, query);
    PKV_CHECK_VALUE(k_tail->size(2) == v_tail->size(2), "k_tail has ", k_tail->size(2), " tokens but v_tail has ",
                      v_tail->size(2));
    hold.k_tail = *k_tail;
    hold.v_tail = *v_tail;
    p.tail_len = k_tail->size(2);
    if (p.tail_len > 0) {
      p.k_tail = k_tail->data_ptr();
      p.v_tail = v_tail->data_ptr();
      for (int i = 0; i < 3; ++i) {
        p.kt_stride[i] = k_tail->stride(i);
        p.vt_stride[i] = v_tail->stride(i);
      }
    }
  }
  if (kv_mask.has_value()) {
    PKV_CHECK_TYPE(kv_mask->scalar_type() == at::kBool || kv_mask->scalar_type() == at::kByte,
                     "kv_mask must be bool or uint8, got ", kv_mask->scalar_type());
    PKV_CHECK_VALUE(kv_mask->dim() == 2 && kv_mask->size(0) == num_seqs, "kv_mask must be [num_seqs=", num_seqs,
                      ", positions], got shape ", kv_mask->sizes());
    PKV_CHECK_VALUE(kv_mask->device() == device, "kv_mask is on ", kv_mask->device(), " but query is on ", device);
    hold.mask = kv_mask->contiguous();
    p.kv_mask = reinterpret_cast<const uint8_t*>(hold.mask.data_ptr());
    p.mask_stride = hold.mask.size(1);
    p.mask_len = hold.mask.size(1);
    p.mask_offset = mask_offset;
    PKV_CHECK_VALUE(mask_offset >= 0, "mask_offset must be >= 0, got ", mask_offset);
  }
  hold.query = query;
  p.query = query.data_ptr();
  for (int i = 0; i < 3; ++i) p.q_stride[i] = query.stride(i);
  p.dtype = dt;
  p.num_seqs = num_seqs;
  p.num_q_heads = query.size(1);
  p.q_len = query.size(2);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window = window;
  if (validate_indices) {
    // Reads the host index copies; the mask is checked for length only, never dereferenced.
    translate_errors([&] { attention_validate(p); });
  }
  return p;
}

}  // namespace pagedkv

