// Page rows for the CPU attention kernel, one tile of consecutive tokens at a time, in raw form:
// the codes plus the affine map that dequantizes them,
//
//   x[t][d] = codes[t][d] * tok_mul[u][t] * ch_mul[d] + tok_add[u][t] + ch_add[d],   u = d / unit
//
// where each factor is absent (1 or 0) when its pointer is null. The codes are either fp32 rows
// (kFloat: fp32 pages in place, other formats unpacked off the vector path, tails) or, on the vector
// path, the page rows themselves (bf16 / fp16 / int8 / fp8 / int4 / nf4 / int2), which the kernel
// widens in registers (row_chunks) without storing them; nf4 codes widen to codebook values. The kernel folds the factors into the query (ch_*), the scores
// (tok_mul of keys) and the probabilities (tok_* of values) instead of multiplying every element;
// `dequantize` applies them where the values themselves are needed (rounded to a half-precision
// model dtype). Torch-free.
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

enum class RowKind { kFloat, kBF16, kF16, kInt8, kFp8, kU4, kNF4, kU2 };

// Channel of lane l of chunk c of a row widened by row_chunks. int4 / nf4 and int2 rows come out in lane
// order (low nibbles of 16 bytes, then high nibbles), not channel order, which saves the interleaving
// shuffles: the kernel permutes the query to match and accumulates values in this order.
template <RowKind K>
constexpr int chunk_channel(int c, int l) {
  if constexpr (K == RowKind::kU4 || K == RowKind::kNF4) return (c / 2) * 32 + 2 * l + c % 2;
  if constexpr (K == RowKind::kU2) return (c / 4) * 64 + 4 * l + c % 4;
  return 16 * c + l;
}
template <RowKind K>
constexpr bool kPermuted = K == RowKind::kU4 || K == RowKind::kNF4 || K == RowKind::kU2;
// Channels spanned by one chunk: value units (channels per scale) must be multiples of it.
constexpr int chunk_span(RowKind k) {
  return k == RowKind::kU4 || k == RowKind::kNF4 ? 32 : k == RowKind::kU2 ? 64 : 16;
}

inline f32x16 nf4_table16() {
  f32x16 t;
  for (int i = 0; i < 16; ++i) t[i] = nf4_value(static_cast<uint32_t>(i));
  return t;
}

// The 16-lane vector paths: a compile-time head dim that is a multiple of 16, on targets with
// 16-lane registers (lowered to AVX2 they ran about 3x slower than the plain loops, measured). Packed
// kinds also need whole 16-byte loads (multiples of 64).
template <int DC>
constexpr bool kVectorRows = kSimd16 && DC > 0 && DC % 16 == 0;
template <int DC>
constexpr bool kPackedRows = kVectorRows<DC> && DC % 64 == 0;

struct RawTile {
  RowKind kind = RowKind::kFloat;
  const float* codes = nullptr;    // kFloat: [kTile][D], the decoder's buffer or fp32 page rows in place
  const uint8_t* packed = nullptr;  // other kinds: page rows, `stride` bytes apart
  int64_t stride = 0;
  const float* tok_mul = nullptr;  // [units][kTile]: unit-major, so a unit's tokens are contiguous
  const float* tok_add = nullptr;  // [units][kTile]
  int units = 1, unit = 0;         // unit: channels per token parameter (D / units)
  const float* ch_mul = nullptr;   // [D]
  const float* ch_add = nullptr;   // [D]
  int64_t ch_version = 0;          // changes whenever ch_mul / ch_add change (a new key group)

  // The DC / 16 lane chunks of row t as codes (not yet scaled), in registers.
  template <RowKind K, int DC>
  __attribute__((always_inline)) void row_chunks(int t, f32x16 (&v)[DC / 16]) const {
    if constexpr (K == RowKind::kFloat) {
      for (int c = 0; c < DC / 16; ++c) v[c] = load16(codes + t * DC + 16 * c);
    } else if constexpr (K == RowKind::kInt8) {
      const int8_t* x = reinterpret_cast<const int8_t*>(packed + t * stride);
      for (int c = 0; c < DC / 16; ++c) v[c] = __builtin_convertvector(load_int8x16(x + 16 * c), f32x16);
    } else if constexpr (K == RowKind::kBF16 || K == RowKind::kF16) {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(packed + t * stride);
      for (int c = 0; c < DC / 16; ++c) v[c] = K == RowKind::kBF16 ? bf16x16_to_f32x16(x + 16 * c) : f16x16_to_f32x16(x + 16 * c);
    } else if constexpr (K == RowKind::kFp8) {
      const uint8_t* x = packed + t * stride;
      for (int c = 0; c < DC / 16; ++c) v[c] = fp8e4m3_to_f32x16(load_bytes16(x + 16 * c));
    } else if constexpr (K == RowKind::kU4) {  // byte j: channels 2j (low nibble), 2j + 1
      const uint8_t* x = packed + t * stride;
      for (int i = 0; i < DC / 32; ++i) {
        const i32x16 b = load_bytes16(x + 16 * i);
        v[2 * i] = __builtin_convertvector(b & 15, f32x16);
        v[2 * i + 1] = __builtin_convertvector(b >> 4, f32x16);
      }
    } else if constexpr (K == RowKind::kNF4) {  // as kU4, through the codebook
      const uint8_t* x = packed + t * stride;
      const f32x16 table = nf4_table16();
      for (int i = 0; i < DC / 32; ++i) {
        const i32x16 b = load_bytes16(x + 16 * i);
        v[2 * i] = lookup16(table, b & 15);
        v[2 * i + 1] = lookup16(table, b >> 4);
      }
    } else {  // kU2, byte j: channels 4j .. 4j + 3 from the low bits up
      const uint8_t* x = packed + t * stride;
      for (int i = 0; i < DC / 64; ++i) {
        const i32x16 b = load_bytes16(x + 16 * i);
        v[4 * i] = __builtin_convertvector(b & 3, f32x16);
        v[4 * i + 1] = __builtin_convertvector((b >> 2) & 3, f32x16);
        v[4 * i + 2] = __builtin_convertvector((b >> 4) & 3, f32x16);
        v[4 * i + 3] = __builtin_convertvector(b >> 6, f32x16);
      }
    }
  }

