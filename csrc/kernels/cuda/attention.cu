// CUDA fused paged attention (split-context / flash decoding).
//
// Grid: (split, kv head x row tile, sequence); 128 threads. A thread owns 8 channels of one token
// at a time (D / 8 threads per token), so each warp load instruction reads consecutive bytes of
// consecutive tokens; codes are dequantized in registers. Keys: every thread forms partial dot
// products for the block's R query rows (a KV head is read once for its whole query group), the
// lanes of a token reduce them with a butterfly reduce-scatter, and scores go to shared memory.
// Softmax over the split, then values: each thread accumulates R x 8 outputs over its tokens, and
// the token slots are summed through shared memory. A merge kernel combines the splits with the
// stable (max, sum) rescaling and writes the output dtype.
#include <algorithm>
#include <cfloat>

#include "cuda/attention_common.cuh"

namespace pagedkv {
namespace {

using namespace attn;

constexpr int kThreads = 128;
constexpr int kC = 8;  // channels per thread

// Copies the head regions of split columns [c, c + tb) (those that exist) into buf, 16 bytes per
// thread per step, consecutive threads on consecutive bytes.
__device__ __forceinline__ void stage_tile(const uint8_t* const* heads, int c, int ncols, int tb, int head_bytes,
                                           uint8_t* buf, int tid) {
  const int chunks = head_bytes >> 4;
  for (int w = tid; w < tb * chunks; w += kThreads) {
    const int b = w / chunks, k = w - b * chunks;
    const uint8_t* src = c + b < ncols ? heads[c + b] : nullptr;
    if (src != nullptr) cp_async<16>(buf + b * head_bytes + 16 * k, src + 16 * k);
  }
}

// Streams the split's paged entries [ie0, min(ie1, iplen)) through shared memory: the head regions
// of TB blocks (a tile) are copied by all threads with 16-byte cp.async, double-buffered, while the
// previous tile is used. f(x, in, valid, e) runs for every token slot of every tile, uniformly across
// the block: `in` says whether entry e belongs to the range, `valid` whether its block exists (x holds
// the thread's 8 dequantized channels, rounded to the model dtype; zero when !valid). `heads` holds,
// per block-table column from col0, this head's region (null: block id outside the pages). Block
// sizes are powers of two (log2 in bs_shift), so no integer division runs per token.
template <int TOK, typename F>
__device__ __forceinline__ void for_each_paged(const KParams& p, const PageLayout& L, const uint8_t* const* heads,
                                               uint8_t* const* bufs, int col0, int ncols, int tb, int bs_shift,
                                               int ie0, int ie1, int iplen, int iskip, int slot, int c0, int tid,
                                               const float* nf4, F&& f) {
  const int hb = static_cast<int>(L.head_bytes);
  const int ntiles = (ncols + tb - 1) / tb;
  const int tile_tok = tb << bs_shift, bmask = (1 << bs_shift) - 1;
  const bool round = p.dtype != DType::kF32 && !is_passthrough(L.format);
  if (ntiles > 0) {
    stage_tile(heads, 0, ncols, tb, hb, bufs[0], tid);
    cp_async_commit();
  }
  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) {
      stage_tile(heads, (t + 1) * tb, ncols, tb, hb, bufs[(t + 1) & 1], tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint8_t* buf = bufs[t & 1];
    const int pos0 = (col0 + t * tb) << bs_shift;
    for (int k0 = 0; k0 < tile_tok; k0 += TOK) {
      const int k = k0 + slot;
      const int e = pos0 + k - iskip;
      const int bi = k >> bs_shift;
      const bool in = e >= ie0 && e < ie1 && e < iplen;
      const bool valid = in && heads[t * tb + bi] != nullptr;
      float x[kC];
      if (valid) {
        load8(L, buf + bi * hb, k & bmask, c0, nf4, x);
        if (round) {
#pragma unroll
          for (int c = 0; c < kC; ++c) x[c] = round_to(x[c], p.dtype);
        }
      } else {
#pragma unroll
        for (int c = 0; c < kC; ++c) x[c] = 0.0f;
      }
      f(x, in, valid, e);
    }
    __syncthreads();  // the buffer is refilled two tiles later
  }
}

// Butterfly reduce-scatter of R partial sums over the TPT lanes of a token: afterwards lane l holds
// the full sum of row row_of(l) in v[0].
template <int R, int TPT>
__device__ __forceinline__ float reduce_rows(float (&v)[R], int lane_c, int& row) {
  row = 0;
  int count = R;
#pragma unroll
  for (int mask = TPT / 2; mask >= 1; mask >>= 1) {
    if (count > 1) {
      const int half = count / 2;
      const bool upper = (lane_c & mask) != 0;
#pragma unroll
      for (int i = 0; i < R / 2; ++i) {
        if (i < half) {
          const float send = upper ? v[i] : v[i + half];
          const float keep = upper ? v[i + half] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
        }
      }
      if (upper) row += half;
      count = half;
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], mask);
    }
  }
  // count > 1 only if R > TPT: reduce the rest locally is impossible; R <= TPT is required.
  return v[0];
}

