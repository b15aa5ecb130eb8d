// CPU paged attention through raw pointers (run under ASan/UBSan by scripts/test.sh), against a
// naive fp32 attention over rows decoded with the scalar reference codec.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "attention_cpu.h"

using namespace pagedkv;

namespace {
struct Pages {
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<uint8_t*> ptrs;
  std::vector<int64_t> sizes;
  PagedView view;
  Pages(const PageLayout& L, int num_chunks, int bpc) {
    for (int c = 0; c < num_chunks; ++c) chunks.emplace_back(static_cast<size_t>(bpc) * L.block_bytes, 0xff);
    for (auto& c : chunks) {
      ptrs.push_back(c.data());
      sizes.push_back(bpc);
    }
    view.layout = L;
    view.chunks = ptrs.data();
    view.num_chunks = num_chunks;
    view.blocks_per_chunk = bpc;
    view.chunk_blocks = sizes.data();
  }
  void write(const std::vector<float>& x, const std::vector<int64_t>& slots, int H, int D) {
    AppendParams ap;
    ap.src = x.data();
    ap.num_tokens = static_cast<int64_t>(slots.size());
    ap.token_stride = H * D;
    ap.head_stride = D;
    ap.slot_mapping = slots.data();
    ap.dst = view;
    append_validate(ap);
    append_cpu(ap, 0, append_work_items(ap));
  }
};
}  // namespace

