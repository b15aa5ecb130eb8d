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
// the reference rounds dequantized pages), packed in pairs and fed to the mma; int4 / int2 instead
// take the folded-scale path (Feed::kFold below), which reorders each lane's key channels to the
// order in which bit operations unpack them (pairs i, i + 4 of a word of nibbles) and fetches a
// step's key and value words at the step's start (keys a step ahead were measured slower: registers).
#include <cfloat>
#include <climits>
#include <type_traits>

#include "cuda/mma_feed.cuh"

namespace pagedkv {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// Three blocks per SM (two for head_dim 256 and for kTokenScale): the kFold kernels spill a few
// registers at that bound, and were measured slower at two blocks per SM without spills (H100, int4 /
// int2, 32k: 499 against 421 us); kTokenScale spills more at three (168 registers) and was measured
// faster at two (H100, b8 32/8 d128 32k, int8 against SDPA in the same run: 0.88x at two, 0.61x at
// four, 0.82x at three in session 6; benchmarks/RESULTS.md).
constexpr int blocks_per_sm(int D, Feed FD) { return D == 256 || FD == Feed::kTokenScale ? 2 : 3; }

template <int D, Format F, typename T, Feed FD>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(D, FD)) attention_mma_kernel(const __grid_constant__ KParams p) {
  constexpr int KS = D / 16;   // k-steps of Q K^T
  constexpr int NT = D / 8;    // n-tiles of P V
  constexpr int KCH = D / 32;  // 8-channel key chunks per lane: channels c D/4 + 8 j
  constexpr int VG = D / 64;   // 8-channel value chunks per lane and token: channels 8 (8 vg + g)
  constexpr int CBT = code_bytes_per_token<F>(D);
  constexpr bool kTS = FD == Feed::kTokenScale;
  constexpr bool kFastFeed = FD == Feed::kFold || kTS;  // feeds with a fast step
  // Fast steps: a lane's D/4 key channels arrive as NWK words of PW codes; a word feeds KPW k-steps.
  constexpr int BITS = F == Format::kInt2 ? 2 : kTS ? 8 : 4, PW = 32 / BITS, KPW = PW / 4, NWK = (D / 4) / PW;
  constexpr int QS = D + 4;    // fp32 query row stride in shared memory (kFold)
  using TK = std::conditional_t<kTS, __half, T>;                        // the Q K^T mma's type
  using TV = std::conditional_t<FD == Feed::kFold || kTS, __half, T>;  // the P V mma's type
  extern __shared__ __align__(16) uint8_t smem[];
  uint4* sq = reinterpret_cast<uint4*>(smem);                 // [KS][32] query A fragments
  float* so = reinterpret_cast<float*>(smem + KS * 32 * 16);  // [kWarps][16][D] warp accumulators
  float* sml = so + kWarps * 16 * D;                          // [kWarps][16][2] warp (max, sum)
  // kFold, during the loop only (they share the merge area): fp32 query rows and each warp's q'
  // fragments (lane-private: a lane reads back only what it wrote).
  float* sqf = so;                                                                  // [16][QS]
  uint4* wq = reinterpret_cast<uint4*>(so + 16 * QS) + (threadIdx.x >> 5) * KS * 32;  // [KS][32]
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
      int64_t lo64, hi64;
      row_window(p, n, gr, lo64, hi64);
      lo = static_cast<int>(lo64);
      hi = static_cast<int>(hi64);
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
      if (gr < p.rows)
        q = make_float4(query_at(p, s, h, gr, D, d0), query_at(p, s, h, gr, D, d0 + 1), query_at(p, s, h, gr, D, d0 + 2),
                        query_at(p, s, h, gr, D, d0 + 3));
      w[half] = pack2<TK>(q.x, q.y);
      w[2 + half] = pack2<TK>(q.z, q.w);
    }
    sq[idx] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  if constexpr (FD == Feed::kFold) {
    for (int idx = tid; idx < 16 * D; idx += kThreads) {
      const int r = idx / D, d = idx % D, gr = rt * 16 + r;
      sqf[r * QS + d] = gr < p.rows ? query_at(p, s, h, gr, D, d) : 0.0f;
    }
  }
  __syncthreads();
  // int8 fast steps: the keys arrive as 1152 + code, so rows g and g + 8 lose 1152 sum(q) per score.
  float kq0 = 0.0f, kq1 = 0.0f;
  if constexpr (kTS && F == Format::kInt8) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const uint4 a = sq[kk * 32 + lane];
      const float2 x = __half22float2(as_h2(a.x)), y = __half22float2(as_h2(a.y));
      const float2 z = __half22float2(as_h2(a.z)), w = __half22float2(as_h2(a.w));
      kq0 += (x.x + x.y) + (z.x + z.y);
      kq1 += (y.x + y.y) + (w.x + w.y);
    }