  // Packed rows [0, n) unpacked into out[n][D]; afterwards the tile is kFloat with codes `out`.
  template <int DC>
  void materialize(int n, float* out) {
    if constexpr (kPackedRows<DC>) {
      if (kind == RowKind::kFloat) return;
      for (int t = 0; t < n; ++t) {
        switch (kind) {
          case RowKind::kBF16: store_row<RowKind::kBF16, DC>(t, out + t * DC); break;
          case RowKind::kF16: store_row<RowKind::kF16, DC>(t, out + t * DC); break;
          case RowKind::kInt8: store_row<RowKind::kInt8, DC>(t, out + t * DC); break;
          case RowKind::kFp8: store_row<RowKind::kFp8, DC>(t, out + t * DC); break;
          case RowKind::kU4: store_row<RowKind::kU4, DC>(t, out + t * DC); break;
          case RowKind::kNF4: store_row<RowKind::kNF4, DC>(t, out + t * DC); break;
          default: store_row<RowKind::kU2, DC>(t, out + t * DC); break;
        }
      }
      kind = RowKind::kFloat;
      codes = out;
    }
  }

  // Row t in channel order.
  template <RowKind K, int DC>
  void store_row(int t, float* out) const {
    f32x16 v[DC / 16];
    row_chunks<K, DC>(t, v);
    for (int c = 0; c < DC / 16; ++c)
      for (int l = 0; l < 16; ++l) out[chunk_channel<K>(c, l)] = v[c][l];
  }

  // Applies the map to rows [0, n), writing them to out[n][D] (which may be `codes`); afterwards
  // the tile is plain kFloat and its codes are `out`.
  template <int DC>
  void dequantize(int n, int D_, float* out) {
    const int D = DC > 0 ? DC : D_;
    materialize<DC>(n, out);
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
        const float m = tok_mul ? tok_mul[u * kTile + t] : 1.0f;
        const float a = tok_add ? tok_add[u * kTile + t] : 0.0f;
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
    switch (L_.format) {
      case Format::kFP32:  // rows are read in place (code_bytes_per_token = 4 * D)
        tile.codes = reinterpret_cast<const float*>(rows);
        return tile;
      case Format::kBF16:
        if constexpr (kPackedRows<DC>) {
          tile.kind = RowKind::kBF16;
          tile.packed = rows;
          tile.stride = cb;
          return tile;
        }
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
        if (fp8) tile.tok_mul = token_scales(meta, o, n);
        if (kPackedRows<DC>) {
          tile.kind = fp8 ? RowKind::kFp8 : RowKind::kF16;
          tile.packed = rows;
          tile.stride = cb;
          return tile;
        }
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
        return tile;
      }
      case Format::kInt8:
        tile.tok_mul = token_scales(meta, o, n);
        if constexpr (kPackedRows<DC>) {
          tile.kind = RowKind::kInt8;
          tile.packed = rows;
          tile.stride = cb;
          return tile;
        }
        for (int t = 0; t < n; ++t) {
          const int8_t* x = reinterpret_cast<const int8_t*>(rows + t * cb);
          for (int d = 0; d < D; ++d) out[t * D + d] = static_cast<float>(x[d]);
        }
        return tile;
      case Format::kInt4:
      case Format::kInt2:
      case Format::kNF4:
        const RowKind kind = L_.format == Format::kNF4 ? RowKind::kNF4 : code_bits(L_.format) == 4 ? RowKind::kU4 : RowKind::kU2;
        if (kPackedRows<DC> && (L_.role == Role::kKey || L_.group % chunk_span(kind) == 0)) {
          tile.kind = kind;
          tile.packed = rows;
          tile.stride = cb;
        } else {
          for (int t = 0; t < n; ++t) unpack(rows + t * cb, D, out + t * D);
          if (L_.format == Format::kNF4) {
            for (int i = 0; i < n * D; ++i) out[i] = nf4_value(static_cast<uint32_t>(out[i]));
          }
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

  // Sub-byte codes to floats (code values, not yet scaled): the scalar path (nf4, other head dims).
  void unpack(const uint8_t* row, int D, float* out) const {
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
        for (int u = 0; u < units; ++u) mul[u * kTile + t] = nf4_unit_scale(acodes[(o + t) * units + u], s2);
      }
    } else {
      const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta) + o * units;
      const float* tab = fp16_table();
      float* add = tok_add_.data();
      for (int t = 0; t < n; ++t) {
        for (int u = 0; u < units; ++u) {
          mul[u * kTile + t] = tab[sz[t * units + u].scale];
          add[u * kTile + t] = tab[sz[t * units + u].zero];
        }
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
