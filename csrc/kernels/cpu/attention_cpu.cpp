// CPU fused paged attention (see attention_cpu.h). One work item is one (sequence, KV head, split):
// its query rows (every query token of every query head of the KV head's group) are scored against
// each key once, so a KV head is read once for its whole group. Entries are read in tiles of 16
// (attention_tile_cpu.h) whose dequantization is folded into the query, the scores and the
// probabilities; on AVX-512 packed page rows are widened in registers (simd_cpu.h).
#include "attention_cpu.h"
#include "attention_tile_cpu.h"
#include "simd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pagedkv {

int64_t AttentionParams::max_entries() const {
  int64_t n = 0;
  for (int64_t s = 0; s < num_seqs; ++s) n = std::max<int64_t>(n, seq_lens[s] + tail_len);
  return n;
}

void attention_validate(const AttentionParams& p) {
  const PageLayout& K = p.k.layout;
  const PageLayout& V = p.v.layout;
  PKV_CHECK(K.num_kv_heads == V.num_kv_heads && K.head_dim == V.head_dim && K.block_size == V.block_size,
            "key and value layouts disagree: heads ", K.num_kv_heads, "/", V.num_kv_heads, ", head_dim ",
            K.head_dim, "/", V.head_dim, ", block_size ", K.block_size, "/", V.block_size);
  PKV_CHECK(p.num_q_heads > 0 && p.num_q_heads % K.num_kv_heads == 0, "num_q_heads=", p.num_q_heads,
            " must be a positive multiple of num_kv_heads=", K.num_kv_heads);
  PKV_CHECK(p.q_len >= 1, "the query must have at least one token, got q_len=", p.q_len);
  PKV_CHECK(p.tail_len >= 0, "tail_len must be >= 0, got ", p.tail_len);
  PKV_CHECK(p.tail_len == 0 || (p.k_tail && p.v_tail), "tail_len=", p.tail_len, " but no tail tensors");
  PKV_CHECK(std::isfinite(p.scale), "scale must be finite, got ", p.scale);
  PKV_CHECK(std::isfinite(p.softcap), "softcap must be finite, got ", p.softcap);
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t len = p.seq_lens[s];
    const int64_t skip = p.skip ? p.skip[s] : 0;
    PKV_CHECK(len >= 0, "seq_lens[", s, "]=", len, " is negative");
    PKV_CHECK(skip >= 0 && skip < K.block_size, "skip[", s, "]=", skip, " is out of range [0, ", K.block_size, ")");
    const int64_t blocks = len == 0 ? 0 : (skip + len + K.block_size - 1) / K.block_size;
    PKV_CHECK(blocks <= p.max_blocks_per_seq, "seq_lens[", s, "]=", len, " needs ", blocks,
              " blocks but block_table has ", p.max_blocks_per_seq, " columns");
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t id = p.block_table[s * p.max_blocks_per_seq + b];
      PKV_CHECK(p.k.has_block(id) && p.v.has_block(id), "block_table[", s, ", ", b, "]=", id,
                " is not a block of these pages (ids [0, ", std::min(p.k.id_space(), p.v.id_space()), "))");
    }
    if (p.kv_mask) {
      PKV_CHECK(p.mask_offset >= 0 && p.mask_offset + len + p.tail_len <= p.mask_len, "kv_mask has ",
                p.mask_len, " positions but sequence ", s, " needs mask_offset + entries = ", p.mask_offset,
                " + ", len + p.tail_len);
    }
  }
}

void attention_plan(AttentionParams& p, int64_t max_entries, int64_t parallelism, int64_t min_split) {
  const int64_t base = std::max<int64_t>(1, p.num_seqs * p.num_kv_heads());
  int64_t splits = std::max<int64_t>(1, (parallelism + base - 1) / base);
  splits = std::min(splits, std::max<int64_t>(1, max_entries / std::max<int64_t>(1, min_split)));
  int64_t split = (std::max<int64_t>(max_entries, 1) + splits - 1) / splits;
  split = (split + 15) / 16 * 16;
  p.split_tokens = split;
  p.num_splits = std::max<int64_t>(1, (max_entries + split - 1) / split);
}

