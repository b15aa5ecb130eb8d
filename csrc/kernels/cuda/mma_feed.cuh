// Device pieces shared by the two tensor-core attention kernels (attention_mma.cu: query rows as the
// mma's M side; attention_decode.cu: tokens as M, query rows as N): mma.sync wrappers, the feeds that
// turn page codes into mma operands, and a split's page lookups.
#pragma once

#include <type_traits>

#include "cuda/attention_common.cuh"

namespace pagedkv {
namespace attn {

constexpr int kStep = 16;  // tokens per warp step

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
}

// D += A B on int8 codes, exact in int32: m16n8k32, A = 16 rows x 32 k of signed bytes (four per
// register, k-contiguous: a0 row g, k 4c..4c+3; a1 row g + 8; a2 / a3 the same rows at k + 16), B = 32 k x
// 8 columns (b0 column g, k 4c..4c+3; b1 k + 16), D in the f32 mma's C layout.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory, one 16-byte row address per lane (lanes
// 8 j .. 8 j + 7: matrix j's rows); lane l receives bytes 4 (l % 4) .. 4 (l % 4) + 3 of row l / 4 of each
// matrix, in r[j]. For 8-bit codes this is the integer mma's A fragment: matrices (rows 0-7, bytes
// 0-15), (8-15, 0-15), (0-7, 16-31), (8-15, 16-31) give a0..a3 without register moves.
__device__ __forceinline__ void ldsm_x4(const void* row, uint32_t* r) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// How a format reaches the mma. kPass: 16-bit pages in the model dtype, fed as stored. kTokenScale:
// int8 / fp8 with one scale per token, fed as unscaled codes (exact in bf16 / fp16); the key scale
// multiplies the score, the value scale the probability; both mmas run in fp16 (every int8 code and
// every e4m3 value is exact in fp16), and whole 16-token steps inside one block take a fast step that
// converts four codes per word with byte permutes (int8, biased by 1152 like the magic below; the
// keys' bias is one per-row score offset; the decode kernel instead scores int8 keys on the integer
// mma, mma_s8) or the two-at-a-time e4m3 -> fp16 instruction. kDequant:
// dequantized in fp32, rounded.
// kFold (int4 / int2 with key groups of >= 16 tokens and value groups of >= 8 channels): key codes go
// to the mma as small integers, unpacked two at a time by bit operations; the key group's per-channel
// scale is folded into the query (q' = q * scale, once per group) and its zero into a per-row bias;
// values are dequantized two tokens at a time in fp16 (one subtract and one fused multiply-add per
// pair; the decode kernel instead folds value scales into P, attention_decode.cu) and P V runs in fp16
// whatever the model dtype.
enum class Feed { kPass, kTokenScale, kDequant, kFold };

template <Format F, typename T>
constexpr Feed feed_of() {
  if constexpr ((F == Format::kBF16 && std::is_same_v<T, __nv_bfloat16>) || (F == Format::kFP16 && std::is_same_v<T, __half>))
    return Feed::kPass;
  else if constexpr (F == Format::kInt8 || F == Format::kFP8E4M3)
    return Feed::kTokenScale;
  else
    return Feed::kDequant;
}

// Integer codes as 16-bit floats: OR-ing a code c < 2^7 (bf16) / 2^10 (fp16) into the mantissa of
// 128.0 / 1024.0 gives exactly 128 + c / 1024 + c.
template <typename T>
constexpr uint32_t kMagic2 = std::is_same_v<T, __nv_bfloat16> ? 0x43004300u : 0x64006400u;
template <typename T>
constexpr float kMagic = std::is_same_v<T, __nv_bfloat16> ? 128.0f : 1024.0f;

template <typename T>
__device__ __forceinline__ float round_t(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(__float2bfloat16_rn(x));
  else return __half2float(__float2half_rn(x));
}

// The 32 / BITS codes of one word as 16 / BITS pairs: r[i] = (code i, code i + 16 / BITS) + magic.
template <int BITS, typename T>
__device__ __forceinline__ void unpack_pairs(uint32_t w, uint32_t* r) {
  constexpr uint32_t m = BITS == 4 ? 0x000f000fu : 0x00030003u;
#pragma unroll
  for (int i = 0; i < 16 / BITS; ++i) r[i] = ((w >> (BITS * i)) & m) | kMagic2<T>;
}

// (x & MASK) | magic in one LOP3 (the compiler otherwise spends two, one per immediate).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(x), "n"(MASK), "r"(magic));
  return r;
}

