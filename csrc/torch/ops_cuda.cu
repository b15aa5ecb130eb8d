// CUDA implementations of the pagedkv ops: the same checks as on CPU (indices validated on the
// host), then device pointers, the current stream, a device guard and a launch check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/kv_cuda.h"

namespace pagedkv {
namespace {

// Chunk base pointers as a device array (kept alive by the returned tensor).
at::Tensor device_chunk_table(const ChunkList& holder, const at::Device& device) {
  at::Tensor t = at::empty({static_cast<int64_t>(holder.ptrs.size())}, at::kLong);
  for (size_t i = 0; i < holder.ptrs.size(); ++i) t[i] = reinterpret_cast<int64_t>(holder.ptrs[i]);
  return t.to(device);
}

void append_cuda_op(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping, int64_t format,
                    int64_t role, int64_t group, int64_t block_size, int64_t blocks_per_chunk) {
  const at::cuda::CUDAGuard guard(src.device());
  ChunkList holder;
  at::Tensor slots_host;
  AppendParams p = prepare_append(src, pages, slot_mapping, format, role, group, block_size, blocks_per_chunk,
                                  holder, slots_host);
  const at::Tensor slots = slot_mapping.contiguous();
  const at::Tensor table = device_chunk_table(holder, src.device());
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.dst.chunks = reinterpret_cast<uint8_t* const*>(table.data_ptr<int64_t>());
  p.dst.chunk_blocks = nullptr;  // host-only: validation already ran
  C10_CUDA_CHECK(append_cuda(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_cuda_op(at::TensorList pages, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const std::optional<at::Tensor>& skip, int64_t format, int64_t role, int64_t group,
                          int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads, int64_t head_dim,
                          int64_t out_len, at::ScalarType dtype) {
  const at::cuda::CUDAGuard guard(block_table.device());
  ChunkList holder;
  std::vector<at::Tensor> keep;
  GatherParams p = prepare_gather(pages, block_table, seq_lens, skip, format, role, group, block_size,
                                  blocks_per_chunk, num_kv_heads, head_dim, out_len, dtype, holder, keep);
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor skip_d = skip.has_value() ? skip->contiguous() : at::Tensor();
  const at::Tensor chunks = device_chunk_table(holder, block_table.device());
  p.block_table = table.data_ptr<int32_t>();
  p.seq_lens = lens.data_ptr<int32_t>();
  p.skip = skip_d.defined() ? skip_d.data_ptr<int32_t>() : nullptr;
  p.src.chunks = reinterpret_cast<uint8_t* const*>(chunks.data_ptr<int64_t>());
  p.src.chunk_blocks = nullptr;
  at::Tensor out = at::empty({p.num_seqs, num_kv_heads, out_len, head_dim}, block_table.options().dtype(dtype));
  p.out = out.data_ptr();
  C10_CUDA_CHECK(gather_cuda(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void copy_blocks_cuda_op(at::TensorList pages, const at::Tensor& pairs, int64_t block_bytes, int64_t blocks_per_chunk) {
  const at::cuda::CUDAGuard guard(pairs.device());
  TORCH_CHECK_TYPE(pairs.scalar_type() == at::kLong, "pairs must be int64, got ", pairs.scalar_type());
  TORCH_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be [num_pairs, 2], got shape ", pairs.sizes());
  PageLayout layout;
  layout.block_bytes = block_bytes;
  ChunkList holder;
  PagedView view = make_view(pages, layout, blocks_per_chunk, pairs.device(), holder);
  const at::Tensor host = pairs.to(at::kCPU).contiguous();
  for (int64_t i = 0; i < host.size(0); ++i) {
    const int64_t a = host[i][0].item<int64_t>(), b = host[i][1].item<int64_t>();
    TORCH_CHECK_VALUE(view.has_block(a) && view.has_block(b), "block pair ", i, " = (", a, ", ", b,
                      ") is not in these pages");
  }
  const at::Tensor dev_pairs = pairs.contiguous();
  const at::Tensor chunks = device_chunk_table(holder, pairs.device());
  view.chunks = reinterpret_cast<uint8_t* const*>(chunks.data_ptr<int64_t>());
  view.chunk_blocks = nullptr;
  C10_CUDA_CHECK(copy_blocks_cuda(view, dev_pairs.data_ptr<int64_t>(), dev_pairs.size(0), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(pagedkv, CUDA, m) {
  m.impl("append", &append_cuda_op);
  m.impl("gather", &gather_cuda_op);
  m.impl("copy_blocks", &copy_blocks_cuda_op);
}

}  // namespace pagedkv
