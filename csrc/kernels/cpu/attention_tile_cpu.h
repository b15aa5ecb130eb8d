// Page rows for the CPU attention kernel, one tile of consecutive tokens at a time, in raw form:
// the codes as fp32 (nf4: codebook values) plus the affine map that dequantizes them,
//
//   x[t][d] = codes[t][d] * tok_mul[t][u] * ch_mul[d] + tok_add[t][u] + ch_add[d],   u = d / unit
//
// where each factor is absent (1 or 0) when its pointer is null. The kernel folds the factors into
// the query (ch_*), the scores (tok_mul of keys) and the probabilities (tok_* of values) instead of
// multiplying every element; `dequantize` applies them in place where the values themselves are
// needed (rounded to a half-precision model dtype). Torch-free.
#pragma once

#include <cstring>
#include <vector>

#include "kv_cpu.h"
#include "simd_cpu.h"

namespace pagedkv {

// Entries are processed in tiles of at most kTile consecutive entries that stay inside one block
// and one key group, so a tile's page rows are contiguous and share their per-channel key parameters.
constexpr int kTile = 16;

inline const float* fp8_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(256);
    for (int i = 0; i < 256; ++i) v[i] = fp8e4m3_to_float(static_cast<uint8_t>(i));
    return v;
  }();
  return t.data();
}
inline const float* fp16_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(65536);
    for (int i = 0; i < 65536; ++i) v[i] = fp16_to_float(static_cast<uint16_t>(i));
    return v;
  }();
  return t.data();
}

struct RawTile {
  const float* codes = nullptr;    // [kTile][D]: the decoder's buffer, or fp32 page rows in place
  const float* tok_mul = nullptr;  // [kTile][units]
  const float* tok_add = nullptr;  // [kTile][units]
  int units = 1, unit = 0;         // unit: channels per token parameter (D / units)
  const float* ch_mul = nullptr;   // [D]
  const float* ch_add = nullptr;   // [D]
  int64_t ch_version = 0;          // changes whenever ch_mul / ch_add change (a new key group)

  bool plain() const { return !tok_mul && !tok_add && !ch_mul && !ch_add; }

  // Applies the map to rows [0, n), writing them to out[n][D] (which may be `codes`); afterwards
  // the tile is plain and its codes are `out`.
  template <int DC>
  void dequantize(int n, int D_, float* out) {
    const int D = DC > 0 ? DC : D_;
    for (int t = 0; t < n; ++t) {
      float* x = out + t * D;
      if (x != codes + t * D) memcpy(x, codes + t * D, sizeof(float) * D);
      if (ch_mul) {
#pragma omp simd
        for (int d = 0; d < D; ++d) x[d] *= ch_mul[d];
      }
      if (ch_add) {
#pragma omp simd
        for (int d = 0; d < D; ++d) x[d] += ch_add[d];
      }
      for (int u = 0; u < units; ++u) {
        const float m = tok_mul ? tok_mul[t * units + u] : 1.0f;
        const float a = tok_add ? tok_add[t * units + u] : 0.0f;
#pragma omp simd
        for (int d = u * unit; d < (u + 1) * unit; ++d) x[d] = x[d] * m + a;
      }
    }
    codes = out;
    units = 1;
    unit = D;
    tok_mul = tok_add = ch_mul = ch_add = nullptr;
  }
};

// Unpacks rows of one head region of one page array (keys or values of a layer) into RawTiles.
class TileDecoder {
 public:
  explicit TileDecoder(const PageLayout& L)
      : L_(L),
        codes_(kTile * L.head_dim),
        tok_mul_(kTile * L.head_dim),
        tok_add_(kTile * L.head_dim),
        ch_mul_(L.head_dim),
        ch_add_(L.head_dim) {}

