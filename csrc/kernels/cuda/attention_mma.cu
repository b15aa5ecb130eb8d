// Tensor-core paged attention for bf16 / fp16 models (mma.sync m16n8k16, fp32 accumulation).
//
// Grid: (split, kv head x 16-row tile, sequence); 4 warps. The query rows of one KV head (its
// query group x query tokens) are the M side of the mma, padded to 16, so each page byte is read
// once for the whole group. Every warp walks its own 16-token steps of the split with its own
// online softmax (flash attention 2 style); the warps' (max, sum, acc) are merged in shared memory
// at the end and the split's partial result goes to the merge kernel (attention.cu).
//
// Loads: S = Q K^T sums over channels, so the channel order inside a k-step is free as long as
// Q uses the same one. A lane (row g = lane/4 of the B fragment = token, column c = lane%4) reads
// 8 consecutive channels 8 (4 j + c) .. +7 of its token per chunk j and feeds them to k-steps 2j
// and 2j + 1; the four lanes of a token read 4 consecutive 8-channel pieces per instruction.
// O = P V: the lane holds tokens 2c, 2c+1, 2c+8, 2c+9 of the step and output column g of every
// n-tile; n-tile t column g is channel 8 (8 (t / 8) + g) + t % 8, so 8 lanes read 64 consecutive
// channels. Codes are dequantized in registers (fp32, then rounded to the model dtype, exactly as
// the reference rounds dequantized pages), packed in pairs and fed to the mma.
#include <cfloat>
#include <climits>
#include <type_traits>

#include "cuda/attention_common.cuh"