template <int D, int R>
__global__ void __launch_bounds__(kThreads, 4) attention_kernel(const __grid_constant__ KParams p) {
  constexpr int TPT = D / kC;
  constexpr int TOK = kThreads / TPT;
  static_assert(R <= TPT, "rows per block must not exceed lanes per token");
  extern __shared__ float smem[];
  __shared__ float nf4[16];
  __shared__ float sm_m[R], sm_l[R];
  const int split = blockIdx.x;
  const int h = blockIdx.y / p.row_tiles, rt = blockIdx.y % p.row_tiles;
  const int s = blockIdx.z;
  const int tid = threadIdx.x, slot = tid / TPT, lane_c = tid % TPT, c0 = lane_c * kC;
  if (tid < 16) nf4[tid] = kNF4[tid];
  const int64_t plen = p.lens[s];
  const int64_t skip = p.skip ? p.skip[s] : 0;
  const int64_t n = plen + p.tail_len;
  const int64_t S = p.split_tokens;

  float q[R][kC];
  int64_t lo[R], hi[R];
  int64_t row_lo = INT64_MAX, row_hi = -1;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int gr = rt * R + r;
    if (gr < p.rows) {
      row_window(p, n, gr, lo[r], hi[r]);
#pragma unroll
      for (int c = 0; c < kC; ++c) q[r][c] = query_at(p, s, h, gr, D, c0 + c) * p.scale;
      row_lo = min(row_lo, lo[r]);
      row_hi = max(row_hi, hi[r]);
    } else {
      hi[r] = -1;
      lo[r] = 0;
#pragma unroll
      for (int c = 0; c < kC; ++c) q[r][c] = 0.0f;
    }
  }
  int64_t e0, e1;
  split_range(p, split, n, row_lo, row_hi, e0, e1);
  const int64_t len = max(e1 - e0, static_cast<int64_t>(0));
  const uint8_t* mask = p.mask ? p.mask + s * p.mask_stride + p.mask_offset : nullptr;
  const int mask_n = static_cast<int>(min(p.mask_len - p.mask_offset, static_cast<int64_t>(1) << 30));  // entries past the mask are not masked
  __syncthreads();

  // The split's head-region addresses, once, in shared memory (no table lookup or division per token).
  __shared__ const uint8_t* k_heads[kMaxSplitBlocks];
  __shared__ const uint8_t* v_heads[kMaxSplitBlocks];
  const int bs_shift = __ffs(p.k.L.block_size) - 1;
  const int col0 = static_cast<int>((skip + e0) >> bs_shift);
  const int ncols = len > 0 ? static_cast<int>((skip + e1 - 1) >> bs_shift) - col0 + 1 : 0;
  split_heads(p, s, h, col0, ncols, k_heads, v_heads, tid, kThreads);
  __syncthreads();
  const int ie0 = static_cast<int>(e0), iplen = static_cast<int>(plen), iskip = static_cast<int>(skip);
  const int ilen = static_cast<int>(len);

  // Keys: scores[r][i] for entries e0 + i. Paged entries come through shared memory: the head
  // regions of TB blocks (a tile of >= 64 tokens) are copied with 16-byte cp.async by all threads,
  // double-buffered, while the previous tile is scored; tail entries are read directly.
  float* sc = smem;
  const int ie1 = ie0 + ilen;
  const int TB = max(1, 64 >> bs_shift);
  const int kv_bytes = max(static_cast<int>(p.k.L.head_bytes), static_cast<int>(p.v.L.head_bytes));
  uint8_t* bufs[2] = {reinterpret_cast<uint8_t*>(smem + R * max(S, static_cast<int64_t>(kThreads * kC))),
                      nullptr};
  bufs[1] = bufs[0] + TB * kv_bytes;
  const auto score = [&](const float (&x)[kC], bool in, bool valid, int e, int i) {
    float part[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float a = 0.0f;
#pragma unroll
      for (int c = 0; c < kC; ++c) a = fmaf(q[r][c], x[c], a);
      part[r] = a;
    }
    int row;
    float dot = reduce_rows<R, TPT>(part, lane_c, row);
    constexpr int share = TPT / R;  // lanes holding the same row sum; the lowest one writes
    if (in && (lane_c % share) == 0) {
      bool allowed = valid && (mask == nullptr || e >= mask_n || mask[e] != 0);
      int lor = 0, hir = -1;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r == row) {
          lor = static_cast<int>(lo[r]);
          hir = static_cast<int>(hi[r]);
        }
      }
      allowed = allowed && e >= lor && e <= hir;
      if (p.softcap > 0.0f) dot = p.softcap * tanhf(dot / p.softcap);
      sc[row * S + i] = allowed ? dot : -INFINITY;
    }
  };
  for_each_paged<TOK>(p, p.k.L, k_heads, bufs, col0, ncols, TB, bs_shift, ie0, ie1, iplen, iskip, slot, c0, tid,
                      nf4, [&](const float (&x)[kC], bool in, bool valid, int e) { score(x, in, valid, e, e - ie0); });
  for (int e00 = max(ie0, iplen); e00 < ie1; e00 += TOK) {  // tail entries
    const int e = e00 + slot;
    const bool in = e < ie1;
    float x[kC];
    if (in) {
      load_tail(p, p.kt, p.kts, s, h, e - iplen, c0, x);
    } else {
#pragma unroll
      for (int c = 0; c < kC; ++c) x[c] = 0.0f;
    }
    score(x, in, in, e, e - ie0);
  }
  __syncthreads();

  // Softmax over the split, one warp per row.
  const int warp = tid / 32, lane = tid % 32;
  for (int r = warp; r < R; r += kThreads / 32) {
    float mx = -INFINITY;
    for (int64_t i = lane; i < len; i += 32) mx = fmaxf(mx, sc[r * S + i]);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
    for (int64_t i = lane; i < len; i += 32) {
      const float v = sc[r * S + i];
      const float e = mx == -INFINITY ? 0.0f : __expf(v - mx);
      sum += e;
      sc[r * S + i] = round_to(e, p.dtype);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      sm_m[r] = mx;
      sm_l[r] = sum;
    }
  }
  __syncthreads();

  // Values.
  float acc[R][kC];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[r][c] = 0.0f;
  const auto accumulate = [&](const float (&x)[kC], int i) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float pr = sc[r * S + i];
