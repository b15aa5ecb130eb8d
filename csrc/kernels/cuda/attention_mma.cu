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

// Where entry e of the split lives: page head region + token offset, or the dense tail.
struct Entries {
  const uint8_t* const* heads;  // per split column from col0 (null: block outside the pages)
  int col0, bs_shift, bmask, iplen, iskip, ie1;
  __device__ __forceinline__ const uint8_t* head(int e, int& off) const {
    const int pos = iskip + e;
    off = pos & bmask;
    return heads[(pos >> bs_shift) - col0];
  }
  // In the split and backed by storage (a page block that exists, or the tail).
  __device__ __forceinline__ bool present(int e) const {
    if (e >= ie1) return false;
    if (e >= iplen) return true;
    int off;
    return head(e, off) != nullptr;
  }
};

// Channels [c0, c0 + 8) of entry e (zero when absent).
template <Format F, Role RL>
__device__ __forceinline__ void load_entry(const KParams& p, const Entries& en, const PageLayout& L, const void* tail,
                                           const int64_t* ts, int s, int h, int e, int c0, const float* nf4,
                                           float* x) {
  if (e < en.ie1) {
    if (e < en.iplen) {
      int off;
      const uint8_t* hd = en.head(e, off);
      if (hd != nullptr) {
        load8f<F, RL>(L, hd, off, c0, nf4, x);
        return;
      }
    } else {
      load_tail(p, tail, ts, s, h, e - en.iplen, c0, x);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = 0.0f;
}

template <int D, Format F, typename T>
__global__ void __launch_bounds__(kThreads, D == 256 ? 2 : 3) attention_mma_kernel(const __grid_constant__ KParams p) {
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int NT = D / 8;   // n-tiles of P V
  constexpr int KCH = D / 32; // 8-channel key chunks per lane
  constexpr int VG = D / 64;  // 8-channel value chunks per lane and token
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
  // Query A fragments, in the channel order the key loads use (see the file comment).
  for (int idx = tid; idx < KS * 32; idx += kThreads) {
    const int kk = idx >> 5, ln = idx & 31, r = ln >> 2, cc = ln & 3;
    const int d0 = 8 * (4 * (kk >> 1) + cc) + 4 * (kk & 1);
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
      w[half] = pack2<T>(q.x, q.y);      // a0 / a1: k = 2c, 2c + 1
      w[2 + half] = pack2<T>(q.z, q.w);  // a2 / a3: k = 2c + 8, 2c + 9
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
  for (int j = tid; j < ncols && j < kMaxSplitBlocks; j += kThreads) {
    const int64_t col = col0 + j;
    const int64_t blk = col < p.max_blocks ? p.table[static_cast<int64_t>(s) * p.max_blocks + col] : -1;
    const bool ok = blk >= 0 && blk < p.k.id_space && blk < p.v.id_space;
    k_heads[j] = ok ? p.k.chunk[blk / p.k.bpc] + (blk % p.k.bpc) * p.k.L.block_bytes + h * p.k.L.head_bytes : nullptr;
    v_heads[j] = ok ? p.v.chunk[blk / p.v.bpc] + (blk % p.v.bpc) * p.v.L.block_bytes + h * p.v.L.head_bytes : nullptr;
  }
  __syncthreads();
  const int ie0 = static_cast<int>(e0), ie1 = static_cast<int>(e0 + len);
  const Entries ke{k_heads, col0, bs_shift, (1 << bs_shift) - 1, static_cast<int>(plen), static_cast<int>(skip), ie1};
  Entries ve = ke;
  ve.heads = v_heads;
  const int lo0 = row_lo[g], hi0 = row_hi[g], lo1 = row_lo[g + 8], hi1 = row_hi[g + 8];

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;

  for (int st = ie0 + kStep * warp; st < ie1; st += kStep * kWarps) {
    // Scores of tokens st .. st + 15 (two n-tiles of 8).
    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
      const int e = st + 8 * t + g;
#pragma unroll
      for (int j = 0; j < KCH; ++j) {
        float x[8];
        load_entry<F, Role::kKey>(p, ke, p.k.L, p.kt, p.kts, s, h, e, 8 * (4 * j + c), nf4, x);
        mma<T>(sc[t], sq[(2 * j) * 32 + lane], pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]));
        mma<T>(sc[t], sq[(2 * j + 1) * 32 + lane], pack2<T>(x[4], x[5]), pack2<T>(x[6], x[7]));
      }
    }
    // Scale, cap, mask; online softmax per row (rows g and g + 8; the 4 lanes of a row share it).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int e = st + 8 * t + 2 * c + i;
        const bool ok = ke.present(e) && (mask == nullptr || e >= mask_n || mask[e] != 0);
        float v0 = sc[t][i] * p.scale, v1 = sc[t][2 + i] * p.scale;
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
    const uint4 pa = make_uint4(pack2<T>(pr[0][0], pr[0][1]), pack2<T>(pr[0][2], pr[0][3]),
                                pack2<T>(pr[1][0], pr[1][1]), pack2<T>(pr[1][2], pr[1][3]));
    // Values of tokens 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1), output column g of every n-tile.
    uint32_t vb[2][NT];
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      const int e = st + 2 * c + 8 * pair;
#pragma unroll
      for (int vg = 0; vg < VG; ++vg) {
        float xa[8], xb[8];
        const int c0 = 8 * (8 * vg + g);
        load_entry<F, Role::kValue>(p, ve, p.v.L, p.vt, p.vts, s, h, e, c0, nf4, xa);
        load_entry<F, Role::kValue>(p, ve, p.v.L, p.vt, p.vts, s, h, e + 1, c0, nf4, xb);
#pragma unroll
        for (int i = 0; i < 8; ++i) vb[pair][8 * vg + i] = pack2<T>(xa[i], xb[i]);
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