TEST_CASE("CPU paged attention matches naive attention on decoded rows, with splits, window and mask") {
  const int H = 2, G = 3, D = 64, BS = 16, T = 80, LQ = 2;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (Format f : {Format::kBF16, Format::kInt8, Format::kFP8E4M3, Format::kInt4, Format::kInt2, Format::kNF4}) {
    const int kgroup = is_grouped(f) ? 16 : 1;
    const int vgroup = is_grouped(f) ? (f == Format::kInt2 ? 32 : 64) : 1;
    const PageLayout KL = make_page_layout(f, Role::kKey, H, D, BS, kgroup);
    const PageLayout VL = make_page_layout(f, Role::kValue, H, D, BS, vgroup);
    Pages kp(KL, 3, 3), vp(VL, 3, 3);
    std::vector<float> k(T * H * D), v(T * H * D);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    const int32_t table[5] = {7, 2, 5, 0, 8};  // scattered blocks
    std::vector<int64_t> slots(T);
    for (int t = 0; t < T; ++t) slots[t] = static_cast<int64_t>(table[t / BS]) * BS + t % BS;
    kp.write(k, slots, H, D);
    vp.write(v, slots, H, D);

    const int skip = 5, plen = T - skip - 3;  // entries: positions [5, 77) of the table row
    const int tail = 3;
    std::vector<float> kt(H * tail * D), vt(H * tail * D), q(H * G * LQ * D);
    for (auto& x : kt) x = nd(rng);
    for (auto& x : vt) x = nd(rng);
    for (auto& x : q) x = nd(rng);
    std::vector<uint8_t> mask(200, 1);
    mask[20 + 4] = mask[20 + 31] = 0;

    AttentionParams p;
    p.k = kp.view;
    p.v = vp.view;
    p.block_table = table;
    p.max_blocks_per_seq = 5;
    const int32_t lens[1] = {plen}, skips[1] = {skip};
    p.seq_lens = lens;
    p.skip = skips;
    p.query = q.data();
    p.q_stride[0] = H * G * LQ * D;
    p.q_stride[1] = LQ * D;
    p.q_stride[2] = D;
    p.k_tail = kt.data();
    p.v_tail = vt.data();
    p.kt_stride[0] = p.vt_stride[0] = H * tail * D;
    p.kt_stride[1] = p.vt_stride[1] = tail * D;
    p.kt_stride[2] = p.vt_stride[2] = D;
    p.tail_len = tail;
    p.kv_mask = mask.data();
    p.mask_stride = 200;
    p.mask_len = 200;
    p.mask_offset = 20;
    p.num_seqs = 1;
    p.num_q_heads = H * G;
    p.q_len = LQ;
    p.scale = 0.125f;
    p.window = 40;
    attention_validate(p);

    // Naive reference over decoded rows.
    const int n = plen + tail;
    std::vector<float> ref(LQ * H * G * D, 0.0f), row(D);
    std::vector<float> K(static_cast<size_t>(H) * n * D), V(static_cast<size_t>(H) * n * D);
    for (int h = 0; h < H; ++h) {
      for (int e = 0; e < n; ++e) {
        float* kr = &K[(static_cast<size_t>(h) * n + e) * D];
        float* vr = &V[(static_cast<size_t>(h) * n + e) * D];
        if (e < plen) {
          const int pos = skip + e;
          decode_token(KL, kp.view.head_ptr(table[pos / BS], h), pos % BS, kr);
          decode_token(VL, vp.view.head_ptr(table[pos / BS], h), pos % BS, vr);
        } else {
          for (int d = 0; d < D; ++d) {
            kr[d] = kt[(h * tail + e - plen) * D + d];
            vr[d] = vt[(h * tail + e - plen) * D + d];
          }
        }
      }
      for (int j = 0; j < G; ++j) {
        for (int t = 0; t < LQ; ++t) {
          const int hi = n - LQ + t, lo = std::max(hi - 40 + 1, 0);
          std::vector<double> s(n, -INFINITY);
          double mx = -INFINITY;
          for (int e = lo; e <= hi; ++e) {
            if (!mask[20 + e]) continue;
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += double(q[((h * G + j) * LQ + t) * D + d]) * K[(size_t(h) * n + e) * D + d];
            s[e] = dot * 0.125;
            mx = std::max(mx, s[e]);
          }
          double sum = 0;
          std::vector<double> acc(D, 0.0);
          for (int e = lo; e <= hi; ++e) {
            if (s[e] == -INFINITY) continue;
            const double w = std::exp(s[e] - mx);
            sum += w;
            for (int d = 0; d < D; ++d) acc[d] += w * V[(size_t(h) * n + e) * D + d];
          }
          for (int d = 0; d < D; ++d) ref[((t * H * G) + h * G + j) * D + d] = float(acc[d] / sum);
        }
      }
    }
    for (int64_t splits : {1, 3}) {
      attention_plan(p, p.max_entries(), splits == 1 ? 1 : 1 * H * splits, 1);
      std::vector<float> out(ref.size(), NAN), acc, ml;
      acc.resize(static_cast<size_t>(H) * p.num_splits * p.rows() * D);
      ml.resize(static_cast<size_t>(H) * p.num_splits * p.rows() * 2);
      p.out = out.data();
      p.partial_acc = acc.data();
      p.partial_ml = ml.data();
      attention_cpu(p, 0, attention_work_items(p));
      if (p.num_splits > 1) attention_merge_cpu(p, 0, H);
      for (size_t i = 0; i < ref.size(); ++i) REQUIRE(out[i] == Approx(ref[i]).margin(2e-5).epsilon(1e-4));
    }
  }
}

TEST_CASE("attention_validate names the bad field") {
  const PageLayout L = make_page_layout(Format::kBF16, Role::kKey, 1, 64, 16, 1);
  Pages kp(L, 1, 2), vp(make_page_layout(Format::kBF16, Role::kValue, 1, 64, 16, 1), 1, 2);
  AttentionParams p;
  p.k = kp.view;
  p.v = vp.view;
  const int32_t table[1] = {5}, lens[1] = {10};
  p.block_table = table;
  p.max_blocks_per_seq = 1;
  p.seq_lens = lens;
  p.num_seqs = 1;
  p.num_q_heads = 1;
  p.q_len = 1;
  CHECK_THROWS_WITH(attention_validate(p), Catch::Contains("block_table[0, 0]=5"));
  const int32_t long_lens[1] = {40};
  p.seq_lens = long_lens;
  CHECK_THROWS_WITH(attention_validate(p), Catch::Contains("needs 3 blocks"));
}