#pragma unroll
    for (int d = 1; d <= 2; d <<= 1) {
      kq0 += __shfl_xor_sync(0xffffffffu, kq0, d);
      kq1 += __shfl_xor_sync(0xffffffffu, kq1, d);
    }
    kq0 *= -1152.0f;
    kq1 *= -1152.0f;
  }
  int lo_all = INT_MAX, hi_all = -1;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    lo_all = min(lo_all, row_lo[r]);
    hi_all = max(hi_all, row_hi[r]);
  }
  int64_t e0, e1;
  split_range(p, split, n, lo_all, hi_all, e0, e1);
  const int64_t len = max(e1 - e0, static_cast<int64_t>(0));
  const uint8_t* mask = p.mask ? p.mask + s * p.mask_stride + p.mask_offset : nullptr;
  const int mask_n = static_cast<int>(min(p.mask_len - p.mask_offset, static_cast<int64_t>(1) << 30));

  const int bs_shift = __ffs(p.k.L.block_size) - 1;
  const int col0 = static_cast<int>((skip + e0) >> bs_shift);
  const int ncols = len > 0 ? static_cast<int>((skip + e1 - 1) >> bs_shift) - col0 + 1 : 0;
  split_heads(p, s, h, col0, ncols, k_heads, v_heads, tid, kThreads);
  __syncthreads();
  const Split<HeadPtrs> sp{{k_heads, v_heads}, col0, bs_shift, (1 << bs_shift) - 1, static_cast<int>(plen),
                 static_cast<int>(skip)};
  const int lo0 = row_lo[g], hi0 = row_hi[g], lo1 = row_lo[g + 8], hi1 = row_hi[g + 8];
  // Each warp takes a contiguous run of 16-token steps. Fast feeds align the steps to positions that
  // are multiples of 16, so a whole step lies in one block (and one key group).
  const int ie0 = static_cast<int>(e0), ie1 = ie0 + static_cast<int>(len), isk = static_cast<int>(skip);
  const int a0 = kFastFeed && len > 0 ? ie0 - ((isk + ie0) & 15) : ie0;
  const int per_warp = (ie1 - a0 + 16 * kWarps - 1) / (16 * kWarps) * 16;
  const int w0 = a0 + warp * per_warp, lim = min(w0 + per_warp, ie1), wlo = max(w0, ie0);
  const int kg_shift = __ffs(p.k.L.group) - 1, vg_shift = __ffs(p.v.L.group) - 1;

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
  int cur_col = -1, cur_grp = -1;  // kFold: the (column, key group) whose q' the warp holds
  float kb0 = 0.0f, kb1 = 0.0f;    // and its score bias for rows g and g + 8

  // Fast step: all 16 entries in the warp's range and in one existing page block (warp-uniform).
  auto fast_step = [&](int st) -> bool {
    if (!kFastFeed || st < wlo || st + kStep > lim || st + kStep > plen) return false;
    const int col = ((isk + st) >> bs_shift) - col0;
    return k_heads[col] != nullptr && v_heads[col] != nullptr;
  };
  // Its key words (the lane's D / 4 channels of tokens st + g and st + 8 + g).
  auto load_keys = [&](int st, uint32_t (&kw)[2][NWK]) {
    const int pos = isk + st;
    const uint8_t* kh = k_heads[(pos >> bs_shift) - col0] + (pos & ((1 << bs_shift) - 1)) * CBT;
#pragma unroll
    for (int t = 0; t < 2; ++t) load_words<NWK>(kh + (8 * t + g) * CBT + c * (D / 4) * BITS / 8, kw[t]);
  };
  bool fast_next = fast_step(w0);

  for (int st = w0; st < lim; st += kStep) {
    const bool fast = fast_next;
    uint32_t kw[2][NWK];
    const int pos0 = isk + st, scol = (pos0 >> bs_shift) - col0, off0 = pos0 & ((1 << bs_shift) - 1);
    const uint8_t* kh = fast ? k_heads[scol] : nullptr;
    const uint8_t* vh = fast ? v_heads[scol] : nullptr;
    // This step's value codes and (scale, zero) words, issued before the scores are computed: tokens
    // 2c, 2c + 1 (+ 8 t), channels 8 (8 q + g) .. + 7.
    uint32_t vw[2][VG][2], vm[2][VG][2];
    uint2 vw8[2][VG][2];  // kTokenScale: 8 codes per token and chunk
    float2 ks2[2], vs2[2];  // kTokenScale: key and value scales of tokens 2c, 2c + 1 (+ 8 t)
    if constexpr (kTS) {
      // All of the step's loads at once.
      if (fast) {
        load_keys(st, kw);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int oa = off0 + 8 * t + 2 * c;
#pragma unroll
          for (int q = 0; q < VG; ++q)
#pragma unroll
            for (int i = 0; i < 2; ++i) vw8[t][q][i] = *reinterpret_cast<const uint2*>(vh + (oa + i) * CBT + 8 * (8 * q + g));
          ks2[t] = *reinterpret_cast<const float2*>(kh + p.k.L.code_bytes + 4 * oa);
          vs2[t] = *reinterpret_cast<const float2*>(vh + p.v.L.code_bytes + 4 * oa);
        }
      }
      fast_next = fast_step(st + kStep);
    }
    if constexpr (FD == Feed::kFold) {
      if (fast) {
        load_keys(st, kw);
        const uint32_t* mz = reinterpret_cast<const uint32_t*>(vh + p.v.L.code_bytes);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int oa = off0 + 8 * t + 2 * c;
#pragma unroll
          for (int q = 0; q < VG; ++q) {
            const int c0 = 8 * (8 * q + g);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint8_t* row = vh + (oa + i) * CBT;
              vw[t][q][i] = BITS == 4 ? *reinterpret_cast<const uint32_t*>(row + c0 / 2)
                                      : static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(row + c0 / 4));
              vm[t][q][i] = mz[((oa + i) * D + c0) >> vg_shift];
            }
          }
        }
      }
      fast_next = fast_step(st + kStep);
    }
    // Scores of tokens st .. st + 15 (two n-tiles of 8); this lane reads the keys of token st + 8 t + g.
    float sc[2][4];
    Tok kc[2][2], vc[2][2];  // generic steps: the lane's score-column tokens (also its value tokens)
    if (fast) {
      if constexpr (FD == Feed::kFold) {
        const int grp = off0 >> kg_shift;
        if (scol != cur_col || grp != cur_grp) {
          // q' = q * scale for the lane's channels, in the unpacked order: k-step kk = KPW jw + u
          // takes channel pairs (x, x + PW / 2) and (x + 1, x + 1 + PW / 2), x = PW jw + 2 u. The bias
          // is q . zero minus the magic offset's share, magic * sum(q'). (fp16 models: q' overflows only
          // where q times one quantization step does, i.e. where the model's own fp16 q . k would.)
          const uint32_t* sz = reinterpret_cast<const uint32_t*>(kh + p.k.L.code_bytes) + grp * D + c * (D / 4);
          const float* q0 = sqf + g * QS + c * (D / 4);
          const float* q1 = q0 + 8 * QS;
          float b0 = 0.0f, b1 = 0.0f;
#pragma unroll
          for (int kk = 0; kk < KS; ++kk) {
            const int x = PW * (kk / KPW) + 2 * (kk % KPW);
            const int ch[4] = {x, x + PW / 2, x + 1, x + 1 + PW / 2};
            float r0[4], r1[4];
#pragma unroll
            for (int sl = 0; sl < 4; ++sl) {
              const float2 f = __half22float2(as_h2(sz[ch[sl]]));  // (scale, zero)
              const float qa = q0[ch[sl]], qb = q1[ch[sl]];
              r0[sl] = round_t<T>(qa * f.x);
              r1[sl] = round_t<T>(qb * f.x);
              b0 += qa * f.y - kMagic<T> * r0[sl];
              b1 += qb * f.y - kMagic<T> * r1[sl];
            }
            wq[kk * 32 + lane] = make_uint4(pack2<T>(r0[0], r0[1]), pack2<T>(r1[0], r1[1]), pack2<T>(r0[2], r0[3]),
                                            pack2<T>(r1[2], r1[3]));
          }
#pragma unroll
          for (int d = 1; d <= 2; d <<= 1) {
            b0 += __shfl_xor_sync(0xffffffffu, b0, d);
            b1 += __shfl_xor_sync(0xffffffffu, b1, d);
          }
          kb0 = b0;
          kb1 = b1;
          cur_col = scol;
          cur_grp = grp;
        }
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
#pragma unroll
          for (int jw = 0; jw < NWK; ++jw) {
            uint32_t r[PW / 2];
            unpack_pairs<BITS, T>(kw[t][jw], r);
#pragma unroll
            for (int u = 0; u < KPW; ++u) mma<T>(sc[t], wq[(KPW * jw + u) * 32 + lane], r[2 * u], r[2 * u + 1]);
          }
          sc[t][0] += kb0;
          sc[t][1] += kb0;
          sc[t][2] += kb1;
          sc[t][3] += kb1;
        }
      } else if constexpr (kTS) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