int64_t attention_work_items(const AttentionParams& p) {
  return p.num_seqs * p.num_kv_heads() * p.num_splits;
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void load_row(const void* base, DType dt, int64_t offset, int D, float* out) {
  switch (dt) {
    case DType::kF32:
      memcpy(out, static_cast<const float*>(base) + offset, sizeof(float) * D);
      return;
    case DType::kBF16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
#pragma omp simd
      for (int d = 0; d < D; ++d) out[d] = bits_float(static_cast<uint32_t>(x[d]) << 16);
      return;
    }
    case DType::kF16: {
      const uint16_t* x = static_cast<const uint16_t*>(base) + offset;
      const float* t = fp16_table();
      for (int d = 0; d < D; ++d) out[d] = t[x[d]];
      return;
    }
  }
}

void store_row(void* base, DType dt, int64_t offset, int D, const float* v) {
  switch (dt) {
    case DType::kF32:
      memcpy(static_cast<float*>(base) + offset, v, sizeof(float) * D);
      return;
    case DType::kBF16: {
      uint16_t* o = static_cast<uint16_t*>(base) + offset;
      for (int d = 0; d < D; ++d) o[d] = bf16_from_float(v[d]);
      return;
    }
    case DType::kF16: {
      uint16_t* o = static_cast<uint16_t*>(base) + offset;
      for (int d = 0; d < D; ++d) o[d] = fp16_from_float(v[d]);
      return;
    }
  }
}

// exp(x) for x <= 0 (x = -inf gives exactly 0), vectorizable: 2^(x log2 e) split into an integer
// power (exponent bits) and a degree-6 polynomial of the fraction; relative error ~1e-7.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float y = x * 1.4426950408889634f;
  const float t = y < -126.0f ? -126.0f : y;  // below: 2^-126 (the result is ~0 anyway)
  const float fi = std::nearbyint(t);  // fraction in [-0.5, 0.5]: Taylor error ~1e-7
  const float f = t - fi;
  const float poly = 1.0f + f * (0.69314718f + f * (0.24022652f + f * (0.05550411f + f * (0.00961813f +
                     f * (0.00133336f + f * 0.00015404f)))));
  const float scale = bits_float(static_cast<uint32_t>(static_cast<int32_t>(fi) + 127) << 23);
  return x == -std::numeric_limits<float>::infinity() ? 0.0f : poly * scale;
}

// With half-precision inputs the probabilities enter the value product rounded to that precision
// (the row sum stays fp32), as FlashAttention and torch's CPU flash kernel do, so results track
// sdpa on the same inputs.
inline float round_p(float x, DType dt) {
  switch (dt) {
    case DType::kBF16: return bf16_to_float(bf16_from_float(x));
    case DType::kF16: return fp16_to_float(fp16_from_float(x));
    default: return x;
  }
}

// Dequantized values are rounded to the model's dtype, as the dense path (gather to that dtype)
// and transformers' quantized caches do, so fused and dense decoding see the same K/V.
void round_row(float* x, int D, DType dt) {
  if (dt == DType::kBF16) {
#pragma omp simd
    for (int d = 0; d < D; ++d) {  // round to nearest even; dequantized values are finite
      const uint32_t u = float_bits(x[d]);
      x[d] = bits_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
    }
  } else {
    for (int d = 0; d < D; ++d) x[d] = fp16_to_float(fp16_from_float(x[d]));
  }
}

// Loads the key or value rows of entries [e, e + n) of sequence s, KV head h (one tile): page rows
// as raw tiles, tail rows as plain fp32 tiles. With a half-precision model dtype page rows are
// dequantized and rounded to it, as the dense path (gather to that dtype) and transformers'
// quantized caches do, so fused and dense decoding see the same K/V.
template <int DC>
class TileSource {
 public:
  TileSource(const AttentionParams& p, const PagedView& view, const void* tail, const int64_t* tail_stride)
      : p_(p), view_(view), tail_(tail), stride_(tail_stride), dec_(view.layout), rows_(kTile * view.layout.head_dim) {}

