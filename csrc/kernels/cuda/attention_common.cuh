// Device pieces shared by the CUDA attention kernels (attention.cu: fp32 CUDA-core kernel and the
// merge; attention_mma.cu: tensor-core kernel): kernel parameters, and the dequantization of 8
// consecutive channels of one token from a page head region (codes + metadata) into fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/attention_cuda.h"

namespace pagedkv {
namespace attn {

#ifdef PAGEDKV_MAX_SPLIT_BLOCKS  // experiments
constexpr int kMaxSplitBlocks = PAGEDKV_MAX_SPLIT_BLOCKS;
#else
constexpr int kMaxSplitBlocks = 2048 / 16 + 2;  // block-table columns of the longest split
#endif
// The decode kernel keeps 4 bytes a column (attention_decode.cu, SplitCols) where split_heads keeps
// 16, so its splits may span 4x the columns in the same shared memory.
constexpr int kDecodeSplitCols = 4 * kMaxSplitBlocks;

struct DevView {
  const uint8_t* chunk[kMaxAttentionChunks];
  PageLayout L;
  int32_t bpc;
  int64_t id_space;
};

struct KParams {
  DevView k, v;
  const int32_t* table;
  int64_t max_blocks;
  const int32_t* lens;
  const int32_t* skip;
  const void* q;  // [B, Hq, Lq, D] contiguous, in `dtype`
  const void* kt;
  const void* vt;
  int64_t kts[3], vts[3];
  int64_t tail_len;
  DType dtype;
  const uint8_t* mask;
  int64_t mask_stride, mask_offset, mask_len;
  int32_t B, Hq, Lq, H, gqa, rows, row_tiles;
  float scale, softcap;
  int64_t window;
  int64_t split_tokens, num_splits;
  float* pacc;
  float* pml;
  void* out;
};

// Asynchronous global -> shared copies of N = 4, 8 or 16 bytes (16: bypassing L1), in commit groups;
// cp_async16_s takes a 32-bit shared address. A thread that waits for its own groups sees its own
// copies without a barrier.
__device__ __forceinline__ void cp_async16_s(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
template <int N>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (N == 16) cp_async16_s(a, src);
  else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(a), "l"(src), "n"(N));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Programmatic dependent launch (Hopper and later; no-ops below): a kernel launched with the
// programmatic stream serialization attribute may start while the kernel before it finishes, and
// waits for that kernel's completion and memory in grid_dependency_wait; grid_dependents_launch lets
// the next such kernel start before this one's blocks exit.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(PAGEDKV_NO_PDL)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(PAGEDKV_NO_PDL)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
constexpr int kMaxDevices = 64;  // per-device host caches below

// Whether the current device takes programmatic launches (compute capability >= 9), cached per device.
inline bool programmatic_launch_supported() {
#ifdef PAGEDKV_NO_PDL
  return false;
#else
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: unknown, 1: no, 2: yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  int known = cached[dev].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0;
    known = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 ? 2 : 1;
    cached[dev].store(known, std::memory_order_relaxed);
  }
  return known == 2;
#endif
}

// Raises Kernel's dynamic shared-memory cap to at least smem bytes on the current device, calling
// cudaFuncSetAttribute only when the cap set there so far is lower (it cost about 3.5 us a call, on
// every launch, under the profiler). The cache outlives a cudaDeviceReset, which torch never calls.
template <auto Kernel>
inline cudaError_t allow_smem(size_t smem) {
  static std::atomic<int> cap[kMaxDevices] = {};
  int dev = 0;
  PKV_CUDA_TRY(cudaGetDevice(&dev));
  const int want = static_cast<int>(smem);
  if (dev >= 0 && dev < kMaxDevices && cap[dev].load(std::memory_order_relaxed) >= want) return cudaSuccess;
  PKV_CUDA_TRY(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, want));
  if (dev >= 0 && dev < kMaxDevices) {
    int cur = cap[dev].load(std::memory_order_relaxed);
    while (cur < want && !cap[dev].compare_exchange_weak(cur, want, std::memory_order_relaxed)) {
    }
  }
  return cudaSuccess;
}

// Launches kernel<<<grid, block, smem, stream>>>(k), programmatically where the device takes it.
template <typename Kernel, typename Params>
inline cudaError_t launch_programmatic(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                       const Params& k) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, k);
}