namespace pagedkv {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = 16;  // tokens per warp step: the k of the P V mma

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

// How a format reaches the mma. kPass: 16-bit pages in the model dtype, fed as stored. kTokenScale:
// int8 / fp8 with one scale per token, fed as unscaled codes (exact in bf16 / fp16); the key scale
// multiplies the score, the value scale the probability. kDequant: dequantized in fp32, rounded.
enum class Feed { kPass, kTokenScale, kDequant };

template <Format F, typename T>
constexpr Feed feed_of() {
  if constexpr ((F == Format::kBF16 && std::is_same_v<T, __nv_bfloat16>) || (F == Format::kFP16 && std::is_same_v<T, __half>))
    return Feed::kPass;
  else if constexpr (F == Format::kInt8 || F == Format::kFP8E4M3)
    return Feed::kTokenScale;
  else
    return Feed::kDequant;
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

struct Split {
  const uint8_t* const* k_heads;  // per split column from col0 (null: block outside the pages)
  const uint8_t* const* v_heads;
  int col0, bs_shift, bmask, iplen, iskip;
  // Entry e's key (and, with v != nullptr, value) location: one lookup serves both, since a block
  // exists for keys exactly when it does for values.
  __device__ __forceinline__ Tok at(int e, int lim, Tok* v = nullptr) const {
    Tok t{nullptr, 0, false, false};
    if (e < lim) {
      if (e >= iplen) {
        t.tail = t.ok = true;
        t.off = e - iplen;
      } else {
        const int pos = iskip + e, col = (pos >> bs_shift) - col0;
        t.off = pos & bmask;
        t.head = k_heads[col];
        t.ok = t.head != nullptr;
        if (v != nullptr) {
          *v = t;
          v->head = v_heads[col];
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
template <Format F, Role RL, typename T>
__device__ __forceinline__ void entry8(const KParams& p, const PageLayout& L, const Tok& tk, const void* tail,
                                       const int64_t* ts, int s, int h, int c0, const float* nf4, float* x) {
  constexpr Feed FD = feed_of<F, T>();
  if (tk.ok && !tk.tail) {
    if constexpr (FD == Feed::kTokenScale) {
      codes8<F>(tk.head + tk.off * code_bytes_per_token<F>(L.head_dim), c0, x);
    } else {
      load8f<F, RL>(L, tk.head, tk.off, c0, nf4, x);
    }
  } else if (tk.ok) {
    load_tail(p, tail, ts, s, h, tk.off, c0, x);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = 0.0f;
  }
}

// Scale of a kTokenScale entry (1 for tail entries and absent ones).
__device__ __forceinline__ float token_scale(const PageLayout& L, const Tok& tk) {
  return tk.ok && !tk.tail ? *reinterpret_cast<const float*>(tk.head + L.code_bytes + 4 * tk.off) : 1.0f;
}

template <int D, Format F, typename T>
__global__ void __launch_bounds__(kThreads, D == 256 ? 2 : 3) attention_mma_kernel(const __grid_constant__ KParams p) {
  constexpr int KS = D / 16;   // k-steps of Q K^T
  constexpr int NT = D / 8;    // n-tiles of P V
  constexpr int KCH = D / 32;  // 8-channel key chunks per lane: channels c D/4 + 8 j
  constexpr int VG = D / 64;   // 8-channel value chunks per lane and token: channels 8 (8 vg + g)
  constexpr Feed FD = feed_of<F, T>();
  constexpr int CBT = code_bytes_per_token<F>(D);
  extern __shared__ __align__(16) uint8_t smem[];
  uint4* sq = reinterpret_cast<uint4*>(smem);                 // [KS][32] query A fragments
  float* so = reinterpret_cast<float*>(smem + KS * 32 * 16);  // [kWarps][16][D] warp accumulators
  float* sml = so + kWarps * 16 * D;                          // [kWarps][16][2] warp (max, sum)
  __shared__ float nf4[16];
  __shared__ int row_lo[16], row_hi[16];
  __shared__ const uint8_t* k_heads[kMaxSplitBlocks];
  __shared__ const uint8_t* v_heads[kMaxSplitBlocks];

  const int split = blockIdx.x;
  const int h = blockIdx.y / p.row_tiles, rt = blockIdx.y % p.row_tiles;
  const int s = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t plen = p.lens[s];
  const int64_t skip = p.skip ? p.skip[s] : 0;
  const int64_t n = plen + p.tail_len;
  if (tid < 16) {
    nf4[tid] = kNF4[tid];
    const int gr = rt * 16 + tid;
    int lo = INT_MAX, hi = -1;
    if (gr < p.rows) {
      const int64_t h64 = n - p.Lq + gr / p.gqa;
      hi = static_cast<int>(h64);
      lo = p.window > 0 ? static_cast<int>(max(h64 - p.window + 1, static_cast<int64_t>(0))) : 0;
    }
    row_lo[tid] = lo;
    row_hi[tid] = hi;
  }
  // Query A fragments: k-step kk, slots 0..3 (a0 low/high, a2 low/high) are the lane's channels
  // c D/4 + 4 kk + slot, the order in which the key chunks are read.
  for (int idx = tid; idx < KS * 32; idx += kThreads) {
    const int kk = idx >> 5, ln = idx & 31, r = ln >> 2, cc = ln & 3;
    const int d0 = cc * (D / 4) + 4 * kk;
    uint32_t w[4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int gr = rt * 16 + r + 8 * half;
      float4 q = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (gr < p.rows) {
        const int t = gr / p.gqa, j = gr % p.gqa;
        q = *reinterpret_cast<const float4*>(p.q + ((static_cast<int64_t>(s) * p.Hq + h * p.gqa + j) * p.Lq + t) * D +
                                             d0);
      }
      w[half] = pack2<T>(q.x, q.y);
      w[2 + half] = pack2<T>(q.z, q.w);
    }
    sq[idx] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  __syncthreads();
  int lo_all = INT_MAX, hi_all = -1;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    lo_all = min(lo_all, row_lo[r]);
    hi_all = max(hi_all, row_hi[r]);
  }
  const int64_t S = p.split_tokens;
  const int64_t e0 = max(static_cast<int64_t>(split) * S, static_cast<int64_t>(lo_all));
  const int64_t e1 = min(min((static_cast<int64_t>(split) + 1) * S, n), static_cast<int64_t>(hi_all) + 1);
  const int64_t len = max(e1 - e0, static_cast<int64_t>(0));
  const uint8_t* mask = p.mask ? p.mask + s * p.mask_stride + p.mask_offset : nullptr;
  const int mask_n = static_cast<int>(min(p.mask_len - p.mask_offset, static_cast<int64_t>(1) << 30));

  const int bs_shift = __ffs(p.k.L.block_size) - 1;
  const int col0 = static_cast<int>((skip + e0) >> bs_shift);
  const int ncols = len > 0 ? static_cast<int>((skip + e1 - 1) >> bs_shift) - col0 + 1 : 0;
  split_heads(p, s, h, col0, ncols, k_heads, v_heads, tid, kThreads);
  __syncthreads();
  const Split sp{k_heads, v_heads, col0, bs_shift, (1 << bs_shift) - 1, static_cast<int>(plen),
                 static_cast<int>(skip)};
  const int lo0 = row_lo[g], hi0 = row_hi[g], lo1 = row_lo[g + 8], hi1 = row_hi[g + 8];
  // Each warp takes a contiguous run of 16-token steps.
  const int ie0 = static_cast<int>(e0), ilen = static_cast<int>(len);
  const int per_warp = (ilen + 16 * kWarps - 1) / (16 * kWarps) * 16;
  const int w0 = ie0 + warp * per_warp, lim = min(w0 + per_warp, ie0 + ilen);

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;

  for (int st = w0; st < lim; st += kStep) {
    // Scores of tokens st .. st + 15 (two n-tiles of 8); this lane reads the keys of token st + 8 t + g.
    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
      const int e = st + 8 * t + g;
      const Tok tk = sp.at(e, lim);
      // Only the loads may differ between lanes: mma.sync must be issued by the whole warp together.
#pragma unroll
      for (int j = 0; j < KCH; ++j) {
        uint32_t b[4];
        bool done = false;
        if constexpr (FD == Feed::kPass) {
          if (tk.ok && !tk.tail) {
            const uint4 w = *reinterpret_cast<const uint4*>(tk.head + tk.off * CBT + 2 * (c * (D / 4) + 8 * j));
            b[0] = w.x;
            b[1] = w.y;
            b[2] = w.z;
            b[3] = w.w;
            done = true;
          }
        }
        if (!done) {
          float x[8];
          entry8<F, Role::kKey, T>(p, p.k.L, tk, p.kt, p.kts, s, h, c * (D / 4) + 8 * j, nf4, x);
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = pack2<T>(x[2 * i], x[2 * i + 1]);
        }
        mma<T>(sc[t], sq[(2 * j) * 32 + lane], b[0], b[1]);
        mma<T>(sc[t], sq[(2 * j + 1) * 32 + lane], b[2], b[3]);
      }
    }
    // The lane's score columns: tokens st + 8 t + 2 c + i, which are also its value tokens.
    Tok kc[2][2], vc[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 2; ++i) kc[t][i] = sp.at(st + 8 * t + 2 * c + i, lim, &vc[t][i]);
    // Scale, cap, mask; online softmax per row (rows g and g + 8; the 4 lanes of a row share it).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int e = st + 8 * t + 2 * c + i;
        const bool ok = kc[t][i].ok && (mask == nullptr || e >= mask_n || mask[e] != 0);
        float f = p.scale;
        if constexpr (FD == Feed::kTokenScale) f *= token_scale(p.k.L, kc[t][i]);
        float v0 = sc[t][i] * f, v1 = sc[t][2 + i] * f;
        if (p.softcap > 0.0f) {
          v0 = p.softcap * tanhf(v0 / p.softcap);
          v1 = p.softcap * tanhf(v1 / p.softcap);
        }
        sc[t][i] = ok && e >= lo0 && e <= hi0 ? v0 : -INFINITY;
        sc[t][2 + i] = ok && e >= lo1 && e <= hi1 ? v1 : -INFINITY;
        mx0 = fmaxf(mx0, sc[t][i]);
        mx1 = fmaxf(mx1, sc[t][2 + i]);
      }
    }
#pragma unroll
    for (int d = 1; d <= 2; d <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, d));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, d));
    }
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float a0 = m0 == -INFINITY ? 0.0f : __expf(m0 - n0), a1 = m1 == -INFINITY ? 0.0f : __expf(m1 - n1);
    m0 = n0;
    m1 = n1;
    float pr[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        pr[t][i] = n0 == -INFINITY ? 0.0f : __expf(sc[t][i] - n0);
        pr[t][2 + i] = n1 == -INFINITY ? 0.0f : __expf(sc[t][2 + i] - n1);
      }
    }
    l0 = l0 * a0 + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    l1 = l1 * a1 + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      o[t][0] *= a0;
      o[t][1] *= a0;
      o[t][2] *= a1;
      o[t][3] *= a1;
    }
    // Probabilities as the A fragment, rounded to the model dtype (times the value scale for
    // kTokenScale: P diag(s) codes = P V).
    float pv[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float f = 1.0f;
        if constexpr (FD == Feed::kTokenScale) f = token_scale(p.v.L, vc[t][i]);
        pv[t][i] = pr[t][i] * f;
        pv[t][2 + i] = pr[t][2 + i] * f;
      }
    const uint4 pa = make_uint4(pack2<T>(pv[0][0], pv[0][1]), pack2<T>(pv[0][2], pv[0][3]),
                                pack2<T>(pv[1][0], pv[1][1]), pack2<T>(pv[1][2], pv[1][3]));
    // Values of tokens 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1), output column g of every n-tile.
    uint32_t vb[2][NT];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const Tok& ta = vc[t][0];
      const Tok& tb = vc[t][1];