  RawTile load(int64_t s, int64_t h, int64_t e, int n) {
    const int D = DC > 0 ? DC : static_cast<int>(view_.layout.head_dim);
    const int64_t plen = p_.seq_lens[s];
    if (e >= plen) {
      for (int t = 0; t < n; ++t)
        load_row(tail_, p_.dtype, s * stride_[0] + h * stride_[1] + (e - plen + t) * stride_[2], D, &rows_[t * D]);
      RawTile tile;
      tile.codes = rows_.data();
      tile.unit = D;
      return tile;
    }
    const int64_t pos = (p_.skip ? p_.skip[s] : 0) + e;
    const int64_t bs = view_.layout.block_size;
    RawTile tile = dec_.template decode<DC>(
        view_.head_ptr(p_.block_table[s * p_.max_blocks_per_seq + pos / bs], h), pos % bs, n);
    if (p_.dtype != DType::kF32 && !is_passthrough(view_.layout.format)) {
      tile.template dequantize<DC>(n, D, rows_.data());
      round_row(rows_.data(), n * D, p_.dtype);
    }
    return tile;
  }

  // Zeroes the rows t < n of the tile whose entry e + t is masked out (they may hold anything).
  void zero_masked(RawTile& tile, const uint8_t* mask, int64_t e, int n) {
    const int D = DC > 0 ? DC : static_cast<int>(view_.layout.head_dim);
    if (tile.kind != RowKind::kFloat) {
      tile.template materialize<DC>(n, rows_.data());
    } else if (tile.codes != rows_.data()) {
      memcpy(rows_.data(), tile.codes, sizeof(float) * D * n);
      tile.codes = rows_.data();
    }
    for (int t = 0; t < n; ++t)
      if (!mask[e + t]) std::fill(&rows_[t * D], &rows_[t * D] + D, 0.0f);
  }

 private:
  const AttentionParams& p_;
  const PagedView& view_;
  const void* tail_;
  const int64_t* stride_;
  TileDecoder dec_;
  std::vector<float> rows_;
};

// Software prefetch of the page blocks ahead of the tiles being read: a work item walks its blocks
// in table order, which the hardware prefetchers cannot follow across scattered blocks, and in a
// model the pages are cold (the layer's weights pass through the caches between two calls).
class BlockPrefetcher {
 public:
  BlockPrefetcher(const AttentionParams& p, int64_t s, int64_t h, int64_t e)
      : p_(p), s_(s), h_(h), bs_(p.k.layout.block_size), skip_(p.skip ? p.skip[s] : 0), next_((skip_ + e) / bs_) {
    end_ = p.seq_lens[s] == 0 ? 0 : (skip_ + p.seq_lens[s] + bs_ - 1) / bs_;
  }

  // Prefetches the blocks up to the one holding entry e + ahead (ahead: 256 entries, at least two blocks).
  void advance(int64_t e) {
    const int64_t until = std::min(end_, (skip_ + e + std::max<int64_t>(256, 2 * bs_)) / bs_ + 1);
    for (; next_ < until; ++next_) {
      const int32_t id = p_.block_table[s_ * p_.max_blocks_per_seq + next_];
      fetch(p_.k.head_ptr(id, h_), p_.k.layout.head_bytes);
      fetch(p_.v.head_ptr(id, h_), p_.v.layout.head_bytes);
    }
  }

 private:
  static void fetch(const uint8_t* x, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(x + o, 0, 3);
  }
  const AttentionParams& p_;
  int64_t s_, h_, bs_, skip_, next_, end_;
};

// Length of the tile starting at entry e of sequence s, below e1: inside one block and one key group.
int64_t tile_len(const AttentionParams& p, int64_t s, int64_t e, int64_t e1) {
  const int64_t plen = p.seq_lens[s];
  if (e >= plen) return std::min<int64_t>(kTile, e1 - e);
  const PageLayout& K = p.k.layout;
  const int64_t off = ((p.skip ? p.skip[s] : 0) + e) % K.block_size;
  const int64_t unit = is_grouped(K.format) ? K.group : K.block_size;
  return std::min<int64_t>({kTile, e1 - e, plen - e, unit - off % unit});
}