#pragma unroll
          for (int jw = 0; jw < NWK; ++jw) {
            uint32_t b0, b1;
            key_word<F>(kw[t][jw], b0, b1);
            mma<__half>(sc[t], sq[jw * 32 + lane], b0, b1);
          }
          sc[t][0] += kq0;
          sc[t][1] += kq0;
          sc[t][2] += kq1;
          sc[t][3] += kq1;
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.0f;
        const Tok tk = sp.at(st + 8 * t + g, wlo, lim);
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
            entry8<F, Role::kKey, FD>(p, p.k.L, tk, p.kt, p.kts, s, h, c * (D / 4) + 8 * j, nf4, x);
#pragma unroll
            for (int i = 0; i < 4; ++i) b[i] = pack2<TK>(x[2 * i], x[2 * i + 1]);
          }
          mma<TK>(sc[t], sq[(2 * j) * 32 + lane], b[0], b[1]);
          mma<TK>(sc[t], sq[(2 * j + 1) * 32 + lane], b[2], b[3]);
        }
      }
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int i = 0; i < 2; ++i) kc[t][i] = sp.at(st + 8 * t + 2 * c + i, wlo, lim, &vc[t][i]);
    }
    // Scale, cap, mask; online softmax per row (rows g and g + 8; the 4 lanes of a row share it).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int e = st + 8 * t + 2 * c + i;
        const bool ok = (fast || kc[t][i].ok) && (mask == nullptr || e >= mask_n || mask[e] != 0);
        float f = p.scale;
        if constexpr (kTS) f *= fast ? (i ? ks2[t].y : ks2[t].x) : token_scale(p.k.L, kc[t][i]);
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
    const float a0s = m0 == -INFINITY ? 0.0f : __expf(m0 - n0), a1s = m1 == -INFINITY ? 0.0f : __expf(m1 - n1);
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
    l0 = l0 * a0s + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    l1 = l1 * a1s + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
    if (a0s != 1.0f || a1s != 1.0f) {  // the running maxima rarely move late in a long sequence
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        o[t][0] *= a0s;
        o[t][1] *= a0s;
        o[t][2] *= a1s;
        o[t][3] *= a1s;
      }
    }
    // Probabilities as the A fragment, rounded to the P V type (times the value scale for
    // kTokenScale: P diag(s) codes = P V).
    float pv[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float f = 1.0f;
        if constexpr (kTS) f = fast ? (i ? vs2[t].y : vs2[t].x) : token_scale(p.v.L, vc[t][i]);
        pv[t][i] = pr[t][i] * f;
        pv[t][2 + i] = pr[t][2 + i] * f;
      }
    const uint4 pa = make_uint4(pack2<TV>(pv[0][0], pv[0][1]), pack2<TV>(pv[0][2], pv[0][3]),
                                pack2<TV>(pv[1][0], pv[1][1]), pack2<TV>(pv[1][2], pv[1][3]));
    // Values of tokens 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1), output column g of every n-tile.
    uint32_t vb[2][NT];
    if (fast) {
      if constexpr (FD == Feed::kFold) {
        // Two tokens at once: byte_perm puts token a's codes in the low half and b's in the high half
        // of one word, so each unpacked pair is (a, b) of one channel, the B-fragment order.
        const __half2 magic = as_h2(0x64006400u);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
#pragma unroll
          for (int q = 0; q < VG; ++q) {
            const uint32_t ma = vm[t][q][0], mb = vm[t][q][1], wa = vw[t][q][0], wb = vw[t][q][1];
            const __half2 sc2 = as_h2(__byte_perm(ma, mb, 0x5410)), zr2 = as_h2(__byte_perm(ma, mb, 0x7632));
            uint32_t r[8];
            if constexpr (BITS == 4) {
              // unpack_pairs pairs nibbles i and i + 4 of a word: here nibble i of each half.
              unpack_pairs<4, __half>(__byte_perm(wa, wb, 0x5410), r);      // channels 0..3
              unpack_pairs<4, __half>(__byte_perm(wa, wb, 0x7632), r + 4);  // channels 4..7
            } else {
              unpack_pairs<2, __half>(wa | (wb << 16), r);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) vb[t][8 * q + i] = h2_bits(__hfma2(__hsub2(as_h2(r[i]), magic), sc2, zr2));
          }
        }
      } else if constexpr (kTS) {
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int q = 0; q < VG; ++q) {
            value_words<F>(vw8[t][q][0].x, vw8[t][q][1].x, &vb[t][8 * q]);
            value_words<F>(vw8[t][q][0].y, vw8[t][q][1].y, &vb[t][8 * q + 4]);
          }
      }
    } else {
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
            entry8<F, Role::kValue, FD>(p, p.v.L, ta, p.vt, p.vts, s, h, c0, nf4, xa);
            entry8<F, Role::kValue, FD>(p, p.v.L, tb, p.vt, p.vts, s, h, c0, nf4, xb);
#pragma unroll
            for (int i = 0; i < 8; ++i) vb[t][8 * q + i] = pack2<TV>(xa[i], xb[i]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) mma<TV>(o[t], pa, vb[0][t], vb[1][t]);
  }
  if constexpr (FD == Feed::kFold) __syncthreads();  // the merge area held the query rows and q'

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
  store_split_partial<kWarps, 16>(p, so, sml, s, h, split, rt * 16, D);
}