#pragma unroll
      for (int q = 0; q < VG; ++q) {
        const int c0 = 8 * (8 * q + g);
        bool done = false;
        if constexpr (FD == Feed::kPass) {
          if (ta.ok && !ta.tail && tb.ok && !tb.tail) {
            const uint4 ua = *reinterpret_cast<const uint4*>(ta.head + ta.off * CBT + 2 * c0);
            const uint4 ub = *reinterpret_cast<const uint4*>(tb.head + tb.off * CBT + 2 * c0);
            const uint32_t wa[4] = {ua.x, ua.y, ua.z, ua.w}, wb[4] = {ub.x, ub.y, ub.z, ub.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              vb[t][8 * q + 2 * i] = __byte_perm(wa[i], wb[i], 0x5410);
              vb[t][8 * q + 2 * i + 1] = __byte_perm(wa[i], wb[i], 0x7632);
            }
            done = true;
          }
        }
        if (!done) {
          float xa[8], xb[8];
          entry8<F, Role::kValue, T>(p, p.v.L, ta, p.vt, p.vts, s, h, c0, nf4, xa);
          entry8<F, Role::kValue, T>(p, p.v.L, tb, p.vt, p.vts, s, h, c0, nf4, xb);
#pragma unroll
          for (int i = 0; i < 8; ++i) vb[t][8 * q + i] = pack2<T>(xa[i], xb[i]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) mma<T>(o[t], pa, vb[0][t], vb[1][t]);
  }

  // Merge the warps: full row sums, then each warp's state to shared memory.
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, d);
    l1 += __shfl_xor_sync(0xffffffffu, l1, d);
  }
  float* ow = so + warp * 16 * D;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int d = 8 * (8 * (t >> 3) + 2 * c + i) + (t & 7);
      ow[g * D + d] = o[t][i];
      ow[(g + 8) * D + d] = o[t][2 + i];
    }
  }
  if (c == 0) {
    float* mlw = sml + warp * 32;
    mlw[2 * g] = m0;
    mlw[2 * g + 1] = l0;
    mlw[2 * (g + 8)] = m1;
    mlw[2 * (g + 8) + 1] = l1;
  }
  __syncthreads();
  const int64_t base = (static_cast<int64_t>(s) * p.H + h) * p.num_splits + split;
  for (int w = tid; w < 16 * D; w += kThreads) {
    const int r = w / D, d = w % D;
    const int gr = rt * 16 + r;
    if (gr >= p.rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) mx = fmaxf(mx, sml[k * 32 + 2 * r]);
    float acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) {
      const float mk = sml[k * 32 + 2 * r];
      if (mk == -INFINITY) continue;
      const float f = __expf(mk - mx);
      acc += f * so[(k * 16 + r) * D + d];
      sum += f * sml[k * 32 + 2 * r + 1];
    }
    p.pacc[(base * p.rows + gr) * D + d] = acc;
    if (d == 0) {
      p.pml[(base * p.rows + gr) * 2] = mx;
      p.pml[(base * p.rows + gr) * 2 + 1] = sum;
    }
  }
}