// Dot product of two head_dim rows. With a compile-time head dim (a multiple of 16) the partial
// sums stay in one 16-lane vector and are reduced as a tree: the generic simd reduction compiled
// to an in-order chain of scalar adds, 16 dependent adds per dot.
template <int DC>
float dot(const float* a, const float* b, int D_) {
  if constexpr (DC > 0 && DC % 16 == 0) {
    constexpr int W = 16;
    float acc[W] = {};
    for (int c = 0; c < DC; c += W) {
#pragma omp simd
      for (int i = 0; i < W; ++i) acc[i] += a[c + i] * b[c + i];
    }
#pragma GCC unroll 4
    for (int w = W / 2; w > 0; w /= 2) {
#pragma omp simd
      for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
    }
    return acc[0];
  } else {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < D_; ++d) s += a[d] * b[d];
    return s;
  }
}

// Rows of the query handled together by the vector paths: their DC / 16 vectors each stay in
// registers while one tile row (key or value) is loaded once for all of them.
template <int DC>
constexpr int kRowBlock = DC >= 256 ? 1 : 256 / DC;
// Query rows scored per widened key row: the query is read from L1 (FMA memory operands), so the
// key row is widened once for up to 8 rows (every decode GQA group) whatever the head dim.
constexpr int kScoreRows = 8;

// Calls f with the tile's row kind as a compile-time constant (kFloat only off the packed path).
template <int DC, typename F>
void with_row_kind(const RawTile& x, F&& f) {
  using K = RowKind;
  if constexpr (kPackedRows<DC>) {
    switch (x.kind) {
      case K::kBF16: return f(std::integral_constant<K, K::kBF16>{});
      case K::kF16: return f(std::integral_constant<K, K::kF16>{});
      case K::kInt8: return f(std::integral_constant<K, K::kInt8>{});
      case K::kFp8: return f(std::integral_constant<K, K::kFp8>{});
      case K::kU4: return f(std::integral_constant<K, K::kU4>{});
      case K::kNF4: return f(std::integral_constant<K, K::kNF4>{});
      case K::kU2: return f(std::integral_constant<K, K::kU2>{});
      case K::kFloat: break;
    }
  }
  f(std::integral_constant<K, K::kFloat>{});
}

// sc[r * sc_stride + t] = dot(q[r], x[t]) for the rows r < R and the n <= kTile tile rows t (the
// vector path writes all kTile slots of each row).
template <RowKind K, int DC>
void tile_scores(const float* q, int64_t R, const RawTile& x, int n, int D_, float* sc, int64_t sc_stride) {
  if constexpr (kVectorRows<DC>) {
    // fp32 rows cost nothing to reload, so their query rows stay in registers (a block of them);
    // packed rows are widened once for up to kScoreRows query rows read from L1.
    constexpr bool kRegQ = K == RowKind::kFloat;
    constexpr int C = DC / 16, RB = kRegQ ? kRowBlock<DC> : kScoreRows;
    for (int64_t r0 = 0; r0 < R; r0 += RB) {
      const int rb = static_cast<int>(std::min<int64_t>(RB, R - r0));
      f32x16 qv[kRegQ ? RB : 1][C], part[RB][kTile];
      if constexpr (kRegQ) {
        for (int i = 0; i < RB; ++i)
          for (int c = 0; c < C; ++c) qv[i][c] = i < rb ? load16(q + (r0 + i) * DC + 16 * c) : f32x16{};
      }
      for (int t = 0; t < kTile; ++t) {
        if (t >= n) {
          for (int i = 0; i < RB; ++i) part[i][t] = f32x16{};
          continue;
        }
        f32x16 k[C];
        x.row_chunks<K, DC>(t, k);
        for (int i = 0; i < RB && i < rb; ++i) {
          f32x16 a0, a1{};
          if constexpr (kRegQ) {
            a0 = qv[i][0] * k[0];
            for (int c = 1; c < C; ++c) (c % 2 ? a1 : a0) += qv[i][c] * k[c];
          } else {
            const float* qi = q + (r0 + i) * DC;
            a0 = load16(qi) * k[0];
            for (int c = 1; c < C; ++c) (c % 2 ? a1 : a0) += load16(qi + 16 * c) * k[c];
          }
          part[i][t] = a0 + a1;
        }
      }
      for (int i = 0; i < rb; ++i) store16(sc + (r0 + i) * sc_stride, sum_lanes16(part[i]));
    }
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int t = 0; t < n; ++t) sc[r * sc_stride + t] = dot<DC>(q + r * D_, x.codes + t * D_, D_);
  }
}

