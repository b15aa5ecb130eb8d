// CPU fused paged attention (see attention_cpu.h). One work item is one (sequence, KV head, split):
// its query rows (every query token of every query head of the KV head's group) are scored against
// each key once, so a KV head is read once for its whole group. Keys are dequantized one row at a
// time into a small fp32 buffer by format-specialized loops the compiler vectorizes; grouped-key
// scales are unpacked once per key group.
#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

const float* fp8_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(256);
    for (int i = 0; i < 256; ++i) v[i] = fp8e4m3_to_float(static_cast<uint8_t>(i));
    return v;
  }();
  return t.data();
}
const float* fp16_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(65536);
    for (int i = 0; i < 65536; ++i) v[i] = fp16_to_float(static_cast<uint16_t>(i));
    return v;
  }();
  return t.data();
}

inline float load_scalar(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return fp16_table()[static_cast<const uint16_t*>(base)[i]];
  }
}

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
inline float exp_nonpositive(float x) {
  const float t = std::fmax(x * 1.4426950408889634f, -126.0f);  // below: 2^-126 (the result is ~0 anyway)
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

// Dequantizes rows of one head region. Per-channel key parameters (int4/int2/nf4 keys) are
// unpacked once per key group and reused for the group's tokens.
class RowDecoder {
 public:
  explicit RowDecoder(const PageLayout& L) : L_(L), ch_scale_(L.head_dim), ch_zero_(L.head_dim) {}

  // DC > 0: the head dim as a compile-time constant (fixed trip counts); 0: the layout's.
  template <int DC>
  void decode(const uint8_t* head, int64_t o, float* out) {
    const int D = DC > 0 ? DC : L_.head_dim;
    const uint8_t* row = head + o * L_.code_bytes_per_token;
    const uint8_t* meta = head + L_.code_bytes;
    switch (L_.format) {
      case Format::kFP32:
        memcpy(out, row, sizeof(float) * D);
        return;
      case Format::kBF16: {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(row);
#pragma omp simd
        for (int d = 0; d < D; ++d) out[d] = bits_float(static_cast<uint32_t>(x[d]) << 16);
        return;
      }
      case Format::kFP16: {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(row);
        const float* t = fp16_table();
        for (int d = 0; d < D; ++d) out[d] = t[x[d]];
        return;
      }
      case Format::kInt8: {
        float scale;
        memcpy(&scale, meta + 4 * o, 4);
        const int8_t* x = reinterpret_cast<const int8_t*>(row);
#pragma omp simd
        for (int d = 0; d < D; ++d) out[d] = static_cast<float>(x[d]) * scale;
        return;
      }
      case Format::kFP8E4M3: {
        float scale;
        memcpy(&scale, meta + 4 * o, 4);
        const float* t = fp8_table();
        for (int d = 0; d < D; ++d) out[d] = t[row[d]] * scale;
        return;
      }
      case Format::kInt4:
      case Format::kInt2:
      case Format::kNF4:
        if (L_.role == Role::kKey) {
          key_params(head, o / L_.group);
          decode_codes<DC>(row, D, out);
          const float* s = ch_scale_.data();
          const float* z = ch_zero_.data();
          if (L_.format == Format::kNF4) {
#pragma omp simd
            for (int d = 0; d < D; ++d) out[d] = nf4_lut(out[d]) * s[d];
          } else {
#pragma omp simd
            for (int d = 0; d < D; ++d) out[d] = out[d] * s[d] + z[d];
          }
        } else {
          decode_codes<DC>(row, D, out);
          const int g = L_.group;
          if (L_.format == Format::kNF4) {
            uint16_t s2_h;
            memcpy(&s2_h, meta + 2 * o, 2);
            const float s2 = fp16_to_float(s2_h);
            const uint8_t* acodes = meta + 2 * codec::supers_per_block(L_) + o * (D / g);
            for (int j = 0; j < D / g; ++j) {
              const float us = nf4_unit_scale(acodes[j], s2);
              for (int d = j * g; d < (j + 1) * g; ++d) out[d] = nf4_lut(out[d]) * us;
            }
          } else {
            const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta) + o * (D / g);
            for (int j = 0; j < D / g; ++j) {
              const float s = fp16_to_float(sz[j].scale), z = fp16_to_float(sz[j].zero);
#pragma omp simd
              for (int d = j * g; d < (j + 1) * g; ++d) out[d] = out[d] * s + z;
            }
          }
        }
        return;
    }
  }

 private:
  static float nf4_lut(float code) { return nf4_value(static_cast<uint32_t>(code)); }

  // Unpacks sub-byte codes to floats (code values, not yet scaled).
  template <int DC>
  void decode_codes(const uint8_t* row, int D_, float* out) const {
    const int D = DC > 0 ? DC : D_;
    if (code_bits(L_.format) == 4) {
#pragma omp simd
      for (int i = 0; i < D / 2; ++i) {
        out[2 * i] = static_cast<float>(row[i] & 15u);
        out[2 * i + 1] = static_cast<float>(row[i] >> 4);
      }
    } else {
#pragma omp simd
      for (int i = 0; i < D / 4; ++i) {
        out[4 * i] = static_cast<float>(row[i] & 3u);
        out[4 * i + 1] = static_cast<float>((row[i] >> 2) & 3u);
        out[4 * i + 2] = static_cast<float>((row[i] >> 4) & 3u);
        out[4 * i + 3] = static_cast<float>(row[i] >> 6);
      }
    }
  }

  void key_params(const uint8_t* head, int64_t gi) {
    if (head == cached_head_ && gi == cached_group_) return;
    cached_head_ = head;
    cached_group_ = gi;
    const int D = L_.head_dim;
    const uint8_t* meta = head + L_.code_bytes;
    if (L_.format == Format::kNF4) {
      uint16_t s2_h;
      memcpy(&s2_h, meta + 2 * gi, 2);
      const float s2 = fp16_to_float(s2_h);
      const uint8_t* acodes = meta + 2 * codec::supers_per_block(L_) + gi * D;
      for (int d = 0; d < D; ++d) ch_scale_[d] = nf4_unit_scale(acodes[d], s2);
    } else {
      const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta) + gi * D;
      for (int d = 0; d < D; ++d) {
        ch_scale_[d] = fp16_to_float(sz[d].scale);
        ch_zero_[d] = fp16_to_float(sz[d].zero);
      }
    }
  }

  const PageLayout& L_;
  std::vector<float> ch_scale_, ch_zero_;
  const uint8_t* cached_head_ = nullptr;
  int64_t cached_group_ = -1;
};