// unpack_pairs' pairs in 1.25 (int4) / 1.4 (int2) instructions each instead of 3: even pairs are
// masked in place (magic + code), odd pairs at the next code position (magic + kHi x code; for bf16
// int4, whose 7-bit mantissa has no room for a nibble at bits 4-7, shifted down by one first: magic +
// 8 x code). One shift serves a lo / hi pair of pairs. The caller gives odd pairs' other operand
// 1 / kHi of its weight, or divides their accumulator by kHi after removing the magic's share.
template <int BITS, typename T>
constexpr int kHiShift = BITS == 4 && std::is_same_v<T, __nv_bfloat16> ? 1 : 0;
template <int BITS, typename T>
constexpr int kHi = (1 << BITS) >> kHiShift<BITS, T>;
template <int BITS, typename T>
__device__ __forceinline__ void unpack_lohi(uint32_t w, uint32_t* r) {
  constexpr uint32_t lo = BITS == 4 ? 0x000f000fu : 0x00030003u;
  constexpr int hs = kHiShift<BITS, T>;
#pragma unroll
  for (int u = 0; u < 8 / BITS; ++u) {
    const uint32_t y = w >> (2 * BITS * u);
    r[2 * u] = and_or<lo>(y, kMagic2<T>);
    r[2 * u + 1] = and_or<((lo << BITS) >> hs)>(hs ? y >> hs : y, kMagic2<T>);
  }
}

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* ptr, uint32_t* w) {
  if constexpr (N == 4) {
    const uint4 u = *reinterpret_cast<const uint4*>(ptr);
    w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
  } else if constexpr (N == 2) {
    const uint2 u = *reinterpret_cast<const uint2*>(ptr);
    w[0] = u.x; w[1] = u.y;
  } else if constexpr (N >= 8) {
    load_words<N / 2>(ptr, w);
    load_words<N / 2>(ptr + 2 * N, w + N / 2);
  } else {
    w[0] = *reinterpret_cast<const uint32_t*>(ptr);
  }
}

__device__ __forceinline__ __half2 as_h2(uint32_t u) { return *reinterpret_cast<const __half2*>(&u); }
__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<const uint32_t*>(&h); }

// Two e4m3 codes (low byte first) as an fp16 pair, in one instruction on sm_89+.
__device__ __forceinline__ uint32_t fp8x2_bits(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// kTokenScale's fast step: the word of four codes of channels 4 j .. 4 j + 3 of one token as the two
// fp16 pairs of a B fragment. int8: each byte + 128 lands in the mantissa of 1024.0 (value 1152 + code;
// the caller subtracts 1152 sum(q) from the score).
template <Format F>
__device__ __forceinline__ void key_word(uint32_t w, uint32_t& b0, uint32_t& b1) {
  if constexpr (F == Format::kInt8) {
    const uint32_t x = w ^ 0x80808080u;
    b0 = __byte_perm(x, 0x64u, 0x4140);
    b1 = __byte_perm(x, 0x64u, 0x4342);
  } else {
    b0 = fp8x2_bits(w & 0xffffu);
    b1 = fp8x2_bits(w >> 16);
  }
}

// kTokenScale's fast step: channels 4 j .. 4 j + 3 of tokens a and b (words wa, wb) as four fp16 pairs
// (a, b), one per channel, exact codes (BIASED: int8 stays 1152 + code, and the caller removes 1152
// times the sum of the probabilities it multiplies them by).
template <Format F, bool BIASED = false>
__device__ __forceinline__ void value_words(uint32_t wa, uint32_t wb, uint32_t* r) {
  key_word<F>(__byte_perm(wa, wb, 0x5140), r[0], r[1]);  // a0 b0 a1 b1
  key_word<F>(__byte_perm(wa, wb, 0x7362), r[2], r[3]);  // a2 b2 a3 b3
  if constexpr (F == Format::kInt8 && !BIASED) {  // values take the exact codes: drop the 1152 bias here
    const __half2 off = __half2(__half(1152.0f), __half(1152.0f));
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = h2_bits(__hsub2(as_h2(r[i]), off));
  }
}


template <Format F>
constexpr int code_bytes_per_token(int D) {
  return F == Format::kFP32 ? 4 * D : F == Format::kBF16 || F == Format::kFP16 ? 2 * D
         : F == Format::kInt8 || F == Format::kFP8E4M3 ? D : F == Format::kInt2 ? D / 4 : D / 2;
}

// One entry of the split: its page head region and token offset, or its row in the dense tail.
struct Tok {
  const uint8_t* head;  // null: tail or absent
  int off;              // token offset in the block, or tail row
  bool tail, ok;        // ok: in this warp's range and backed by storage
};

// Split columns as two arrays of page-head pointers (null: block outside the pages), split_heads'.
struct HeadPtrs {
  const uint8_t* const* k;
  const uint8_t* const* v;
  __device__ __forceinline__ void get(int col, const uint8_t*& kh, const uint8_t*& vh) const {
    kh = k[col];
    vh = v[col];
  }
};

// The entries of one split: Heads::get(col, kh, vh) gives column col's page heads (col counted from col0).
template <class Heads>
struct Split {
  Heads heads;
  int col0, bs_shift, bmask, iplen, iskip;
  // Entry e's key (and, with v != nullptr, value) location: one lookup serves both, since a block
  // exists for keys exactly when it does for values.
  __device__ __forceinline__ Tok at(int e, int lo, int lim, Tok* v = nullptr) const {
    Tok t{nullptr, 0, false, false};
    if (e >= lo && e < lim) {
      if (e >= iplen) {
        t.tail = t.ok = true;
        t.off = e - iplen;
      } else {
        const int pos = iskip + e, col = (pos >> bs_shift) - col0;
        const uint8_t *kh, *vh;
        heads.get(col, kh, vh);
        t.off = pos & bmask;
        t.head = kh;
        t.ok = kh != nullptr;
        if (v != nullptr) {
          *v = t;
          v->head = vh;
        }
        return t;
      }
    }
    if (v != nullptr) *v = t;
    return t;
  }
};

// Unscaled codes of channels [c0, c0 + 8) of an int8 / fp8 row, as floats.
template <Format F>
__device__ __forceinline__ void codes8(const uint8_t* row, int c0, float* x) {
  const uint2 u = *reinterpret_cast<const uint2*>(row + c0);
  const uint32_t w[2] = {u.x, u.y};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t b = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
    if constexpr (F == Format::kInt8) {
      x[i] = __uint_as_float(0x4b000000u | (b ^ 0x80u)) - 8388736.0f;
    } else {
      x[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3)));
    }
  }
}