// acc[r][d] += sum over t < n of w[r * w_stride + u * kTile + t] * x[t][d], u = d / unit, for the
// rows r < R. On the vector path each tile row is widened once for a block of rows whose
// accumulators stay in registers across the tile.
template <RowKind K, int DC>
void accumulate(float* acc, int64_t R, const float* w, int64_t w_stride, const RawTile& x, int n, int D_) {
  const int D = DC > 0 ? DC : D_;
  const int units = x.units, unit = x.unit;
  if constexpr (kVectorRows<DC>) {
    if (unit % 16 == 0) {
      constexpr int C = DC / 16, RB = kRowBlock<DC>;
      int cu[C];  // unit of each 16-channel chunk
      for (int c = 0; c < C; ++c) cu[c] = chunk_channel<K>(c, 0) / unit;
      for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int rb = static_cast<int>(std::min<int64_t>(RB, R - r0));
        f32x16 a[RB][C];
        for (int i = 0; i < RB; ++i)
          for (int c = 0; c < C; ++c) a[i][c] = i < rb ? load16(acc + (r0 + i) * DC + 16 * c) : f32x16{};
        for (int t = 0; t < n; ++t) {
          f32x16 v[C];
          x.row_chunks<K, DC>(t, v);
          for (int i = 0; i < RB && i < rb; ++i) {
            const float* wt = w + (r0 + i) * w_stride + t;
            if (units == 1) {
              const f32x16 ws = splat16(wt[0]);
              for (int c = 0; c < C; ++c) a[i][c] += ws * v[c];
            } else {
              for (int c = 0; c < C; ++c) a[i][c] += splat16(wt[cu[c] * kTile]) * v[c];
            }
          }
        }
        for (int i = 0; i < rb; ++i)
          for (int c = 0; c < C; ++c) store16(acc + (r0 + i) * DC + 16 * c, a[i][c]);
      }
      return;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int t = 0; t < n; ++t) {
      for (int u = 0; u < units; ++u) {
        const float wt = w[r * w_stride + u * kTile + t];
        const float* c = x.codes + t * D;
        float* ar = acc + r * D;
#pragma omp simd
        for (int d = u * unit; d < (u + 1) * unit; ++d) ar[d] += wt * c[d];
      }
    }
  }
}

// The softmax runs over chunks of kChunk entries (aligned to multiples of kChunk): the scores of a
// chunk's tiles first, then one max per row, then the chunk's values. With a half-precision model
// dtype the probabilities are rounded to it relative to that max, as torch's CPU flash attention
// does over its key blocks of 512, so decoding short contexts matches sdpa token for token.
constexpr int64_t kChunk = 512;
constexpr int64_t kScStride = kChunk + kTile;  // score row stride: the last tile's store spills over