// Iterates the entries [e0, e1) of sequence s, KV head h, as dequantized fp32 rows.
template <int DC, typename F>
void for_each_row(const AttentionParams& p, const PagedView& view, RowDecoder& dec, const void* tail,
                  const int64_t* tail_stride, int64_t s, int64_t h, int64_t e0, int64_t e1, float* buf, F&& f) {
  const PageLayout& L = view.layout;
  const int D = DC > 0 ? DC : L.head_dim;
  const int64_t plen = p.seq_lens[s];
  const int64_t skip = p.skip ? p.skip[s] : 0;
  const int32_t* table = p.block_table + s * p.max_blocks_per_seq;
  const bool round = p.dtype != DType::kF32 && !is_passthrough(L.format);
  for (int64_t e = e0; e < std::min(e1, plen); ++e) {
    const int64_t pos = skip + e;
    dec.template decode<DC>(view.head_ptr(table[pos / L.block_size], h), pos % L.block_size, buf);
    if (round) round_row(buf, D, p.dtype);
    f(e, buf);
  }
  for (int64_t e = std::max(e0, plen); e < e1; ++e) {
    load_row(tail, p.dtype, s * tail_stride[0] + h * tail_stride[1] + (e - plen) * tail_stride[2], D, buf);
    f(e, buf);
  }
}

