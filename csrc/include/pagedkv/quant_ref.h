// pagedkv/quant_ref.h: the scalar reference quantizers. This file is the source of truth for every
// format's arithmetic: CPU and CUDA kernels call these same functions, and tests/python's plain
// PyTorch reference (pagedkv/reference.py) reimplements them independently, operation for operation.
//
// All arithmetic is fp32 with round-to-nearest-even; no fused multiply-add (kernels are built with
// -ffp-contract=off / --fmad=false where exactness against the reference matters).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pagedkv/common.h"

namespace pagedkv {

// ----------------------------------------------------------------------------------------------
// Bit casts and 16/8-bit float conversions (portable, host and device).
// ----------------------------------------------------------------------------------------------
PKV_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
PKV_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

constexpr float kFP16Max = 65504.0f;
constexpr float kFP8E4M3Max = 448.0f;

// float -> IEEE fp16 bits, round to nearest even; overflow gives inf, NaN stays NaN.
PKV_HD uint16_t fp16_from_float(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: fp16 subnormal, unit 2^-24 (the multiply is exact)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(bits_float(a) * 16777216.0f)));
  }
  uint32_t h = ((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carry into the exponent is correct
  return static_cast<uint16_t>(sign | h);
}

PKV_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bf16 bits, round to nearest even (as torch does).
PKV_HD uint16_t bf16_from_float(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
PKV_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// float -> fp8 e4m3fn (bias 7, max 448, no inf), round to nearest even, saturating at +-448.
PKV_HD uint8_t fp8e4m3_from_float(float f) {
  const uint32_t x = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  if (a > float_bits(kFP8E4M3Max)) a = float_bits(kFP8E4M3Max);
  if (a < 0x3c800000u) {  // below 2^-6: subnormal, unit 2^-9
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(rintf(bits_float(a) * 512.0f)));
  }
  uint32_t c = ((((a >> 23) - 120u) << 3) | ((a >> 20) & 0x7u));
  const uint32_t rest = a & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (c & 1u))) ++c;
  return static_cast<uint8_t>(sign | c);
}

PKV_HD float fp8e4m3_to_float(uint8_t c) {
  const uint32_t e = (c >> 3) & 0xfu;
  const uint32_t m = c & 0x7u;
  float v;
  if (e == 0) {
    v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  } else if (e == 15 && m == 7) {
    v = bits_float(0x7fc00000u);
  } else {
    v = bits_float(((e + 120u) << 23) | (m << 20));
  }
  return (c & 0x80u) ? -v : v;
}

// ----------------------------------------------------------------------------------------------
// Packed code access. Element i of a row of `bits`-bit codes lives in byte i*bits/8 at bit offset
// (i % (8/bits)) * bits, low bits first. 8-bit codes are plain bytes.
// ----------------------------------------------------------------------------------------------
PKV_HD uint32_t get_code(const uint8_t* row, int i, int bits) {
  if (bits == 8) return row[i];
  const int per_byte = 8 / bits;
  return (row[i / per_byte] >> ((i % per_byte) * bits)) & ((1u << bits) - 1u);
}
// note: the caller zeroes a row's bytes before setting sub-byte codes into it.
PKV_HD void or_code(uint8_t* row, int i, int bits, uint32_t code) {
  if (bits == 8) {
    row[i] = static_cast<uint8_t>(code);
    return;
  }
  const int per_byte = 8 / bits;
  row[i / per_byte] = static_cast<uint8_t>(row[i / per_byte] | (code << ((i % per_byte) * bits)));
}

// ----------------------------------------------------------------------------------------------
// int8: symmetric, one fp32 scale per (token, head).
// ----------------------------------------------------------------------------------------------
PKV_HD float int8_scale(float absmax) { return absmax / 127.0f; }
PKV_HD int8_t int8_code(float x, float scale) {
  if (scale == 0.0f) return 0;
  const float q = fminf(fmaxf(rintf(x / scale), -127.0f), 127.0f);
  return static_cast<int8_t>(q);
}
PKV_HD float int8_dequant(int8_t code, float scale) { return static_cast<float>(code) * scale; }

// ----------------------------------------------------------------------------------------------
// fp8 e4m3: one fp32 scale per (token, head) mapping the absmax to 448.
// ----------------------------------------------------------------------------------------------
PKV_HD float fp8_scale(float absmax) { return absmax / kFP8E4M3Max; }
PKV_HD uint8_t fp8_code(float x, float scale) {
  if (scale == 0.0f) return 0;
  return fp8e4m3_from_float(x / scale);
}
PKV_HD float fp8_dequant(uint8_t code, float scale) { return fp8e4m3_to_float(code) * scale; }

// ----------------------------------------------------------------------------------------------
// int4 / int2: asymmetric with fp16 scale and fp16 zero (= unit minimum) per unit.
// ----------------------------------------------------------------------------------------------
struct AsymParams {
  uint16_t scale_h;
  uint16_t zero_h;
  float scale;  // fp16-rounded, as stored
  float zero;
};
// (scale, zero) rounded to fp16 as stored, clamped to the fp16 range.
PKV_HD AsymParams asym_stored(float scale, float zero) {
  AsymParams p;
  p.scale_h = fp16_from_float(fminf(scale, kFP16Max));
  p.zero_h = fp16_from_float(fminf(fmaxf(zero, -kFP16Max), kFP16Max));
  p.scale = fp16_to_float(p.scale_h);
  p.zero = fp16_to_float(p.zero_h);
  return p;
}
PKV_HD AsymParams asym_params(float mn, float mx, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  return asym_stored((mx - mn) / qmax, mn);
}
PKV_HD uint32_t asym_code(float x, float scale, float zero, int bits) {
  if (scale == 0.0f) return 0;
  const float qmax = static_cast<float>((1 << bits) - 1);
  return static_cast<uint32_t>(fminf(fmaxf(rintf((x - zero) / scale), 0.0f), qmax));
}
PKV_HD float asym_dequant(uint32_t code, float scale, float zero) {
  return static_cast<float>(code) * scale + zero;
}