// One work item (sequence, KV head, split): a flash-attention pass over chunks with a running
// (max, sum, accumulator) per query row; the accumulators are rescaled only when a row's max grows.
// Dequantization is folded: per-channel key parameters into the query (once per key group), the
// per-token key scale into the scores, per-token value parameters into the probabilities, with the
// value zero points summed per row and unit (zacc) and added at the end.
template <int DC>
void attention_items(const AttentionParams& p, int64_t begin, int64_t end) {
  const int D = DC > 0 ? DC : static_cast<int>(p.head_dim());
  const int64_t H = p.num_kv_heads();
  const int64_t G = p.group_size();
  const int64_t R = p.rows();
  const PageLayout& VL = p.v.layout;
  const int vunits = is_grouped(VL.format) ? D / VL.group : 1;
  // q: scaled query rows in channel order; qp: in the lane order of permuted row kinds; qf: folded
  // with a key group's per-channel parameters. accp: value accumulators in lane order.
  std::vector<float> q(R * D), qp(R * D), qf(R * D), qa(R), acc(R * D), accp(R * D), zacc(R * vunits);
  std::vector<float> sc(R * kScStride), w(R * kTile * vunits), chm(D);  // w: only value tiles with per-token scales
  std::vector<float> m(R), l(R), buf(D);
  std::vector<int64_t> lo(R), hi(R);
  struct ChunkTile {
    int len;
    bool masked;
  };
  std::vector<ChunkTile> tiles;
  TileSource<DC> keys(p, p.k, p.k_tail, p.kt_stride), values(p, p.v, p.v_tail, p.vt_stride);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t split = item % p.num_splits;
    const int64_t h = (item / p.num_splits) % H;
    const int64_t s = item / (p.num_splits * H);
    const int64_t n = p.seq_lens[s] + p.tail_len;
    // Rows: r = t * G + j is query token t of query head h * G + j.
    int64_t row_lo = n, row_hi = -1, common_lo = 0, common_hi = n;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = r / G, j = r % G;
      hi[r] = n - p.q_len + t;
      lo[r] = p.window > 0 ? std::max<int64_t>(hi[r] - p.window + 1, 0) : 0;
      row_lo = std::min(row_lo, lo[r]);
      row_hi = std::max(row_hi, hi[r]);
      common_lo = std::max(common_lo, lo[r]);
      common_hi = std::min(common_hi, hi[r]);
      load_row(p.query, p.dtype, s * p.q_stride[0] + (h * G + j) * p.q_stride[1] + t * p.q_stride[2], D, &q[r * D]);
      for (int d = 0; d < D; ++d) q[r * D + d] *= p.scale;
    }
    const int64_t e0 = std::max(split * p.split_tokens, row_lo);
    const int64_t e1 = std::min({(split + 1) * p.split_tokens, n, row_hi + 1});
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(accp.begin(), accp.end(), 0.0f);
    std::fill(zacc.begin(), zacc.end(), 0.0f);
    bool qp_ready = false;
    RowKind vperm = RowKind::kFloat;  // the permuted kind accumulated into accp, if any
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.0f);
    int64_t q_version = -1;  // key group whose parameters qf / qa hold
    const uint8_t* mask = p.kv_mask ? p.kv_mask + s * p.mask_stride + p.mask_offset : nullptr;
    BlockPrefetcher prefetch(p, s, h, e0);
    for (int64_t c0 = e0; c0 < e1;) {
      const int64_t c1 = std::min(e1, (c0 / kChunk + 1) * kChunk);
      tiles.clear();  // pass 1's tiles (length, any entry masked out), walked again by pass 2
      // Pass 1: the chunk's scores, tile by tile.
      for (int64_t e = c0; e < c1;) {
        const int nt = static_cast<int>(tile_len(p, s, e, c1));
        tiles.push_back({nt, false});
        prefetch.advance(e);
        float* st = &sc[e - c0];  // row r at st[r * kScStride]
        const RawTile kt = keys.load(s, h, e, nt);
        with_row_kind<DC>(kt, [&](auto k) {
          constexpr RowKind K = decltype(k)::value;
          const float* qk = q.data();  // query rows in the channel order of the tile's chunks
          if constexpr (kPermuted<K>) {
            if (!qp_ready) {
              for (int64_t r = 0; r < R; ++r)
                for (int j = 0; j < D; ++j) qp[r * D + j] = q[r * D + chunk_channel<K>(j / 16, j % 16)];
              qp_ready = true;
            }
            qk = qp.data();
          }
          if (kt.ch_mul || kt.ch_add) {  // page tiles of a call share one kind, so one cache suffices
            if (kt.ch_version != q_version) {
              q_version = kt.ch_version;
              const float* cm = kt.ch_mul;
              if (cm && kPermuted<K>) {
                for (int j = 0; j < D; ++j) chm[j] = cm[chunk_channel<K>(j / 16, j % 16)];
                cm = chm.data();
              }
              for (int64_t r = 0; r < R; ++r) {
                if (cm) {
#pragma omp simd
                  for (int j = 0; j < D; ++j) qf[r * D + j] = qk[r * D + j] * cm[j];
                } else {
                  std::copy(qk + r * D, qk + (r + 1) * D, &qf[r * D]);
                }
                qa[r] = kt.ch_add ? dot<DC>(&q[r * D], kt.ch_add, D) : 0.0f;
              }
            }
            qk = qf.data();
          }
          tile_scores<K, DC>(qk, R, kt, nt, D, st, kScStride);
        });
        for (int64_t r = 0; r < R; ++r) {
          float* sr = st + r * kScStride;
          if (kt.tok_mul) {
            for (int t = 0; t < nt; ++t) sr[t] *= kt.tok_mul[t];
          }
          if (kt.ch_add) {
            for (int t = 0; t < nt; ++t) sr[t] += qa[r];
          }
          if (p.softcap > 0.0f) {
            for (int t = 0; t < nt; ++t) sr[t] = p.softcap * std::tanh(sr[t] / p.softcap);
          }
        }
        // Masking: rows outside their [lo, hi] range (chunk causality, window), entries masked out.
        if (e < common_lo || e + nt - 1 > common_hi) {
          for (int64_t r = 0; r < R; ++r)
            for (int t = 0; t < nt; ++t)
              if (e + t < lo[r] || e + t > hi[r]) st[r * kScStride + t] = kNegInf;
        }
        if (mask) {
          for (int t = 0; t < nt; ++t) {
            if (mask[e + t]) continue;
            tiles.back().masked = true;
            for (int64_t r = 0; r < R; ++r) st[r * kScStride + t] = kNegInf;
          }
        }
        e += nt;
      }
      // Softmax over the chunk, against each row's running max.
      const int64_t len = c1 - c0;
      for (int64_t r = 0; r < R; ++r) {
        float* sr = &sc[r * kScStride];
        float mx = kNegInf;
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < len; ++i) mx = sr[i] > mx ? sr[i] : mx;
        if (mx == kNegInf) {  // nothing visible to this row in the chunk
          std::fill(sr, sr + len, 0.0f);
          continue;
        }
        if (mx > m[r]) {
          const float c = exp_nonpositive(m[r] - mx);
          l[r] *= c;
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[r * D + d] *= c;
#pragma omp simd
          for (int d = 0; d < D; ++d) accp[r * D + d] *= c;
          for (int u = 0; u < vunits; ++u) zacc[r * vunits + u] *= c;
          m[r] = mx;
        }
        const float mr = m[r];
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) {
          const float x = exp_nonpositive(sr[i] - mr);
          sr[i] = x;
          sum += x;
        }
        if (p.dtype != DType::kF32) {
          for (int64_t i = 0; i < len; ++i) sr[i] = round_p(sr[i], p.dtype);
        }
        l[r] += sum;
      }
      // Pass 2: the chunk's values, weighted by the probabilities.
      int64_t e = c0;
      for (const ChunkTile& tile : tiles) {
        const int nt = tile.len;
        const float* pt = &sc[e - c0];  // row r at pt[r * kScStride]
        RawTile vt = values.load(s, h, e, nt);
        // Masked-out entries may hold anything: keep them out of the product entirely.
        if (tile.masked) values.zero_masked(vt, mask, e, nt);
        const int units = vt.units;
        const float* wv = pt;  // weights per (row, unit, token)
        int64_t w_stride = kScStride;
        for (int64_t r = 0; r < R; ++r) {
          const float* pr = pt + r * kScStride;
          for (int u = 0; vt.tok_mul && u < units; ++u) {
            float* wr = &w[(r * units + u) * kTile];
            const float* mu = vt.tok_mul + u * kTile;
#pragma omp simd
            for (int t = 0; t < kTile; ++t) wr[t] = pr[t] * mu[t];  // slots t >= nt are unused
          }
          for (int u = 0; vt.tok_add && u < units; ++u) {
            const float* ad = vt.tok_add + u * kTile;
            float z = 0.0f;
#pragma omp simd reduction(+ : z)
            for (int t = 0; t < nt; ++t) z += pr[t] * ad[t];
            zacc[r * vunits + u] += z;
          }
        }
        if (vt.tok_mul) {
          wv = w.data();
          w_stride = kTile * units;
        }
        with_row_kind<DC>(vt, [&](auto k) {
          constexpr RowKind K = decltype(k)::value;
          if constexpr (kPermuted<K>) vperm = K;
          accumulate<K, DC>(kPermuted<K> ? accp.data() : acc.data(), R, wv, w_stride, vt, nt, D);
        });
        e += nt;
      }
      c0 = c1;
    }
    if (vperm != RowKind::kFloat) {  // lane-order accumulators back to channel order
      const bool u2 = vperm == RowKind::kU2;  // kU4 and kNF4 share one order
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < D; ++j)
          acc[r * D + (u2 ? chunk_channel<RowKind::kU2>(j / 16, j % 16) : chunk_channel<RowKind::kU4>(j / 16, j % 16))] +=
              accp[r * D + j];
    }
    if (is_grouped(VL.format)) {  // value zero points, summed per unit
      for (int64_t r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) acc[r * D + d] += zacc[r * vunits + d / (D / vunits)];
    }
    if (p.num_splits == 1) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r / G, j = r % G;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < D; ++d) buf[d] = acc[r * D + d] * inv;
        store_row(p.out, p.dtype, ((s * p.q_len + t) * p.num_q_heads + h * G + j) * D, D, buf.data());
      }
    } else {
      const int64_t base = (s * H + h) * p.num_splits + split;
      memcpy(p.partial_acc + base * R * D, acc.data(), sizeof(float) * R * D);
      for (int64_t r = 0; r < R; ++r) {
        p.partial_ml[(base * R + r) * 2] = m[r];
        p.partial_ml[(base * R + r) * 2 + 1] = l[r];
      }
    }
  }
}

}  // namespace