// Channels [c0, c0 + 8) of entry tk as floats in the form the feed wants (zero when absent).
template <Format F, Role RL, Feed FD>
__device__ __forceinline__ void entry8(const KParams& p, const PageLayout& L, const Tok& tk, const void* tail,
                                       const int64_t* ts, int s, int h, int c0, const float* nf4, float* x) {
  if (tk.ok && !tk.tail) {
    if constexpr (FD == Feed::kTokenScale) {
      codes8<F>(tk.head + tk.off * code_bytes_per_token<F>(L.head_dim), c0, x);
    } else {
      load8f<F, RL>(L, tk.head, tk.off, c0, nf4, x);
    }
  } else if (tk.ok) {
    load_tail<FD != Feed::kPass>(p, tail, ts, s, h, tk.off, c0, x);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = 0.0f;
  }
}

// Scale of a kTokenScale entry (1 for tail entries and absent ones).
__device__ __forceinline__ float token_scale(const PageLayout& L, const Tok& tk) {
  return tk.ok && !tk.tail ? *reinterpret_cast<const float*>(tk.head + L.code_bytes + 4 * tk.off) : 1.0f;
}

// The end of both tensor-core kernels: merges the W warps' states of a tile of R query rows (rows
// row0 .. row0 + R - 1), each warp's fp32 accumulators in so [W][R][D] and its (max, sum) per row in
// sml [W][R][2] (maxima in base e), and writes the split's partial result for the merge kernel.
template <int W, int R>
__device__ __forceinline__ void store_split_partial(const KParams& p, const float* so, const float* sml, int s, int h,
                                                    int split, int row0, int D) {
  const int64_t base = (static_cast<int64_t>(s) * p.H + h) * p.num_splits + split;
  for (int w = threadIdx.x; w < R * D; w += blockDim.x) {
    const int r = w / D, d = w % D, gr = row0 + r;
    if (gr >= p.rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < W; ++k) mx = fmaxf(mx, sml[(k * R + r) * 2]);
    float acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float mk = sml[(k * R + r) * 2];
      if (mk == -INFINITY) continue;
      const float f = __expf(mk - mx);
      acc += f * so[(k * R + r) * D + d];
      sum += f * sml[(k * R + r) * 2 + 1];
    }
    p.pacc[(base * p.rows + gr) * D + d] = acc;
    if (d == 0) {
      p.pml[(base * p.rows + gr) * 2] = mx;
      p.pml[(base * p.rows + gr) * 2 + 1] = sum;
    }
  }
}

// Runs L::run<D, T>(k, grid, stream) for the fast head dims (64 / 128 / 256) and the model dtype
// (bf16 / fp16): the compile-time dispatch both tensor-core kernels share.
template <typename L>
cudaError_t launch_dim_dtype(const KParams& k, dim3 grid, cudaStream_t stream) {
  const bool bf = k.dtype == DType::kBF16;
  switch (k.k.L.head_dim) {
    case 64: return bf ? L::template run<64, __nv_bfloat16>(k, grid, stream) : L::template run<64, __half>(k, grid, stream);
    case 128: return bf ? L::template run<128, __nv_bfloat16>(k, grid, stream) : L::template run<128, __half>(k, grid, stream);
    case 256: return bf ? L::template run<256, __nv_bfloat16>(k, grid, stream) : L::template run<256, __half>(k, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attn
}  // namespace pagedkv