  // Rows [o, o + n) of `head` (n <= kTile). The rows of grouped keys lie in one key group.
  // DC > 0: the head dim as a compile-time constant (fixed trip counts); 0: the layout's.
  template <int DC>
  RawTile decode(const uint8_t* head, int64_t o, int n) {
    const int D = DC > 0 ? DC : L_.head_dim;
    const int64_t cb = L_.code_bytes_per_token;
    const uint8_t* rows = head + o * cb;
    const uint8_t* meta = head + L_.code_bytes;
    float* out = codes_.data();
    RawTile tile;
    tile.codes = out;
    tile.unit = D;
    tile.ch_version = version_;
    switch (L_.format) {
      case Format::kFP32:  // rows are read in place (code_bytes_per_token = 4 * D)
        tile.codes = reinterpret_cast<const float*>(rows);
        return tile;
      case Format::kBF16:
        for (int t = 0; t < n; ++t) {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(rows + t * cb);
          float* y = out + t * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) y[d] = bits_float(static_cast<uint32_t>(x[d]) << 16);
        }
        return tile;
      case Format::kFP16:
      case Format::kFP8E4M3: {
        const bool fp8 = L_.format == Format::kFP8E4M3;
        const float* tab = fp8 ? fp8_table() : fp16_table();
        for (int t = 0; t < n; ++t) {
          float* y = out + t * D;
          if (fp8) {
            for (int d = 0; d < D; ++d) y[d] = tab[rows[t * cb + d]];
          } else {
            const uint16_t* x = reinterpret_cast<const uint16_t*>(rows + t * cb);
            for (int d = 0; d < D; ++d) y[d] = tab[x[d]];
          }
        }
        if (fp8) tile.tok_mul = token_scales(meta, o, n);
        return tile;
      }
      case Format::kInt8:
        for (int t = 0; t < n; ++t) {
          const int8_t* x = reinterpret_cast<const int8_t*>(rows + t * cb);
          float* y = out + t * D;
          if constexpr (DC > 0 && DC % 16 == 0) {
            for (int d = 0; d < DC; d += 16) store16(y + d, __builtin_convertvector(load_int8x16(x + d), f32x16));
          } else {
            for (int d = 0; d < D; ++d) y[d] = static_cast<float>(x[d]);
          }
        }
        tile.tok_mul = token_scales(meta, o, n);
        return tile;
      case Format::kInt4:
      case Format::kInt2:
      case Format::kNF4:
        for (int t = 0; t < n; ++t) unpack<DC>(rows + t * cb, D, out + t * D);
        if (L_.format == Format::kNF4) {
          for (int i = 0; i < n * D; ++i) out[i] = nf4_value(static_cast<uint32_t>(out[i]));
        }
        if (L_.role == Role::kKey) {
          key_params(head, o / L_.group);
          tile.ch_mul = ch_mul_.data();
          tile.ch_add = L_.format == Format::kNF4 ? nullptr : ch_add_.data();
          tile.ch_version = version_;
        } else {
          value_params(meta, o, n, D, tile);
        }
        return tile;
    }
    return tile;
  }

 private:
  const float* token_scales(const uint8_t* meta, int64_t o, int n) {
    memcpy(tok_mul_.data(), meta + 4 * o, 4 * static_cast<size_t>(n));
    return tok_mul_.data();
  }

  // Sub-byte codes to floats (code values, not yet scaled).
  template <int DC>
  void unpack(const uint8_t* row, int D_, float* out) const {
    const int D = DC > 0 ? DC : D_;
    if constexpr (DC > 0 && DC % 64 == 0) {  // 16 bytes at a time, widened and interleaved in registers
      if (code_bits(L_.format) == 4) {
        for (int i = 0; i < DC / 2; i += 16) {
          const i32x16 b = load_bytes16(row + i);
          const f32x16 lo = __builtin_convertvector(b & 15, f32x16), hi = __builtin_convertvector(b >> 4, f32x16);
          store16(out + 2 * i, __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
          store16(out + 2 * i + 16,
                  __builtin_shufflevector(lo, hi, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
        }
      } else {
        for (int i = 0; i < DC / 4; i += 16) {
          const i32x16 b = load_bytes16(row + i);
          const f32x16 c0 = __builtin_convertvector(b & 3, f32x16), c1 = __builtin_convertvector((b >> 2) & 3, f32x16);
          const f32x16 c2 = __builtin_convertvector((b >> 4) & 3, f32x16), c3 = __builtin_convertvector(b >> 6, f32x16);
          // codes of byte j: (c0[j], c1[j], c2[j], c3[j]) -> out[4j .. 4j + 3]
          const f32x16 a0 = __builtin_shufflevector(c0, c2, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
          const f32x16 a1 = __builtin_shufflevector(c0, c2, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
          const f32x16 b0 = __builtin_shufflevector(c1, c3, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
          const f32x16 b1 = __builtin_shufflevector(c1, c3, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
          float* o = out + 4 * i;
          store16(o, __builtin_shufflevector(a0, b0, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
          store16(o + 16, __builtin_shufflevector(a0, b0, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
          store16(o + 32, __builtin_shufflevector(a1, b1, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
          store16(o + 48, __builtin_shufflevector(a1, b1, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
        }
      }
      return;
    }
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

  // Grouped values: one (scale, zero) or nf4 unit scale per token and `group` channels.
  void value_params(const uint8_t* meta, int64_t o, int n, int D, RawTile& tile) {
    const int g = L_.group;
    const int units = D / g;
    tile.units = units;
    tile.unit = g;
    float* mul = tok_mul_.data();
    if (L_.format == Format::kNF4) {
      const uint8_t* acodes = meta + 2 * codec::supers_per_block(L_);
      for (int t = 0; t < n; ++t) {
        uint16_t s2_h;
        memcpy(&s2_h, meta + 2 * (o + t), 2);
        const float s2 = fp16_to_float(s2_h);
        for (int u = 0; u < units; ++u) mul[t * units + u] = nf4_unit_scale(acodes[(o + t) * units + u], s2);
      }
    } else {
      const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta) + o * units;
      const float* tab = fp16_table();
      float* add = tok_add_.data();
      for (int i = 0; i < n * units; ++i) {
        mul[i] = tab[sz[i].scale];
        add[i] = tab[sz[i].zero];
      }
      tile.tok_add = add;
    }
    tile.tok_mul = mul;
  }

  // Grouped keys: per-channel parameters of key group gi, unpacked once per group.
  void key_params(const uint8_t* head, int64_t gi) {
    if (head == cached_head_ && gi == cached_group_) return;
    cached_head_ = head;
    cached_group_ = gi;
    ++version_;
    const int D = L_.head_dim;
    const uint8_t* meta = head + L_.code_bytes;
    if (L_.format == Format::kNF4) {
      uint16_t s2_h;
      memcpy(&s2_h, meta + 2 * gi, 2);
      const float s2 = fp16_to_float(s2_h);
      const uint8_t* acodes = meta + 2 * codec::supers_per_block(L_) + gi * D;
      for (int d = 0; d < D; ++d) ch_mul_[d] = nf4_unit_scale(acodes[d], s2);
    } else {
      const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta) + gi * D;
      const float* tab = fp16_table();
      for (int d = 0; d < D; ++d) {
        ch_mul_[d] = tab[sz[d].scale];
        ch_add_[d] = tab[sz[d].zero];
      }
    }
  }

  const PageLayout& L_;
  std::vector<float> codes_, tok_mul_, tok_add_, ch_mul_, ch_add_;
  const uint8_t* cached_head_ = nullptr;
  int64_t cached_group_ = -1;
  int64_t version_ = 0;
};

}  // namespace pagedkv