template <int DC>
void attention_items(const AttentionParams& p, int64_t begin, int64_t end) {
  const int D = DC > 0 ? DC : static_cast<int>(p.head_dim());
  const int64_t H = p.num_kv_heads();
  const int64_t G = p.group_size();
  const int64_t R = p.rows();
  RowDecoder kdec(p.k.layout), vdec(p.v.layout);
  std::vector<float> q(R * D), acc(R * D), buf(D), m(R), l(R);
  std::vector<int64_t> lo(R), hi(R);
  std::vector<float> scores;
  std::vector<uint8_t> allowed;
  for (int64_t w = begin; w < end; ++w) {
    const int64_t split = w % p.num_splits;
    const int64_t h = (w / p.num_splits) % H;
    const int64_t s = w / (p.num_splits * H);
    const int64_t n = p.seq_lens[s] + p.tail_len;
    // Rows: r = t * G + j is query token t of query head h * G + j.
    int64_t row_lo = n, row_hi = -1;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = r / G, j = r % G;
      hi[r] = n - p.q_len + t;
      lo[r] = p.window > 0 ? std::max<int64_t>(hi[r] - p.window + 1, 0) : 0;
      row_lo = std::min(row_lo, lo[r]);
      row_hi = std::max(row_hi, hi[r]);
      load_row(p.query, p.dtype, s * p.q_stride[0] + (h * G + j) * p.q_stride[1] + t * p.q_stride[2], D, &q[r * D]);
      for (int d = 0; d < D; ++d) q[r * D + d] *= p.scale;
    }
    const int64_t e0 = std::max(split * p.split_tokens, row_lo);
    const int64_t e1 = std::min({(split + 1) * p.split_tokens, n, row_hi + 1});
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.0f);
    if (e1 > e0) {
      const int64_t len = e1 - e0;
      scores.assign(R * len, kNegInf);
      allowed.assign(len, 1);
      if (p.kv_mask) {
        const uint8_t* mk = p.kv_mask + s * p.mask_stride + p.mask_offset;
        for (int64_t e = e0; e < e1; ++e) allowed[e - e0] = mk[e] != 0;
      }
      for_each_row<DC>(p, p.k, kdec, p.k_tail, p.kt_stride, s, h, e0, e1, buf.data(), [&](int64_t e, const float* k) {
        if (!allowed[e - e0]) return;
        for (int64_t r = 0; r < R; ++r) {
          if (e < lo[r] || e > hi[r]) continue;
          const float* qr = &q[r * D];
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += qr[d] * k[d];
          if (p.softcap > 0.0f) dot = p.softcap * std::tanh(dot / p.softcap);
          scores[r * len + (e - e0)] = dot;
        }
      });
      for (int64_t r = 0; r < R; ++r) {
        float* sr = &scores[r * len];
        float mx = kNegInf;
        for (int64_t i = 0; i < len; ++i) mx = std::max(mx, sr[i]);
        m[r] = mx;
        if (mx == kNegInf) continue;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) {
          const float e = exp_nonpositive(sr[i] - mx);
          sr[i] = e;
          sum += e;
        }
        if (p.dtype != DType::kF32) {
          for (int64_t i = 0; i < len; ++i) sr[i] = round_p(sr[i], p.dtype);
        }
        l[r] = sum;
      }
      for_each_row<DC>(p, p.v, vdec, p.v_tail, p.vt_stride, s, h, e0, e1, buf.data(), [&](int64_t e, const float* v) {
        if (!allowed[e - e0]) return;
        for (int64_t r = 0; r < R; ++r) {
          if (e < lo[r] || e > hi[r]) continue;
          const float pr = scores[r * len + (e - e0)];
          float* ar = &acc[r * D];
#pragma omp simd
          for (int d = 0; d < D; ++d) ar[d] += pr * v[d];
        }
      });
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