#pragma unroll
      for (int c = 0; c < kC; ++c) acc[r][c] = fmaf(pr, x[c], acc[r][c]);
    }
  };
  for_each_paged<TOK>(p, p.v.L, v_heads, bufs, col0, ncols, TB, bs_shift, ie0, ie1, iplen, iskip, slot, c0, tid,
                      nf4, [&](const float (&x)[kC], bool, bool valid, int e) {
                        if (valid) accumulate(x, e - ie0);
                      });
  for (int e = max(ie0, iplen) + slot; e < ie1; e += TOK) {  // tail entries
    float x[kC];
    load_tail(p, p.vt, p.vts, s, h, e - iplen, c0, x);
    accumulate(x, e - ie0);
  }
  __syncthreads();
  float* red = smem;  // [TOK][R][D]
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < kC; ++c) red[(slot * R + r) * D + c0 + c] = acc[r][c];
  __syncthreads();
  const int64_t base = (static_cast<int64_t>(s) * p.H + h) * p.num_splits + split;
  for (int w = tid; w < R * D; w += kThreads) {
    const int r = w / D, d = w % D;
    const int gr = rt * R + r;
    if (gr >= p.rows) continue;
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < TOK; ++k) a += red[(k * R + r) * D + d];
    p.pacc[(base * p.rows + gr) * D + d] = a;
    if (d == 0) {
      p.pml[(base * p.rows + gr) * 2] = sm_m[r];
      p.pml[(base * p.rows + gr) * 2 + 1] = sm_l[r];
    }
  }
}