void attention_cpu(const AttentionParams& p, int64_t begin, int64_t end) {
  switch (p.head_dim()) {
    case 64: return attention_items<64>(p, begin, end);
    case 128: return attention_items<128>(p, begin, end);
    case 256: return attention_items<256>(p, begin, end);
    default: return attention_items<0>(p, begin, end);
  }
}

void attention_merge_cpu(const AttentionParams& p, int64_t begin, int64_t end) {
  const int D = static_cast<int>(p.head_dim());
  const int64_t H = p.num_kv_heads();
  const int64_t G = p.group_size();
  const int64_t R = p.rows();
  std::vector<float> row(D);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t s = w / H, h = w % H;
    for (int64_t r = 0; r < R; ++r) {
      float mx = kNegInf;
      for (int64_t k = 0; k < p.num_splits; ++k)
        mx = std::max(mx, p.partial_ml[(((w * p.num_splits) + k) * R + r) * 2]);
      std::fill(row.begin(), row.end(), 0.0f);
      float sum = 0.0f;
      if (mx != kNegInf) {
        for (int64_t k = 0; k < p.num_splits; ++k) {
          const int64_t base = (w * p.num_splits + k) * R + r;
          const float mk = p.partial_ml[base * 2];
          if (mk == kNegInf) continue;
          const float c = exp_nonpositive(mk - mx);
          sum += c * p.partial_ml[base * 2 + 1];
          const float* a = p.partial_acc + base * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) row[d] += c * a[d];
        }
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int d = 0; d < D; ++d) row[d] *= inv;
      const int64_t t = r / G, j = r % G;
      store_row(p.out, p.dtype, ((s * p.q_len + t) * p.num_q_heads + h * G + j) * D, D, row.data());
    }
  }
}

}  // namespace pagedkv
