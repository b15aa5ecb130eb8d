// 16-lane fp32 vectors for the CPU attention kernel, as GCC/Clang vector extensions: one AVX-512
// register each. Used where plain loops compiled badly: small accumulator arrays kept in memory
// (store-forwarding chains), horizontal sums reduced in order (one dependent scalar add per lane),
// byte widening done one byte at a time. The kernel takes these paths only where kSimd16 holds
// (AVX-512); lowered to narrower registers they were slower than the plain loops. Torch-free.
#pragma once

#include <cstdint>

#include "pagedkv/quant_ref.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pagedkv {

// Two-vector shuffle with constant lane indices (GCC before 12 has only __builtin_shuffle).
#if defined(__clang__)
#define PKV_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PKV_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i32x16{__VA_ARGS__})
#endif

#if defined(__AVX512F__)
constexpr bool kSimd16 = true;
#else
constexpr bool kSimd16 = false;
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
// Unaligned views for loads and stores (a memcpy into a vector compiled to scalar byte moves).
typedef float f32x16_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint8_t u8x16_u __attribute__((vector_size(16), aligned(1), may_alias));
typedef int8_t i8x16_u __attribute__((vector_size(16), aligned(1), may_alias));

inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_u*>(p); }
inline void store16(float* p, const f32x16& v) { *reinterpret_cast<f32x16_u*>(p) = v; }
inline f32x16 splat16(float x) { return f32x16{} + x; }
// 16 bytes, zero- / sign-extended to 32-bit lanes: one vpmovzxbd / vpmovsxbd on AVX-512 (GCC's
// generic conversion took several shuffles, and a direct 8-to-32-bit __builtin_convertvector was
// scalarized by GCC 12); two generic conversion steps elsewhere.
inline i32x16 load_bytes16(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<i32x16>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  const u16x16 w = __builtin_convertvector(*reinterpret_cast<const u8x16_u*>(p), u16x16);
  return __builtin_convertvector(w, i32x16);
#endif
}
inline i32x16 load_int8x16(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<i32x16>(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  const i16x16 w = __builtin_convertvector(*reinterpret_cast<const i8x16_u*>(p), i16x16);
  return __builtin_convertvector(w, i32x16);
#endif
}

// 16 bf16 / fp16 values to floats: bf16 by a 16-bit shift, fp16 by vcvtph2ps (AVX-512); generic
// element loops elsewhere.
inline f32x16 bf16x16_to_f32x16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<f32x16>(_mm512_slli_epi32(w, 16));
#else
  i32x16 w;
  for (int l = 0; l < 16; ++l) w[l] = static_cast<int32_t>(static_cast<uint32_t>(p[l]) << 16);
  return reinterpret_cast<f32x16>(w);
#endif
}
inline f32x16 f16x16_to_f32x16(const uint16_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  f32x16 v;
  for (int l = 0; l < 16; ++l) v[l] = fp16_to_float(p[l]);
  return v;
#endif
}

// fp8 e4m3fn codes (zero-extended bytes) to floats, as fp8e4m3_to_float: the 7 magnitude bits
// placed under the fp32 exponent field and rebiased by adding 120 to it (normals), m * 2^-9
// (subnormals), NaN for 0x7f / 0xff. Integer rebias: a float multiply would see denormal inputs.
inline f32x16 fp8e4m3_to_f32x16(const i32x16& b) {
  const i32x16 mag = b & 0x7f, sign = (b & 0x80) << 24;
  const f32x16 sub = __builtin_convertvector(mag, f32x16) * 0x1p-9f;
  i32x16 bits = mag < 8 ? reinterpret_cast<i32x16>(sub) : (mag << 20) + (120 << 23);
  bits = mag == 0x7f ? i32x16{} + 0x7fc00000 : bits;
  return reinterpret_cast<f32x16>(bits | sign);  // vector casts reinterpret the bits
}

// table[idx[l]] per lane, idx in [0, 16).
inline f32x16 lookup16(const f32x16& table, const i32x16& idx) {
#if defined(__clang__)
  f32x16 r;
  for (int l = 0; l < 16; ++l) r[l] = table[idx[l] & 15];
  return r;
#else
  return __builtin_shuffle(table, idx);  // one vpermps on AVX-512
#endif
}

// Lanes 0-7 of a and b interleaved (a0 b0 a1 b1 ...), and lanes 8-15.
inline f32x16 interleave_lo(const f32x16& a, const f32x16& b) {
  return PKV_SHUFFLE(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
}
inline f32x16 interleave_hi(const f32x16& a, const f32x16& b) {
  return PKV_SHUFFLE(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}

// Lane t of the result is the sum of the 16 lanes of v[t]: a transposing tree, 15 pairs of
// (two shuffles, one add) for 16 sums instead of a 4-level reduction per vector.
inline f32x16 sum_lanes16(const f32x16 (&v)[16]) {
  f32x16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: 8 partial sums of v[2i]; 8-15: of v[2i+1]
    const f32x16 x = v[2 * i], y = v[2 * i + 1];
    a[i] = PKV_SHUFFLE(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           PKV_SHUFFLE(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // 4 lanes per vector
    const f32x16 x = a[2 * i], y = a[2 * i + 1];
    b[i] = PKV_SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           PKV_SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // 2 lanes per vector
    const f32x16 x = b[2 * i], y = b[2 * i + 1];
    c[i] = PKV_SHUFFLE(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           PKV_SHUFFLE(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return PKV_SHUFFLE(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         PKV_SHUFFLE(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

}  // namespace pagedkv