// Generic head_dim: one thread per (sequence, kv head, row, split), scalar decode. Correct, slow.
__global__ void attention_generic_kernel(const __grid_constant__ KParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.B) * p.H * p.rows * p.num_splits;
  if (w >= total) return;
  const int split = static_cast<int>(w % p.num_splits);
  const int gr = static_cast<int>((w / p.num_splits) % p.rows);
  const int h = static_cast<int>((w / (p.num_splits * p.rows)) % p.H);
  const int s = static_cast<int>(w / (static_cast<int64_t>(p.num_splits) * p.rows * p.H));
  const int D = p.k.L.head_dim;
  const int64_t plen = p.lens[s], skip = p.skip ? p.skip[s] : 0, n = plen + p.tail_len;
  int64_t lo, hi, e0, e1;
  row_window(p, n, gr, lo, hi);
  split_range(p, split, n, lo, hi, e0, e1);
  float acc[256], kx[256];
  for (int d = 0; d < D; ++d) acc[d] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t e = e0; e < e1; ++e) {
    if (p.mask && p.mask_offset + e < p.mask_len && p.mask[s * p.mask_stride + p.mask_offset + e] == 0) continue;
    const DevView* views[2] = {&p.k, &p.v};
    bool ok = true;
    float score = 0.0f;
    for (int kv = 0; kv < 2 && ok; ++kv) {
      const DevView& v = *views[kv];
      if (e < plen) {
        const int64_t pos = skip + e, col = pos / v.L.block_size;
        const int64_t blk = col < p.max_blocks ? p.table[static_cast<int64_t>(s) * p.max_blocks + col] : -1;
        if (blk < 0 || blk >= v.id_space) { ok = false; break; }
        decode_token(v.L, v.chunk[blk / v.bpc] + (blk % v.bpc) * v.L.block_bytes + h * v.L.head_bytes,
                     pos % v.L.block_size, kx);
        if (p.dtype != DType::kF32 && !is_passthrough(v.L.format))
          for (int d = 0; d < D; ++d) kx[d] = round_to(kx[d], p.dtype);
      } else {
        const void* tail = kv == 0 ? p.kt : p.vt;
        const int64_t* ts = kv == 0 ? p.kts : p.vts;
        for (int d = 0; d < D; ++d) kx[d] = load_scalar(tail, p.dtype, s * ts[0] + h * ts[1] + (e - plen) * ts[2] + d);
      }
      if (kv == 0) {
        for (int d = 0; d < D; ++d) score = fmaf(query_at(p, s, h, gr, D, d) * p.scale, kx[d], score);
        if (p.softcap > 0.0f) score = p.softcap * tanhf(score / p.softcap);
        const float m_new = fmaxf(m, score);
        const float c = m == -INFINITY ? 0.0f : __expf(m - m_new);
        l *= c;
        for (int d = 0; d < D; ++d) acc[d] *= c;
        m = m_new;
      } else {
        const float pe = __expf(score - m);
        l += pe;
        const float pr = round_to(pe, p.dtype);
        for (int d = 0; d < D; ++d) acc[d] = fmaf(pr, kx[d], acc[d]);
      }
    }
  }
  const int64_t base = ((static_cast<int64_t>(s) * p.H + h) * p.num_splits + split) * p.rows + gr;
  for (int d = 0; d < D; ++d) p.pacc[base * D + d] = acc[d];
  p.pml[base * 2] = m;
  p.pml[base * 2 + 1] = l;
}