__device__ __forceinline__ float round_to(float x, DType dt) {
  if (dt == DType::kBF16) return __bfloat162float(__float2bfloat16_rn(x));
  if (dt == DType::kF16) return __half2float(__float2half_rn(x));
  return x;
}

static __constant__ float kNF4[16] = {
    -1.00000000f, -0.69619289f, -0.52507304f, -0.39491749f, -0.28444136f, -0.18477344f, -0.09104999f, 0.00000000f,
    0.07958033f,  0.16093017f,  0.24611229f,  0.33791519f,  0.44070980f,  0.56261697f,  0.72295673f,  1.00000000f};

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }

__device__ __forceinline__ float load_scalar(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kBF16: return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
    default: return h2f(static_cast<const uint16_t*>(base)[i]);
  }
}

// Element index of channel 0 of query row gr (query token gr / gqa of head h * gqa + gr % gqa) of sequence s.
__device__ __forceinline__ int64_t query_row(const KParams& p, int s, int h, int gr, int D) {
  const int t = gr / p.gqa, j = gr % p.gqa;
  return ((static_cast<int64_t>(s) * p.Hq + h * p.gqa + j) * p.Lq + t) * D;
}

// Channel d of query row gr of sequence s, as fp32.
__device__ __forceinline__ float query_at(const KParams& p, int s, int h, int gr, int D, int d) {
  return load_scalar(p.q, p.dtype, query_row(p, s, h, gr, D) + d);
}

// Channels [d0, d0 + 8) of query row gr as fp32: 8 independent loads (one round trip), the dtype
// switched once.
__device__ __forceinline__ void query8(const KParams& p, int s, int h, int gr, int D, int d0, float* x) {
  const int64_t i0 = query_row(p, s, h, gr, D) + d0;
  if (p.dtype == DType::kF32) {
    const float* q = static_cast<const float*>(p.q) + i0;
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = q[i];
  } else {
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + i0;
    uint16_t u[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) u[i] = q[i];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = p.dtype == DType::kBF16 ? __uint_as_float(static_cast<uint32_t>(u[i]) << 16) : h2f(u[i]);
  }
}

// Entries [lo, hi] query row gr may attend in a sequence of n entries: causal inside the query
// chunk (its token t sits at entry n - Lq + t), limited to the window when there is one.
__device__ __forceinline__ void row_window(const KParams& p, int64_t n, int gr, int64_t& lo, int64_t& hi) {
  hi = n - p.Lq + gr / p.gqa;
  lo = p.window > 0 ? max(hi - p.window + 1, static_cast<int64_t>(0)) : 0;
}

// Split `split`'s entries, [e0, e1), clipped to the rows' union [lo, hi]; e1 <= e0 when empty.
__device__ __forceinline__ void split_range(const KParams& p, int split, int64_t n, int64_t lo, int64_t hi,
                                            int64_t& e0, int64_t& e1) {
  e0 = max(static_cast<int64_t>(split) * p.split_tokens, lo);
  e1 = min(min((static_cast<int64_t>(split) + 1) * p.split_tokens, n), hi + 1);
}

// Loads channels [c0, c0 + 8) of tail token t (the dense full-precision part) of sequence s, head h
// (c0 a multiple of 8) in one 16-byte load (two for fp32): the op hands the kernels tails whose base
// and strides are 16-byte aligned (paged_attention_cuda_op). Element loads (a lane quarter's 8-channel
// runs hit a different 32-byte sector per lane) made the generic steps over a 192-token int4 tail at
// head_dim 256 take several times the rest of a decode call.
// VEC = false, or PAGEDKV_TAIL_VEC=0 (an A/B switch for the register allocation it moves), keeps
// the element loads: the tensor-core kernels of 16-bit pages take them, since those formats page
// every token (a tail of about one) and the vector path made them spill at head_dim 128.
#ifndef PAGEDKV_TAIL_VEC
#define PAGEDKV_TAIL_VEC 1
#endif
// TT: the tail's type when the caller knows it (__half or __nv_bfloat16: no branch on p.dtype).
template <bool VEC = true, typename TT = void>
__device__ __forceinline__ void load_tail(const KParams& p, const void* tail, const int64_t* ts, int s, int h, int t,
                                          int c0, float* x) {
  const int64_t base = s * ts[0] + h * ts[1] + static_cast<int64_t>(t) * ts[2] + c0;
  if (!VEC || !PAGEDKV_TAIL_VEC) {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = load_scalar(tail, p.dtype, base + i);
    return;
  }
  if (std::is_void_v<TT> && p.dtype == DType::kF32) {
    const float* ptr = static_cast<const float*>(tail) + base;
    const float4 a = *reinterpret_cast<const float4*>(ptr), b = *reinterpret_cast<const float4*>(ptr + 4);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    return;
  }
  const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(tail) + base);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  const bool bf = std::is_void_v<TT> ? p.dtype == DType::kBF16 : std::is_same_v<TT, __nv_bfloat16>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = bf ? __uint_as_float(w[i] << 16) : h2f(static_cast<uint16_t>(w[i] & 0xffffu));
    x[2 * i + 1] = bf ? __uint_as_float(w[i] & 0xffff0000u) : h2f(static_cast<uint16_t>(w[i] >> 16));
  }
}