// 2-bit grouped keys (one channel over a token group) are fitted, not just spanned: starting from the
// min/max grid, alternate the codes given (scale, zero) (rounding) and (scale, zero) given the codes
// (the linear least-squares fit, rounded to fp16 as stored), and keep the fit with the least squared
// error. Each round can only lower the error, so the result is never worse than min/max; at 2 bits it
// trims the range of groups whose extremes are rare (benchmarks/RESULTS.md, "Session 7: fitted 2-bit
// keys").
// Every operation is a plain fp32 add, multiply or divide in a fixed order (no contraction: the host
// build uses -ffp-contract=off, the CUDA append --fmad=false), which pagedkv.reference repeats bit for
// bit.
// Only 2-bit keys are fitted: at 4 bits the min/max grid measured better in the same probe.
constexpr int kAsymFitRounds = 12;
PKV_HD int asym_fit_rounds(int bits) { return bits == 2 ? kAsymFitRounds : 0; }

// One pass over a group under (scale, zero): its squared error and the sums the next fit needs.
struct AsymPass {
  float e = 0.0f, sc = 0.0f, sx = 0.0f, scc = 0.0f, scx = 0.0f;
};
PKV_HD AsymPass asym_pass(const float* x, int64_t stride, int n, const AsymParams& p, int bits) {
  AsymPass r;
  for (int t = 0; t < n; ++t) {
    const float v = x[t * stride];
    const uint32_t code = asym_code(v, p.scale, p.zero, bits);
    const float d = asym_dequant(code, p.scale, p.zero) - v;
    const float c = static_cast<float>(code);
    r.e += d * d;
    r.sc += c;
    r.sx += v;
    r.scc += c * c;
    r.scx += c * v;
  }
  return r;
}
PKV_HD float asym_sse(const float* x, int64_t stride, int n, const AsymParams& p, int bits) {
  return asym_pass(x, stride, n, p, bits).e;
}

PKV_HD AsymParams asym_fit(const float* x, int64_t stride, int n, int bits) {
  float mn = x[0], mx = x[0];
  for (int t = 1; t < n; ++t) {
    mn = fminf(mn, x[t * stride]);
    mx = fmaxf(mx, x[t * stride]);
  }
  AsymParams best = asym_params(mn, mx, bits);
  const int rounds = asym_fit_rounds(bits);
  if (rounds == 0) return best;
  AsymPass cur = asym_pass(x, stride, n, best, bits);
  const float fn = static_cast<float>(n);
  for (int r = 0; r < rounds; ++r) {
    const float det = fn * cur.scc - cur.sc * cur.sc;
    if (!(det > 0.0f)) break;  // one code for the whole group: nothing to fit
    const float scale = (fn * cur.scx - cur.sc * cur.sx) / det;
    if (!(scale > 0.0f)) break;
    const AsymParams p = asym_stored(scale, (cur.sx - scale * cur.sc) / fn);
    const AsymPass next = asym_pass(x, stride, n, p, bits);
    if (!(next.e < cur.e)) break;
    best = p;
    cur = next;
  }
  return best;
}

// ----------------------------------------------------------------------------------------------
// nf4: absmax-normalized NF4 codebook; absmax double-quantized to uint8 against an fp16 super-scale.
// The codebook holds the normalized quantiles of N(0, 1) (QLoRA's construction, offset 0.9677),
// computed once by tools/nf4_codebook.py.
// ----------------------------------------------------------------------------------------------
PKV_HD float nf4_value(uint32_t code) {
  constexpr float kTable[16] = {
      -1.00000000f, -0.69619289f, -0.52507304f, -0.39491749f, -0.28444136f, -0.18477344f,
      -0.09104999f, 0.00000000f,  0.07958033f,  0.16093017f,  0.24611229f,  0.33791519f,
      0.44070980f,  0.56261697f,  0.72295673f,  1.00000000f};
  return kTable[code & 15u];
}
// Decision thresholds: midpoints of consecutive codebook values (fp32 arithmetic).
PKV_HD float nf4_midpoint(int i) { return (nf4_value(i) + nf4_value(i + 1)) * 0.5f; }

struct NF4Super {
  uint16_t s2_h;
  float s2;
};
PKV_HD NF4Super nf4_super(float max_absmax) {
  NF4Super s;
  s.s2_h = fp16_from_float(fminf(max_absmax / 255.0f, kFP16Max));
  s.s2 = fp16_to_float(s.s2_h);
  return s;
}
// Rounded up, so the stored absmax never clips the unit's largest value (up to fp16 rounding of s2).
PKV_HD uint8_t nf4_absmax_code(float absmax, float s2) {
  if (s2 == 0.0f) return 0;
  return static_cast<uint8_t>(fminf(ceilf(absmax / s2), 255.0f));
}
PKV_HD float nf4_unit_scale(uint8_t absmax_code, float s2) {
  return static_cast<float>(absmax_code) * s2;
}
PKV_HD uint32_t nf4_code(float x, float unit_scale) {
  if (unit_scale == 0.0f) return 7;  // the codebook's exact zero
  const float v = fminf(fmaxf(x / unit_scale, -1.0f), 1.0f);
  uint32_t c = 0;
  for (int i = 0; i < 15; ++i) c += (v > nf4_midpoint(i)) ? 1u : 0u;
  return c;
}
PKV_HD float nf4_dequant(uint32_t code, float unit_scale) { return nf4_value(code) * unit_scale; }

}  // namespace pagedkv