// One thread block per (sequence, kv head, row): combine the splits, write [B, Lq, Hq, D]. The
// splits' (max, sum) are read once, in parallel, into shared weights exp(m_k - max); each
// thread then sums its channels over the splits with independent loads in flight.
constexpr int kMergeThreads = 128;
constexpr int kMaxSplits = 8192;

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, d);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kMergeThreads / 32; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();
  return r;
}

// The merge kernel's parameters: a few dozen bytes, where KParams carries the pages' chunk pointers
// (16 KB), which made each launch copy them.
struct MergeParams {
  const float* pacc;
  const float* pml;
  void* out;
  DType dtype;
  int32_t Hq, Lq, H, gqa, rows, D;
  int64_t num_splits;
};

__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const __grid_constant__ MergeParams p) {
  extern __shared__ float wk[];  // [min(num_splits, kMaxSplits)]
  __shared__ float red[kMergeThreads / 32];
  const int gr = blockIdx.x, h = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
  const int D = p.D, ns = static_cast<int>(p.num_splits);
  grid_dependency_wait();  // launched programmatically: the partials are complete and visible after this
  const int64_t base0 = (static_cast<int64_t>(s) * p.H + h) * p.num_splits;
  const float* ml = p.pml + (base0 * p.rows + gr) * 2;  // split k at ml[2 k rows]
  const int64_t mstride = 2 * static_cast<int64_t>(p.rows);
  float mx = -INFINITY;
  for (int k = tid; k < ns; k += kMergeThreads) mx = fmaxf(mx, ml[k * mstride]);
  mx = block_reduce(mx, true, red);
  float sum = 0.0f;
  for (int k = tid; k < ns; k += kMergeThreads) {
    const float mk = ml[k * mstride];
    const float f = mk == -INFINITY ? 0.0f : __expf(mk - mx);
    if (k < kMaxSplits) wk[k] = f;
    sum += f * ml[k * mstride + 1];
  }
  sum = block_reduce(sum, false, red);  // its barrier also publishes wk
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const int t = gr / p.gqa, j = gr % p.gqa;
  const int64_t o = ((static_cast<int64_t>(s) * p.Lq + t) * p.Hq + h * p.gqa + j) * D;
  const float* acc = p.pacc + (base0 * p.rows + gr) * D;
  const int64_t astride = static_cast<int64_t>(p.rows) * D;
  for (int d = tid; d < D; d += kMergeThreads) {
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int nw = ns < kMaxSplits ? ns : kMaxSplits;
    int k = 0;
    for (; k + 4 <= nw; k += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] += wk[k + u] * acc[(k + u) * astride + d];
    }
    for (; k < nw; ++k) a[0] += wk[k] * acc[k * astride + d];
    for (; k < ns; ++k) {  // beyond the shared weights (forced split counts only)
      const float mk = ml[k * mstride];
      if (mk != -INFINITY) a[0] += __expf(mk - mx) * acc[k * astride + d];
    }
    const float r = ((a[0] + a[1]) + (a[2] + a[3])) * inv;
    switch (p.dtype) {
      case DType::kF32: static_cast<float*>(p.out)[o + d] = r; break;
      case DType::kBF16: static_cast<__nv_bfloat16*>(p.out)[o + d] = __float2bfloat16_rn(r); break;
      default: static_cast<__half*>(p.out)[o + d] = __float2half_rn(r); break;
    }
  }
}

bool fast_head_dim(int D) { return D == 64 || D == 128 || D == 256; }
bool pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }
bool fast_path(const AttentionParams& p) {
  return fast_head_dim(static_cast<int>(p.head_dim())) && pow2(p.k.layout.block_size) &&
         p.seq_lens != nullptr && p.max_blocks_per_seq * p.k.layout.block_size + p.tail_len < (int64_t{1} << 30);
}
int rows_per_block(const AttentionParams& p) { return p.rows() >= 8 ? 8 : 4; }
int64_t max_split(int R) { return R == 8 ? 1024 : 2048; }