template <int D, Format F, typename T, Feed FD>
cudaError_t launch(const KParams& k, dim3 grid, cudaStream_t stream) {
  // kFold's query rows and q' fragments fit in the merge area they share.
  static_assert(16 * (D + 4) + kWarps * (D / 16) * 32 * 4 <= kWarps * 16 * (D + 2));
  const size_t smem = (D / 16) * 32 * 16 + sizeof(float) * kWarps * 16 * (D + 2);
  PKV_CUDA_TRY((allow_smem<attention_mma_kernel<D, F, T, FD>>(smem)));
  attention_mma_kernel<D, F, T, FD><<<grid, kThreads, smem, stream>>>(k);
  return cudaGetLastError();
}

// int4 / int2 take kFold when a 16-token step stays in one key group and an 8-channel piece in one
// value group (groups are powers of two on the fast paths).
template <int D, Format F, typename T>
cudaError_t launch_grouped(const KParams& k, dim3 grid, cudaStream_t stream) {
  if (k.k.L.group >= 16 && k.v.L.group >= 8) return launch<D, F, T, Feed::kFold>(k, grid, stream);
  return launch<D, F, T, Feed::kDequant>(k, grid, stream);
}

template <int D, typename T>
cudaError_t launch_format(const KParams& k, dim3 grid, cudaStream_t stream) {
  switch (k.k.L.format) {
    case Format::kBF16: return launch<D, Format::kBF16, T, feed_of<Format::kBF16, T>()>(k, grid, stream);
    case Format::kFP16: return launch<D, Format::kFP16, T, feed_of<Format::kFP16, T>()>(k, grid, stream);
    case Format::kFP8E4M3: return launch<D, Format::kFP8E4M3, T, Feed::kTokenScale>(k, grid, stream);
    case Format::kInt8: return launch<D, Format::kInt8, T, Feed::kTokenScale>(k, grid, stream);
    case Format::kInt4: return launch_grouped<D, Format::kInt4, T>(k, grid, stream);
    case Format::kInt2: return launch_grouped<D, Format::kInt2, T>(k, grid, stream);
    case Format::kNF4: return launch<D, Format::kNF4, T, Feed::kDequant>(k, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

struct Formats {
  template <int D, typename T>
  static cudaError_t run(const KParams& k, dim3 grid, cudaStream_t stream) { return launch_format<D, T>(k, grid, stream); }
};

}  // namespace

bool attention_mma_supported(const AttentionParams& p) {
  const int64_t D = p.head_dim();
  const Format f = p.k.layout.format;
  return (p.dtype == DType::kBF16 || p.dtype == DType::kF16) && (D == 64 || D == 128 || D == 256) &&
         f == p.v.layout.format && f != Format::kFP32;
}

int attention_mma_blocks_per_sm(const AttentionParams& p) {
  const Format f = p.k.layout.format;
  const bool token_scale = f == Format::kInt8 || f == Format::kFP8E4M3;
  return blocks_per_sm(static_cast<int>(p.head_dim()), token_scale ? Feed::kTokenScale : Feed::kPass);
}

cudaError_t attention_mma_launch(const KParams& k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(k.num_splits), static_cast<unsigned>(k.H * k.row_tiles),
                  static_cast<unsigned>(k.B));
  return launch_dim_dtype<Formats>(k, grid, stream);
}

}  // namespace pagedkv
