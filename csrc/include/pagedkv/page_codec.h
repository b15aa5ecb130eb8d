// pagedkv/page_codec.h: encode and decode tokens inside one head region of one block
// (host and device). Built only from the scalar reference quantizers in quant_ref.h, so every
// kernel that uses these routines is bit-identical to the reference by construction; faster
// kernels are tested against them.
#pragma once

#include <cstdint>

#include "pagedkv/formats.h"
#include "pagedkv/quant_ref.h"

namespace pagedkv {

// Where the pages of one of K/V of one layer live: chunk c holds blocks
// [c * blocks_per_chunk, (c + 1) * blocks_per_chunk), each `layout.block_bytes` long.
struct PagedView {
  PageLayout layout;
  uint8_t* const* chunks = nullptr;  // [num_chunks] base pointers
  int64_t num_chunks = 0;
  int32_t blocks_per_chunk = 1;
  const int64_t* chunk_blocks = nullptr;  // [num_chunks] blocks present in each chunk, or null (all full)

  // Whether block id `b` exists: inside a chunk, not past a short chunk's end.
  bool has_block(int64_t b) const {
    if (b < 0 || b >= id_space()) return false;
    return chunk_blocks == nullptr || b % blocks_per_chunk < chunk_blocks[b / blocks_per_chunk];
  }