template <int D, int R>
cudaError_t launch(const KParams& k, dim3 grid, cudaStream_t stream) {
  const int64_t bs = k.k.L.block_size;
  const int64_t tb = std::max<int64_t>(1, 64 / bs);
  const int64_t kv_bytes = std::max(k.k.L.head_bytes, k.v.L.head_bytes);
  const size_t smem = sizeof(float) * R * std::max<int64_t>(k.split_tokens, kThreads * kC) + 2 * tb * kv_bytes;
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  PKV_CUDA_TRY((allow_smem<attention_kernel<D, R>>(smem)));
  attention_kernel<D, R><<<grid, kThreads, smem, stream>>>(k);
  return cudaGetLastError();
}

}  // namespace

bool use_mma(const AttentionParams& p) { return fast_path(p) && attention_mma_supported(p); }
// The swapped-operand decode kernel's cases of the tensor-core path: the planner sizes splits for it
// and the launcher takes it, by this one rule.
static bool use_decode(const AttentionParams& p) { return use_mma(p) && attention_decode_supported(p); }

void attention_cuda_plan(AttentionParams& p, int64_t max_entries, int num_sms, int64_t forced_splits) {
  const bool mma = use_mma(p);
  const bool decode = use_decode(p);
  const int R = mma ? kMmaRows : rows_per_block(p);
  const int64_t row_tiles = (p.rows() + R - 1) / R;
  const int64_t base = std::max<int64_t>(1, p.num_seqs * p.num_kv_heads() * row_tiles);
  const int64_t n = std::max<int64_t>(max_entries, 1);
  int64_t splits = forced_splits;
  if (splits <= 0) {
    // Several waves, so the last one is short; the tensor-core kernel aims at whole waves of its
    // resident blocks (2 or 3 per SM) and rounds the splits down, so the grid never spills a few
    // blocks into an extra wave (b8 x 8 heads at 2 per SM: 1024 blocks in 4 waves, not 1088 in 5).
    int64_t target = (mma ? 8 : 4) * static_cast<int64_t>(num_sms);
    const int64_t max_splits = std::max<int64_t>(1, n / 256);
    if (decode) {
      // The decode kernel: the split count whose grid fills its waves best, one wave preferred (each
      // further wave must fill 5% more): one wave measured faster than two at batch 1 and 8 (H100,
      // int4 at 32k: batch 1 64 splits 73 us against 128 splits 88; batch 8 8 splits 236 against 16
      // 243; scripts/split_sweep.py), but batch 32 x 8 heads in one split fills 65% of a wave and
      // int4 / int2, latency-bound, lost 11-21% there (benchmarks/RESULTS.md, session 15).
      const int64_t wave = static_cast<int64_t>(attention_decode_blocks_per_sm(p)) * num_sms;
      double best = -1.0;
      splits = 1;
      for (int64_t s = 1; s <= std::min(max_splits, 4 * wave / base + 1); ++s) {
        const int64_t waves = (base * s + wave - 1) / wave;
        const double score = static_cast<double>(base * s) / static_cast<double>(waves * wave) - 0.05 * (waves - 1);
        if (score > best + 1e-9) {
          best = score;
          splits = s;
        }
      }
    } else if (mma) {
      const int64_t wave = static_cast<int64_t>(attention_mma_blocks_per_sm(p)) * num_sms;
      target = (target + wave - 1) / wave * wave;
      splits = std::max<int64_t>(1, target / base);
    } else {
      splits = std::max<int64_t>(1, (target + base - 1) / base);
    }
    splits = std::min(splits, max_splits);
  }
  int64_t split = (n + splits - 1) / splits;
  split = (split + 15) / 16 * 16;
  if (fast_path(p)) {
    // The split's block addresses live in shared memory (kMaxSplitBlocks columns, kDecodeSplitCols for
    // the decode kernel; a split may start mid-block); the CUDA-core kernel also keeps the split's
    // scores there.
    const int cols = decode ? kDecodeSplitCols : kMaxSplitBlocks;
    split = std::min<int64_t>(split, (cols - 2) * p.k.layout.block_size);
    if (!mma) split = std::min<int64_t>(split, max_split(R));
  }
  p.split_tokens = split;
  p.num_splits = (n + split - 1) / split;
}