// Dequantizes channels [c0, c0 + 8) of token o in one head region (format F, role RL; the layout
// supplies sizes and groups). `nf4` is the NF4 code book (16 floats, shared memory).
template <Format F, Role RL>
__device__ __forceinline__ void load8f(const PageLayout& L, const uint8_t* head, int o, int c0, const float* nf4,
                                       float* x) {
  const int D = L.head_dim;
  const uint8_t* row = head + static_cast<int64_t>(o) * L.code_bytes_per_token;
  const uint8_t* meta = head + L.code_bytes;
  if constexpr (F == Format::kFP32) {
    const float4 a = *reinterpret_cast<const float4*>(row + 4 * c0);
    const float4 b = *reinterpret_cast<const float4*>(row + 4 * c0 + 16);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else if constexpr (F == Format::kBF16 || F == Format::kFP16) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 2 * c0);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (F == Format::kBF16) {
        x[2 * i] = __uint_as_float(w[i] << 16);
        x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        x[2 * i] = h2f(static_cast<uint16_t>(w[i] & 0xffffu));
        x[2 * i + 1] = h2f(static_cast<uint16_t>(w[i] >> 16));
      }
    }
  } else if constexpr (F == Format::kInt8 || F == Format::kFP8E4M3) {
    const uint2 u = *reinterpret_cast<const uint2*>(row + c0);
    const float s = *reinterpret_cast<const float*>(meta + 4 * o);
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t b = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
      if constexpr (F == Format::kInt8) {
        // Biased (b ^ 0x80 = value + 128) under the 2^23 exponent: exact without an int conversion.
        x[i] = (__uint_as_float(0x4b000000u | (b ^ 0x80u)) - 8388736.0f) * s;
      } else {
        x[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3))) * s;
      }
    }
  } else {  // int4, nf4, int2
    constexpr int bits = F == Format::kInt2 ? 2 : 4;
    const uint32_t u = bits == 4 ? *reinterpret_cast<const uint32_t*>(row + c0 / 2)
                                 : *reinterpret_cast<const uint16_t*>(row + c0 / 4);
    uint32_t ci[8];
    float code[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      ci[i] = (u >> (bits * i)) & ((1u << bits) - 1u);
      // 2^23 + code as a float bit pattern, minus 2^23: the code as a float without a conversion.
      code[i] = __uint_as_float(0x4b000000u | ci[i]) - 8388608.0f;
    }
    if constexpr (RL == Role::kKey) {
      // Fast paths only: the key group divides a power-of-two block size, so it is a power of two.
      const int gi = o >> (__ffs(L.group) - 1);
      if constexpr (F == Format::kNF4) {
        const int64_t supers = L.block_size / L.group;
        const float s2 = h2f(*reinterpret_cast<const uint16_t*>(meta + 2 * gi));
        // The absmax codes start 2 * supers bytes into the metadata: 2-byte aligned only.
        const uint16_t* a = reinterpret_cast<const uint16_t*>(meta + 2 * supers + static_cast<int64_t>(gi) * D + c0);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          x[i] = nf4[ci[i]] * (static_cast<float>((a[i / 2] >> (8 * (i % 2))) & 0xffu) * s2);
      } else {
        const uint4* sz = reinterpret_cast<const uint4*>(meta + 4 * (static_cast<int64_t>(gi) * D + c0));
        const uint4 a = sz[0], b = sz[1];
        const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));  // (scale, zero)
          x[i] = code[i] * f.x + f.y;
        }
      }
    } else {
      // The value group divides head_dim (64 / 128 / 256 on the fast paths): a power of two.
      const int gs = __ffs(L.group) - 1;
      if constexpr (F == Format::kNF4) {
        const float s2 = h2f(*reinterpret_cast<const uint16_t*>(meta + 2 * o));
        const uint8_t ac = meta[2 * L.block_size + ((o * D + c0) >> gs)];
        const float us = static_cast<float>(ac) * s2;
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = nf4[ci[i]] * us;
      } else {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(meta + 4 * ((o * D + c0) >> gs));
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = code[i] * f.x + f.y;
      }
    }
  }
}

