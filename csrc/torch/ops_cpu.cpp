// CPU implementations of the pagedkv ops: check tensors, build raw-pointer params, run kernels
// under at::parallel_for.
#include <ATen/Parallel.h>

#include "checks.h"

namespace pagedkv {
namespace {

void append_cpu_op(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping,
                   int64_t format, int64_t role, int64_t group, int64_t block_size,
                   int64_t blocks_per_chunk) {
  TORCH_CHECK_VALUE(src.dim() == 3, "src must be [num_tokens, num_kv_heads, head_dim], got shape ", src.sizes());
  TORCH_CHECK_VALUE(src.stride(2) == 1, "src must be contiguous in head_dim, got strides ", src.strides());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ", slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == src.size(0),
                    "slot_mapping must be [num_tokens=", src.size(0), "], got shape ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.device() == src.device(), "slot_mapping is on ", slot_mapping.device(),
                    " but src is on ", src.device());
  const at::Tensor slots = slot_mapping.contiguous();
  const PageLayout layout = translate_errors([&] {
    return make_page_layout(to_format(format), to_role(role), static_cast<int32_t>(src.size(1)),
                            static_cast<int32_t>(src.size(2)), static_cast<int32_t>(block_size),
                            static_cast<int32_t>(group));
  });
  ChunkList holder;
  AppendParams p;
  p.dst = make_view(pages, layout, blocks_per_chunk, src.device(), holder);
  p.src = src.data_ptr();
  p.src_dtype = to_dtype(src.scalar_type(), "src");
  p.num_tokens = src.size(0);
  p.token_stride = src.stride(0);
  p.head_stride = src.stride(1);
  p.slot_mapping = slots.data_ptr<int64_t>();
  translate_errors([&] { append_validate(p); });
  at::parallel_for(0, append_work_items(p), 16, [&](int64_t b, int64_t e) { append_cpu(p, b, e); });
}

at::Tensor gather_cpu_op(at::TensorList pages, const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& skip, int64_t format, int64_t role, int64_t group,
                         int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads, int64_t head_dim,
                         int64_t out_len, at::ScalarType dtype) {
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
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  at::Tensor skip_c;
  if (skip.has_value()) {
    TORCH_CHECK_TYPE(skip->scalar_type() == at::kInt, "skip must be int32, got ", skip->scalar_type());
    TORCH_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == block_table.size(0),
                      "skip must be [num_seqs=", block_table.size(0), "], got shape ", skip->sizes());
    skip_c = skip->contiguous();
  }
  ChunkList holder;
  GatherParams p;
  p.src = make_view(pages, layout, blocks_per_chunk, device, holder);
  p.block_table = table.data_ptr<int32_t>();
  p.max_blocks_per_seq = table.size(1);
  p.seq_lens = lens.data_ptr<int32_t>();
  p.skip = skip_c.defined() ? skip_c.data_ptr<int32_t>() : nullptr;
  p.num_seqs = table.size(0);
  p.out_len = out_len;
  p.out_dtype = to_dtype(dtype, "dtype");
  translate_errors([&] { gather_validate(p); });
  at::Tensor out = at::empty({p.num_seqs, num_kv_heads, out_len, head_dim}, at::TensorOptions().dtype(dtype).device(device));
  p.out = out.data_ptr();
  at::parallel_for(0, p.num_seqs * num_kv_heads, 1, [&](int64_t b, int64_t e) { gather_cpu(p, b, e); });
  return out;
}

void copy_blocks_cpu_op(at::TensorList pages, const at::Tensor& pairs, int64_t block_bytes, int64_t blocks_per_chunk) {
  TORCH_CHECK_TYPE(pairs.scalar_type() == at::kLong, "pairs must be int64, got ", pairs.scalar_type());
  TORCH_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be [num_pairs, 2], got shape ", pairs.sizes());
  TORCH_CHECK_VALUE(block_bytes > 0, "block_bytes must be positive, got ", block_bytes);
  PageLayout layout;
  layout.block_bytes = block_bytes;
  ChunkList holder;
  const PagedView view = make_view(pages, layout, blocks_per_chunk, pairs.device(), holder);
  const at::Tensor pc = pairs.contiguous();
  translate_errors([&] { copy_blocks_cpu(view, pc.data_ptr<int64_t>(), pc.size(0)); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pagedkv, CPU, m) {
  m.impl("append", &append_cpu_op);
  m.impl("gather", &gather_cpu_op);
  m.impl("copy_blocks", &copy_blocks_cpu_op);
}

}  // namespace pagedkv