cudaError_t paged_attention_cuda(const AttentionParams& p, const void* query, cudaStream_t stream) {
  if (p.k.num_chunks > kMaxAttentionChunks || p.v.num_chunks > kMaxAttentionChunks) return cudaErrorInvalidValue;
  if (p.head_dim() > 256) return cudaErrorInvalidValue;
  if (p.num_seqs == 0) return cudaSuccess;
  KParams k;
  k.k = make_dev_view(p.k);
  k.v = make_dev_view(p.v);
  k.table = p.block_table;
  k.max_blocks = p.max_blocks_per_seq;
  k.lens = p.seq_lens;
  k.skip = p.skip;
  k.q = query;
  k.kt = p.k_tail;
  k.vt = p.v_tail;
  for (int i = 0; i < 3; ++i) {
    k.kts[i] = p.kt_stride[i];
    k.vts[i] = p.vt_stride[i];
  }
  k.tail_len = p.tail_len;
  k.dtype = p.dtype;
  k.mask = p.kv_mask;
  k.mask_stride = p.mask_stride;
  k.mask_offset = p.mask_offset;
  k.mask_len = p.mask_len;
  k.B = static_cast<int32_t>(p.num_seqs);
  k.Hq = static_cast<int32_t>(p.num_q_heads);
  k.Lq = static_cast<int32_t>(p.q_len);
  k.H = static_cast<int32_t>(p.num_kv_heads());
  k.gqa = static_cast<int32_t>(p.group_size());
  k.rows = static_cast<int32_t>(p.rows());
  k.scale = p.scale;
  k.softcap = p.softcap;
  k.window = p.window;
  k.split_tokens = p.split_tokens;
  k.num_splits = p.num_splits;
  k.pacc = p.partial_acc;
  k.pml = p.partial_ml;
  k.out = p.out;
  const int D = static_cast<int>(p.head_dim());
  if (use_decode(p)) {
    k.row_tiles = 1;
    PKV_CUDA_TRY(attention_decode_launch(k, stream));
  } else if (use_mma(p)) {
    k.row_tiles = static_cast<int32_t>((k.rows + kMmaRows - 1) / kMmaRows);
    PKV_CUDA_TRY(attention_mma_launch(k, stream));
  } else if (fast_path(p)) {
    const int R = rows_per_block(p);
    k.row_tiles = (k.rows + R - 1) / R;
    const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(k.H * k.row_tiles),
                    static_cast<unsigned>(p.num_seqs));
    cudaError_t err;
    if (D == 64) err = R == 8 ? launch<64, 8>(k, grid, stream) : launch<64, 4>(k, grid, stream);
    else if (D == 128) err = R == 8 ? launch<128, 8>(k, grid, stream) : launch<128, 4>(k, grid, stream);
    else err = R == 8 ? launch<256, 8>(k, grid, stream) : launch<256, 4>(k, grid, stream);
    PKV_CUDA_TRY(err);
  } else {
    k.row_tiles = 1;
    const int64_t total = p.num_seqs * k.H * k.rows * p.num_splits;
    attention_generic_kernel<<<static_cast<unsigned>((total + 127) / 128), 128, 0, stream>>>(k);
    PKV_CUDA_TRY(cudaGetLastError());
  }
  // The merge is launched programmatically: its launch overlaps the attention kernel's last blocks.
  const size_t merge_smem = sizeof(float) * static_cast<size_t>(std::min<int64_t>(k.num_splits, kMaxSplits));
  const MergeParams m{k.pacc, k.pml, k.out, k.dtype, k.Hq, k.Lq, k.H, k.gqa, k.rows, D, k.num_splits};
  return launch_programmatic(merge_kernel, dim3(k.rows, k.H, k.B), dim3(kMergeThreads), merge_smem, stream, m);
}

}  // namespace pagedkv