template <int D, Format F, typename T>
cudaError_t launch(const KParams& k, dim3 grid, cudaStream_t stream) {
  const size_t smem = (D / 16) * 32 * 16 + sizeof(float) * kWarps * 16 * (D + 2);
  PKV_CUDA_TRY(cudaFuncSetAttribute(attention_mma_kernel<D, F, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  attention_mma_kernel<D, F, T><<<grid, kThreads, smem, stream>>>(k);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t launch_format(const KParams& k, dim3 grid, cudaStream_t stream) {
  switch (k.k.L.format) {
    case Format::kBF16: return launch<D, Format::kBF16, T>(k, grid, stream);
    case Format::kFP16: return launch<D, Format::kFP16, T>(k, grid, stream);
    case Format::kFP8E4M3: return launch<D, Format::kFP8E4M3, T>(k, grid, stream);
    case Format::kInt8: return launch<D, Format::kInt8, T>(k, grid, stream);
    case Format::kInt4: return launch<D, Format::kInt4, T>(k, grid, stream);
    case Format::kInt2: return launch<D, Format::kInt2, T>(k, grid, stream);
    case Format::kNF4: return launch<D, Format::kNF4, T>(k, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_dim(const KParams& k, dim3 grid, cudaStream_t stream) {
  switch (k.k.L.head_dim) {
    case 64: return launch_format<64, T>(k, grid, stream);
    case 128: return launch_format<128, T>(k, grid, stream);
    case 256: return launch_format<256, T>(k, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_mma_supported(const AttentionParams& p) {
  const int64_t D = p.head_dim();
  const Format f = p.k.layout.format;
  return (p.dtype == DType::kBF16 || p.dtype == DType::kF16) && (D == 64 || D == 128 || D == 256) &&
         f == p.v.layout.format && f != Format::kFP32;
}

cudaError_t attention_mma_launch(const KParams& k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(k.num_splits), static_cast<unsigned>(k.H * k.row_tiles),
                  static_cast<unsigned>(k.B));
  return k.dtype == DType::kBF16 ? launch_dim<__nv_bfloat16>(k, grid, stream) : launch_dim<__half>(k, grid, stream);
}

}  // namespace pagedkv