  int64_t id_space() const { return num_chunks * blocks_per_chunk; }
  PKV_HD uint8_t* head_ptr(int64_t block, int64_t head) const {
    return chunks[block / blocks_per_chunk] + (block % blocks_per_chunk) * layout.block_bytes +
           head * layout.head_bytes;
  }
};

namespace codec {

PKV_HD uint8_t* code_row(const PageLayout& L, uint8_t* head, int64_t o) {
  return head + o * L.code_bytes_per_token;
}
PKV_HD const uint8_t* code_row(const PageLayout& L, const uint8_t* head, int64_t o) {
  return head + o * L.code_bytes_per_token;
}
PKV_HD int64_t supers_per_block(const PageLayout& L) {
  return L.role == Role::kKey ? L.block_size / L.group : L.block_size;
}

}  // namespace codec

// Encodes token `o` (offset inside the block) of one head: passthrough, fp8/int8 and grouped values.
// note: grouped keys are encoded per token group with encode_key_group instead.
PKV_HD void encode_token(const PageLayout& L, uint8_t* head, int64_t o, const float* x) {
  const int D = L.head_dim;
  uint8_t* row = codec::code_row(L, head, o);
  uint8_t* meta = head + L.code_bytes;
  switch (L.format) {
    case Format::kFP32:
      for (int d = 0; d < D; ++d) memcpy(row + 4 * d, &x[d], 4);
      return;
    case Format::kBF16:
      for (int d = 0; d < D; ++d) {
        const uint16_t b = bf16_from_float(x[d]);
        memcpy(row + 2 * d, &b, 2);
      }
      return;
    case Format::kFP16:
      for (int d = 0; d < D; ++d) {
        const uint16_t h = fp16_from_float(x[d]);
        memcpy(row + 2 * d, &h, 2);
      }
      return;
    case Format::kInt8:
    case Format::kFP8E4M3: {
      float amax = 0.0f;
      for (int d = 0; d < D; ++d) amax = fmaxf(amax, fabsf(x[d]));
      const bool is_int8 = L.format == Format::kInt8;
      const float scale = is_int8 ? int8_scale(amax) : fp8_scale(amax);
      memcpy(meta + 4 * o, &scale, 4);
      for (int d = 0; d < D; ++d) {
        row[d] = is_int8 ? static_cast<uint8_t>(int8_code(x[d], scale)) : fp8_code(x[d], scale);
      }
      return;
    }
    case Format::kInt4:
    case Format::kInt2: {
      const int bits = code_bits(L.format);
      const int g = L.group;
      for (int64_t i = 0; i < L.code_bytes_per_token; ++i) row[i] = 0;
      ScaleZeroF16* sz = reinterpret_cast<ScaleZeroF16*>(meta) + o * (D / g);
      for (int j = 0; j < D / g; ++j) {
        float mn = x[j * g], mx = x[j * g];
        for (int d = j * g; d < (j + 1) * g; ++d) {
          mn = fminf(mn, x[d]);
          mx = fmaxf(mx, x[d]);
        }
        const AsymParams p = asym_params(mn, mx, bits);
        sz[j].scale = p.scale_h;
        sz[j].zero = p.zero_h;
        for (int d = j * g; d < (j + 1) * g; ++d) or_code(row, d, bits, asym_code(x[d], p.scale, p.zero, bits));
      }
      return;
    }
    case Format::kNF4: {
      const int g = L.group;
      const int groups = D / g;
      for (int64_t i = 0; i < L.code_bytes_per_token; ++i) row[i] = 0;
      uint8_t* acodes = meta + 2 * codec::supers_per_block(L) + o * groups;
      float amax_all = 0.0f;
      for (int d = 0; d < D; ++d) amax_all = fmaxf(amax_all, fabsf(x[d]));
      const NF4Super s = nf4_super(amax_all);
      memcpy(meta + 2 * o, &s.s2_h, 2);
      for (int j = 0; j < groups; ++j) {
        float amax = 0.0f;
        for (int d = j * g; d < (j + 1) * g; ++d) amax = fmaxf(amax, fabsf(x[d]));
        acodes[j] = nf4_absmax_code(amax, s.s2);
        const float us = nf4_unit_scale(acodes[j], s.s2);
        for (int d = j * g; d < (j + 1) * g; ++d) or_code(row, d, 4, nf4_code(x[d], us));
      }
      return;
    }
  }
}

// Encodes the key group of tokens [o0, o0 + group) of one head: x[t * x_stride + d], t < group.
// Per channel d: one (scale, zero) from asym_fit for int4/int2 (fitted at 2 bits, min/max at 4), one
// absmax code for nf4.
PKV_HD void encode_key_group(const PageLayout& L, uint8_t* head, int64_t o0, const float* x,
                             int64_t x_stride) {
  const int D = L.head_dim;
  const int G = L.group;
  const int bits = code_bits(L.format);
  uint8_t* meta = head + L.code_bytes;
  const int64_t gi = o0 / G;
  for (int t = 0; t < G; ++t) {
    uint8_t* row = codec::code_row(L, head, o0 + t);
    for (int64_t i = 0; i < L.code_bytes_per_token; ++i) row[i] = 0;
  }
  if (L.format == Format::kNF4) {
    float amax_all = 0.0f;
    for (int t = 0; t < G; ++t)
      for (int d = 0; d < D; ++d) amax_all = fmaxf(amax_all, fabsf(x[t * x_stride + d]));
    const NF4Super s = nf4_super(amax_all);
    memcpy(meta + 2 * gi, &s.s2_h, 2);
    uint8_t* acodes = meta + 2 * codec::supers_per_block(L) + gi * D;
    for (int d = 0; d < D; ++d) {
      float amax = 0.0f;
      for (int t = 0; t < G; ++t) amax = fmaxf(amax, fabsf(x[t * x_stride + d]));
      acodes[d] = nf4_absmax_code(amax, s.s2);
      const float us = nf4_unit_scale(acodes[d], s.s2);
      for (int t = 0; t < G; ++t)
        or_code(codec::code_row(L, head, o0 + t), d, 4, nf4_code(x[t * x_stride + d], us));
    }
    return;
  }
  ScaleZeroF16* sz = reinterpret_cast<ScaleZeroF16*>(meta) + gi * D;
  for (int d = 0; d < D; ++d) {
    const AsymParams p = asym_fit(x + d, x_stride, G, bits);
    sz[d].scale = p.scale_h;
    sz[d].zero = p.zero_h;
    for (int t = 0; t < G; ++t)
      or_code(codec::code_row(L, head, o0 + t), d, bits, asym_code(x[t * x_stride + d], p.scale, p.zero, bits));
  }
}

// Decodes token `o` of one head into out[0, head_dim).
PKV_HD void decode_token(const PageLayout& L, const uint8_t* head, int64_t o, float* out) {
  const int D = L.head_dim;
  const uint8_t* row = codec::code_row(L, head, o);
  const uint8_t* meta = head + L.code_bytes;
  switch (L.format) {
    case Format::kFP32:
      for (int d = 0; d < D; ++d) memcpy(&out[d], row + 4 * d, 4);
      return;
    case Format::kBF16:
      for (int d = 0; d < D; ++d) {
        uint16_t b;
        memcpy(&b, row + 2 * d, 2);
        out[d] = bf16_to_float(b);
      }
      return;
    case Format::kFP16:
      for (int d = 0; d < D; ++d) {
        uint16_t h;
        memcpy(&h, row + 2 * d, 2);
        out[d] = fp16_to_float(h);
      }
      return;
    case Format::kInt8: {
      float scale;
      memcpy(&scale, meta + 4 * o, 4);
      for (int d = 0; d < D; ++d) out[d] = int8_dequant(static_cast<int8_t>(row[d]), scale);
      return;
    }
    case Format::kFP8E4M3: {
      float scale;
      memcpy(&scale, meta + 4 * o, 4);
      for (int d = 0; d < D; ++d) out[d] = fp8_dequant(row[d], scale);
      return;
    }
    case Format::kInt4:
    case Format::kInt2: {
      const int bits = code_bits(L.format);
      const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(meta);
      if (L.role == Role::kKey) {
        sz += (o / L.group) * D;
        for (int d = 0; d < D; ++d)
          out[d] = asym_dequant(get_code(row, d, bits), fp16_to_float(sz[d].scale), fp16_to_float(sz[d].zero));
      } else {
        const int g = L.group;
        sz += o * (D / g);
        for (int d = 0; d < D; ++d)
          out[d] = asym_dequant(get_code(row, d, bits), fp16_to_float(sz[d / g].scale), fp16_to_float(sz[d / g].zero));
      }
      return;
    }
    case Format::kNF4: {
      const uint8_t* acodes = meta + 2 * codec::supers_per_block(L);
      uint16_t s2_h;
      if (L.role == Role::kKey) {
        const int64_t gi = o / L.group;
        memcpy(&s2_h, meta + 2 * gi, 2);
        const float s2 = fp16_to_float(s2_h);
        acodes += gi * D;
        for (int d = 0; d < D; ++d) out[d] = nf4_dequant(get_code(row, d, 4), nf4_unit_scale(acodes[d], s2));
      } else {
        const int g = L.group;
        memcpy(&s2_h, meta + 2 * o, 2);
        const float s2 = fp16_to_float(s2_h);
        acodes += o * (D / g);
        for (int d = 0; d < D; ++d) out[d] = nf4_dequant(get_code(row, d, 4), nf4_unit_scale(acodes[d / g], s2));
      }
      return;
    }
  }
}

}  // namespace pagedkv
