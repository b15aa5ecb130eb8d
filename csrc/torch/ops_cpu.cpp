// CPU implementations of the pagedkv ops: check tensors (checks.h), then run the raw-pointer
// kernels under at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"

namespace pagedkv {
namespace {

void append_cpu_op(const at::Tensor& src, at::TensorList pages, const at::Tensor& slot_mapping,
                   int64_t format, int64_t role, int64_t group, int64_t block_size,
                   int64_t blocks_per_chunk) {
  ChunkList holder;
  at::Tensor slots;
  const AppendParams p = prepare_append(src, pages, slot_mapping, format, role, group, block_size,
                                        blocks_per_chunk, holder, slots);
  at::parallel_for(0, append_work_items(p), 16, [&](int64_t b, int64_t e) { append_cpu(p, b, e); });
}

at::Tensor gather_cpu_op(at::TensorList pages, const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& skip, int64_t format, int64_t role, int64_t group,
                         int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads, int64_t head_dim,
                         int64_t out_len, at::ScalarType dtype) {
  ChunkList holder;
  std::vector<at::Tensor> keep;
  GatherParams p = prepare_gather(pages, block_table, seq_lens, skip, format, role, group, block_size,
                                  blocks_per_chunk, num_kv_heads, head_dim, out_len, dtype, holder, keep);
  at::Tensor out = at::empty({p.num_seqs, num_kv_heads, out_len, head_dim}, block_table.options().dtype(dtype));
  p.out = out.data_ptr();
  at::parallel_for(0, p.num_seqs * num_kv_heads, 1, [&](int64_t b, int64_t e) { gather_cpu(p, b, e); });
  return out;
}

void copy_blocks_cpu_op(at::TensorList pages, const at::Tensor& pairs, int64_t block_bytes, int64_t blocks_per_chunk) {
  PKV_CHECK_TYPE(pairs.scalar_type() == at::kLong, "pairs must be int64, got ", pairs.scalar_type());
  PKV_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be [num_pairs, 2], got shape ", pairs.sizes());
  PKV_CHECK_VALUE(block_bytes > 0, "block_bytes must be positive, got ", block_bytes);
  PageLayout layout;
  layout.block_bytes = block_bytes;
  ChunkList holder;
  const PagedView view = make_view(pages, layout, blocks_per_chunk, pairs.device(), holder);
  const at::Tensor pc = pairs.contiguous();
  translate_errors([&] { copy_blocks_cpu(view, pc.data_ptr<int64_t>(), pc.size(0)); });
}

at::Tensor paged_attention_cpu_op(const at::Tensor& query, at::TensorList k_pages, at::TensorList v_pages,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& k_tail,
                                  const std::optional<at::Tensor>& v_tail, const std::optional<at::Tensor>& kv_mask,
                                  int64_t mask_offset, int64_t k_format, int64_t v_format, int64_t k_group,
                                  int64_t v_group, int64_t block_size, int64_t blocks_per_chunk, int64_t num_kv_heads,
                                  double scale, double softcap, int64_t window, int64_t num_splits) {
  PKV_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  AttentionHold hold;
  AttentionParams p = prepare_attention(query, k_pages, v_pages, block_table, seq_lens, skip, k_tail, v_tail, kv_mask,
                                        mask_offset, k_format, v_format, k_group, v_group, block_size,
                                        blocks_per_chunk, num_kv_heads, scale, softcap, window, hold, true);
  const int64_t n = p.max_entries();
  if (num_splits > 0) {
    attention_plan(p, n, p.num_seqs * num_kv_heads * num_splits, 1);
  } else {
    attention_plan(p, n, 2 * at::get_num_threads(), 512);
  }
  at::Tensor out = at::empty({p.num_seqs, p.q_len, p.num_q_heads, p.head_dim()}, query.options());
  p.out = out.data_ptr();
  at::Tensor acc, ml;
  if (p.num_splits > 1) {
    acc = at::empty({p.num_seqs * num_kv_heads * p.num_splits * p.rows() * p.head_dim()}, query.options().dtype(at::kFloat));
    ml = at::empty({p.num_seqs * num_kv_heads * p.num_splits * p.rows() * 2}, query.options().dtype(at::kFloat));
    p.partial_acc = acc.data_ptr<float>();
    p.partial_ml = ml.data_ptr<float>();
  }
  at::parallel_for(0, attention_work_items(p), 1, [&](int64_t b, int64_t e) { attention_cpu(p, b, e); });
  if (p.num_splits > 1) {
    at::parallel_for(0, p.num_seqs * num_kv_heads, 1, [&](int64_t b, int64_t e) { attention_merge_cpu(p, b, e); });
  }
  return out;
}

bool all_finite_one(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "all_finite", [&] {
    const scalar_t* x = c.const_data_ptr<scalar_t>();
    const int64_t n = c.numel();
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(static_cast<float>(x[i]));
    ok = !bad;
  });
  return ok;
}

bool all_finite_cpu_op(const at::Tensor& a, const at::Tensor& b) { return all_finite_one(a) && all_finite_one(b); }

}  // namespace

TORCH_LIBRARY_IMPL(pagedkv, CPU, m) {
  m.impl("all_finite", &all_finite_cpu_op);
  m.impl("paged_attention", &paged_attention_cpu_op);
  m.impl("append", &append_cpu_op);
  m.impl("gather", &gather_cpu_op);
  m.impl("copy_blocks", &copy_blocks_cpu_op);
}

}  // namespace pagedkv
