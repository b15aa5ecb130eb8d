// CUDA implementations of the pagedkv ops: the same checks as on CPU (indices validated on the
// host), then device pointers, the current stream, a device guard and a launch check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/attention_cuda.h"
#include "cuda/kv_cuda.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace pagedkv {
namespace {

bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Chunk base pointers as a device array. Tables are cached by their contents (a pointer list maps to
// a tensor holding exactly those values, so an entry never goes stale), which saves a host-to-device
// copy per call and lets a CUDA graph capture the call: a capture may not copy from pageable host
// memory, so the table must exist before it (the graph decoder runs each step once eagerly first).
at::Tensor device_chunk_table(const ChunkList& holder, const at::Device& device) {
  std::vector<int64_t> ptrs(holder.ptrs.size() + 1);
  for (size_t i = 0; i < holder.ptrs.size(); ++i) ptrs[i] = reinterpret_cast<int64_t>(holder.ptrs[i]);
  ptrs.back() = device.index();  // the key's last entry: the device
  static std::mutex mu;
  static std::map<std::vector<int64_t>, at::Tensor> cache;
  constexpr size_t kMaxEntries = 4096;  // a cache of many models' layers; cleared whole when full
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(ptrs);
  if (it != cache.end()) return it->second;
  PKV_CHECK_RUNTIME(!stream_capturing(), "pagedkv: a page chunk table was first needed during CUDA graph capture; run "
              "the captured step once eagerly before capturing it");
  if (cache.size() >= kMaxEntries) cache.clear();
  at::Tensor t = at::tensor(at::ArrayRef<int64_t>(ptrs.data(), ptrs.size() - 1), at::kLong).to(device);
  cache.emplace(std::move(ptrs), t);
  return t;
}

void append_cuda_op(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping, int64_t format,
                    int64_t role, int64_t group, int64_t block_size, int64_t blocks_per_chunk) {
  const at::cuda::CUDAGuard guard(src.device());
  ChunkList holder;
  at::Tensor slots_host;
  // Under CUDA graph capture the slots cannot be read on the host: they come unchecked from the
  // caller (pagedkv.GraphDecoder computes them from its own block table).
  AppendParams p = prepare_append(src, pages, slot_mapping, format, role, group, block_size, blocks_per_chunk,
                                  holder, slots_host, !stream_capturing());
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
  PKV_CHECK_TYPE(pairs.scalar_type() == at::kLong, "pairs must be int64, got ", pairs.scalar_type());
  PKV_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be [num_pairs, 2], got shape ", pairs.sizes());
  PageLayout layout;
  layout.block_bytes = block_bytes;
  ChunkList holder;
  PagedView view = make_view(pages, layout, blocks_per_chunk, pairs.device(), holder);
  const at::Tensor host = pairs.to(at::kCPU).contiguous();
  const auto pair = host.accessor<int64_t, 2>();
  for (int64_t i = 0; i < host.size(0); ++i) {
    const int64_t a = pair[i][0], b = pair[i][1];
    PKV_CHECK_VALUE(view.has_block(a) && view.has_block(b), "block pair ", i, " = (", a, ", ", b,
                      ") is not in these pages");
  }
  const at::Tensor dev_pairs = pairs.contiguous();
  const at::Tensor chunks = device_chunk_table(holder, pairs.device());
  view.chunks = reinterpret_cast<uint8_t* const*>(chunks.data_ptr<int64_t>());
  view.chunk_blocks = nullptr;
  C10_CUDA_CHECK(copy_blocks_cuda(view, dev_pairs.data_ptr<int64_t>(), dev_pairs.size(0), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Index validation on the host costs a device sync per call, so the CUDA attention checks indices
// in the kernel instead (out-of-range blocks are skipped, never read); PAGEDKV_VALIDATE=1 restores
// the host checks with their exact error messages.
bool host_validation() {
  static const bool on = [] {
    const char* v = std::getenv("PAGEDKV_VALIDATE");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

at::Tensor paged_attention_cuda_op(const at::Tensor& query, at::TensorList k_pages, at::TensorList v_pages,
                                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                                   const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& k_tail,
                                   const std::optional<at::Tensor>& v_tail, const std::optional<at::Tensor>& kv_mask,
                                   int64_t mask_offset, int64_t k_format, int64_t v_format, int64_t k_group,
                                   int64_t v_group, int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads,
                                   double scale, double softcap, int64_t window, int64_t num_splits) {
  const at::cuda::CUDAGuard guard(query.device());
  PKV_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  AttentionHold hold;
  const bool validate = host_validation();
  AttentionParams p = prepare_attention(query, k_pages, v_pages, block_table, seq_lens, skip, k_tail, v_tail, kv_mask,
                                        mask_offset, k_format, v_format, k_group, v_group, block_size,
                                        blocks_per_chunk, num_kv_heads, scale, softcap, window, hold, validate);
  PKV_CHECK_VALUE(p.k.num_chunks <= kMaxAttentionChunks && p.v.num_chunks <= kMaxAttentionChunks,
                    "the pages have ", std::max(p.k.num_chunks, p.v.num_chunks), " chunks; the CUDA attention takes at "
                    "most ", kMaxAttentionChunks, " (use a larger blocks_per_chunk)");
  PKV_CHECK_VALUE(p.head_dim() <= 256 && p.head_dim() % 8 == 0, "the CUDA attention needs head_dim <= 256 and a "
                    "multiple of 8, got ", p.head_dim());
  // The kernels read a tail token's 8 channels in one 16-byte load: a tail whose base or strides would
  // break that alignment (an odd view) is copied first (head_dim is a multiple of 8, so a fresh
  // contiguous copy is aligned).
  const auto align_tail = [](at::Tensor& t, const void*& ptr, int64_t* stride) {
    int64_t bits = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
    for (int i = 0; i < 3; ++i) bits |= t.stride(i) * t.element_size();
    if ((bits & 15) == 0) return;
    t = t.clone(at::MemoryFormat::Contiguous);
    ptr = t.data_ptr();
    for (int i = 0; i < 3; ++i) stride[i] = t.stride(i);
  };
  if (p.tail_len > 0) {
    align_tail(hold.k_tail, p.k_tail, p.kt_stride);
    align_tail(hold.v_tail, p.v_tail, p.vt_stride);
  }
  if (validate) {
    // prepare_attention pointed the index arrays at host copies: use the device tensors.
    hold.table = block_table.contiguous();
    hold.lens = seq_lens.contiguous();
    p.block_table = hold.table.data_ptr<int32_t>();
    p.seq_lens = hold.lens.data_ptr<int32_t>();
    if (skip.has_value()) {
      hold.skip = skip->contiguous();
      p.skip = hold.skip.data_ptr<int32_t>();
    }
  }
  // Upper bound of entries per sequence without reading seq_lens back (no device sync).
  const int64_t bound = p.max_blocks_per_seq * block_size + p.tail_len;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  attention_cuda_plan(p, bound, sms, num_splits);
  const at::Tensor qc = query.contiguous();
  at::Tensor out = at::empty({p.num_seqs, p.q_len, p.num_q_heads, p.head_dim()}, query.options());
  const auto f32 = query.options().dtype(at::kFloat);
  // The split partials in one allocation: accumulators, then (max, sum) pairs.
  const int64_t partials = p.num_seqs * num_kv_heads * p.num_splits * p.rows();
  at::Tensor acc = at::empty({std::max<int64_t>(1, partials * (p.head_dim() + 2))}, f32);
  p.out = out.data_ptr();
  p.partial_acc = acc.data_ptr<float>();
  p.partial_ml = p.partial_acc + partials * p.head_dim();
  C10_CUDA_CHECK(paged_attention_cuda(p, qc.data_ptr(), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pagedkv, CUDA, m) {
  m.impl("paged_attention", &paged_attention_cuda_op);
  m.impl("append", &append_cuda_op);
  m.impl("gather", &gather_cuda_op);
  m.impl("copy_blocks", &copy_blocks_cuda_op);
}

}  // namespace pagedkv