// Runtime-format form of load8f (layout's format and role).
__device__ __forceinline__ void load8(const PageLayout& L, const uint8_t* head, int o, int c0, const float* nf4,
                                      float* x) {
#define PKV_LOAD8(F)                                                                 \
  case F:                                                                            \
    if (L.role == Role::kKey) load8f<F, Role::kKey>(L, head, o, c0, nf4, x);         \
    else load8f<F, Role::kValue>(L, head, o, c0, nf4, x);                            \
    return;
  switch (L.format) {
    PKV_LOAD8(Format::kFP32)
    PKV_LOAD8(Format::kBF16)
    PKV_LOAD8(Format::kFP16)
    PKV_LOAD8(Format::kInt8)
    PKV_LOAD8(Format::kFP8E4M3)
    PKV_LOAD8(Format::kInt4)
    PKV_LOAD8(Format::kNF4)
    PKV_LOAD8(Format::kInt2)
  }
#undef PKV_LOAD8
}

// The head regions of block-table columns [col0, col0 + ncols) of sequence s, head h (null: block id
// outside the pages), written by the block's threads into shared arrays of kMaxSplitBlocks entries.
__device__ __forceinline__ void split_heads(const KParams& p, int s, int h, int col0, int ncols,
                                            const uint8_t** k_heads, const uint8_t** v_heads, int tid,
                                            int nthreads) {
  for (int j = tid; j < ncols && j < kMaxSplitBlocks; j += nthreads) {
    const int64_t col = col0 + j;
    const int64_t blk = col < p.max_blocks ? p.table[static_cast<int64_t>(s) * p.max_blocks + col] : -1;
    const bool ok = blk >= 0 && blk < p.k.id_space && blk < p.v.id_space;
    k_heads[j] = ok ? p.k.chunk[blk / p.k.bpc] + (blk % p.k.bpc) * p.k.L.block_bytes + h * p.k.L.head_bytes : nullptr;
    v_heads[j] = ok ? p.v.chunk[blk / p.v.bpc] + (blk % p.v.bpc) * p.v.L.block_bytes + h * p.v.L.head_bytes : nullptr;
  }
}

inline DevView make_dev_view(const PagedView& v) {
  DevView d;
  for (int64_t i = 0; i < v.num_chunks; ++i) d.chunk[i] = v.chunks[i];
  d.L = v.layout;
  d.bpc = v.blocks_per_chunk;
  d.id_space = v.id_space();
  return d;
}

}  // namespace attn

// The tensor-core kernel (attention_mma.cu): bf16 / fp16 models, head_dim 64 / 128 / 256, keys and
// values in one format (not fp32 pages), block sizes a power of two; launch writes the split partials
// for a grid of (num_splits, H x row_tiles of 16 rows, B).
constexpr int kMmaRows = 16;
bool attention_mma_supported(const AttentionParams& p);
// Blocks per SM the tensor-core kernel is compiled for (its launch bound), for the split planner.
int attention_mma_blocks_per_sm(const AttentionParams& p);
cudaError_t attention_mma_launch(const attn::KParams& k, cudaStream_t stream);
// The swapped-operand decode kernel (attention_decode.cu): the tensor-core kernel's cases with at most
// 8 query rows per KV head and a fast feed (16-bit pages up to head_dim 128, int8, fp8, int4 / int2 with
// key groups >= 16 and value groups >= 8), block sizes >= 16; grid (num_splits, H, B).
bool attention_decode_supported(const AttentionParams& p);
int attention_decode_blocks_per_sm(const AttentionParams& p);
cudaError_t attention_decode_launch(const attn::KParams& k, cudaStream_t stream);

}  // namespace pagedkv
