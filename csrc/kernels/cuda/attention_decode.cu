// Tensor-core decode attention with swapped operands: the step's 16 tokens are the M side of the
// mma.sync m16n8k16 and the query rows of one KV head (query group x query tokens, at most 8) its
// N side, so no M row is padding (attention_mma.cu puts the rows on M and pads a group of 4 to 16):
// half the mmas, half the accumulator registers and half the exponentials per token.
//
//   S^T = K Q^T: A = 16 tokens x 16 channels of keys, B = Q^T (16 channels x 8 rows), C = tokens x rows.
//   O^T = V^T P^T: A = 16 channels x 16 tokens of values, B = P^T (16 tokens x 8 rows), C = channels x rows.
//
// The score fragment (lane: tokens g, g + 8, rows 2c, 2c + 1) becomes the B fragment of P^T (lane:
// tokens 2c, 2c + 1, 2c + 8, 2c + 9, row g) by two 8 x 8 register transposes (movmatrix). Channel
// orders are free where they are summed over: a lane (g = lane / 4, c = lane % 4) reads the keys of
// tokens g and g + 8 over its quarter of the channels, [c D/4, (c + 1) D/4), in the order its feed
// unpacks them (key_channel), and the values of tokens 2c, 2c + 1, 2c + 8, 2c + 9 over its eighth,
// [g D/8, (g + 1) D/8), m-tile mt holding channels g D/8 + 2 mt (row g) and + 1 (row g + 8). Codes
// reach the mma as in attention_mma.cu (mma_feed.cuh): 16-bit pages as stored, int8 / fp8 as unscaled
// codes with the token scales on the score and the probability (int8 keys on the integer mma instead:
// the keys as stored against the query as two int8 terms, exact integer scores), int4 / int2 with the key group's
// scale folded into the query. int4 / int2 values (groups of >= 64 channels) also reach the mma as raw
// codes: each 64-channel chunk's m-tiles take P^T times the tokens' scales of that chunk, and 1 + D/64
// correction mmas per step carry the zeros and the codes' magic offset (see the P V step); codes
// unpack in one LOP3 per pair (unpack_lohi). Grid (split, KV head, sequence), 4 warps per block (Stage:
// blocks per SM), each walking a contiguous run of aligned 16-token steps of the pages with its own
// online softmax (base-2 exponentials), the dense tail's steps dealt round every warp of the
// sequence's splits afterwards, quantized pages two clean steps at a time where they can (one softmax update
// for 32 tokens, two independent score chains), its page bytes arriving through a ring of
// shared-memory stages filled with cp.async ahead of the steps; warps merge in shared memory, partial
// results go to the merge kernel (attention.cu).
#include <algorithm>
#include <cfloat>
#include <climits>
#include <type_traits>

#include "cuda/mma_feed.cuh"

namespace pagedkv {
namespace {

using namespace attn;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 8;  // the mma's N: query rows of one KV head
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t lds_u32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}

// The split's block-table columns, 4 bytes each in shared memory: (chunk << kColShift) | block in
// chunk, kNoCol where the block is outside the pages. Page-head pointers for keys and values would
// take 16 bytes a column; at 4 a split spans kDecodeSplitCols columns, so 16-token blocks get the
// same one-wave split plans as 64-token ones (up to 8288 tokens a split at 16-token blocks, 2048 with
// pointers).
constexpr uint32_t kNoCol = 0xffffffffu;
constexpr int kColShift = 22;  // blocks per chunk < 2^22, chunks < 2^10 (attention_decode_supported)
struct SplitCols {
  uint32_t cols_s;  // shared address of column 0
  const DevView* k;
  const DevView* v;
  int64_t k_off, v_off;  // the head's offset in a block
  __device__ __forceinline__ void get(int col, const uint8_t*& kh, const uint8_t*& vh) const {
    const uint32_t w = lds_u32(cols_s + 4 * col);
    kh = vh = nullptr;
    if (w != kNoCol) {
      const uint32_t ci = w >> kColShift;
      const int64_t bi = w & ((1u << kColShift) - 1u);
      kh = k->chunk[ci] + bi * k->L.block_bytes + k_off;
      vh = v->chunk[ci] + bi * v->L.block_bytes + v_off;
    }
  }
};

// Fills cols[0, min(ncols, kDecodeSplitCols)) for block-table columns col0.. of sequence s.
__device__ __forceinline__ void split_cols(const KParams& p, int s, int col0, int ncols, uint32_t* cols, int tid,
                                           int nthreads) {
  const uint32_t bpc = static_cast<uint32_t>(p.k.bpc);
  for (int j = tid; j < ncols && j < kDecodeSplitCols; j += nthreads) {
    const int64_t col = col0 + j;
    const int64_t blk = col < p.max_blocks ? p.table[static_cast<int64_t>(s) * p.max_blocks + col] : -1;
    const bool ok = blk >= 0 && blk < p.k.id_space && blk < p.v.id_space;
    const uint32_t b = static_cast<uint32_t>(blk);  // an int32 block id: 32-bit division, not 64-bit
    cols[j] = ok ? (b / bpc) << kColShift | b % bpc : kNoCol;
  }
}

#ifdef PAGEDKV_CTA_TIMES
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

__device__ __forceinline__ float exp2_approx(float x) {  // exp2f without its subnormal range fix-ups
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <Format F, Feed FD>
constexpr int bits_of() {
  return FD == Feed::kPass ? 16 : FD == Feed::kTokenScale ? 8 : F == Format::kInt2 ? 2 : 4;
}

// Lane-relative key channel of k-step kk, B-fragment slot sl (0, 1: b0 low / high; 2, 3: b1): 16-bit
// and 8-bit codes in storage order; int4 / int2 in unpack_pairs order (pairs i, i + PW / 2 of a word of
// PW codes, a word feeding PW / 4 k-steps).
template <Feed FD, int PW>
__device__ __forceinline__ constexpr int key_channel(int kk, int sl) {
  if constexpr (FD == Feed::kFold) {
    const int x = PW * (kk / (PW / 4)) + 2 * (kk % (PW / 4));
    return sl == 0 ? x : sl == 1 ? x + PW / 2 : sl == 2 ? x + 1 : x + 1 + PW / 2;
  } else {
    return 4 * kk + sl;
  }
}

// kFold values: m-tile i of a 64-channel chunk holds the lane's chunk channels value_lane_channel(i)
// (row g) and + 2 (row g + 8): 0 / 2 and 4 / 6 from the even unpacked pairs, 1 / 3 and 5 / 7 (HI x)
// from the odd ones.
__device__ __forceinline__ constexpr int value_lane_channel(int i) { return 4 * (i / 2) + i % 2; }

// A fast step's page bytes go through a per-warp ring of NS shared-memory stages. At the top of each
// step (or pair) the warp refills the stages freed by the steps before, with 16-byte cp.async, so the
// ring holds the NS steps from the current one: each step's 16 key rows and 16 value
// rows (contiguous in the block), their token scales (int8 / fp8) or value (scale, zero) words
// (int4 / int2), and for int4 / int2 at the first step of a key group that group's per-channel
// (scale, zero) words, which the query refold reads. Loads stay in flight across steps without
// holding registers; after cp.async.wait_group and a warp barrier each lane reads its own operands
// where it needs them (keys before the score mma, values after the softmax), at a fixed per-lane
// offset plus a constant. Rows are padded by 16 bytes, except 8-bit rows of >= 128 bytes (XOR-swizzled,
// Stage::kSwz) and int4 / int2 rows (packed, their values read in a per-quarter token order: vswap),
// so the lanes' reads spread over the banks.
// The decode feed of a format: 16-bit pages as stored, int8 / fp8 with token scales, int4 / int2 folded.
template <Format F>
constexpr Feed decode_feed() {
  return F == Format::kBF16 || F == Format::kFP16 ? Feed::kPass
         : F == Format::kInt8 || F == Format::kFP8E4M3 ? Feed::kTokenScale : Feed::kFold;
}

#ifndef PAGEDKV_DECODE_PAIRS
#define PAGEDKV_DECODE_PAIRS 1
#endif
#ifndef PAGEDKV_DECODE_UNPADDED
#define PAGEDKV_DECODE_UNPADDED 1
#endif
#ifndef PAGEDKV_DECODE_CURSOR
#define PAGEDKV_DECODE_CURSOR 1
#endif

template <int D, Format F>
struct Stage {
  static constexpr Feed FD = decode_feed<F>();
  static constexpr bool kTS = FD == Feed::kTokenScale, kFold = FD == Feed::kFold;
  static constexpr int BITS = bits_of<F, FD>();
  static constexpr int CBT = D * BITS / 8;  // code bytes per token (a row)
  // 8-bit rows of >= 8 16-byte units (int8 / fp8 at head_dim >= 128) are stored unpadded with an XOR
  // swizzle (unit u of row r at unit u ^ (r & 7)), so the lanes' reads (ldmatrix, 16-byte loads) hit
  // distinct banks and four stages fit three blocks per SM. kFold rows are packed, as in the pages
  // (PAGEDKV_DECODE_UNPADDED = 0: padded): a warp's cp.async then writes 512 contiguous bytes, where
  // padded rows split its requests over 1.5x the L2 sectors (ncu, int4 at head_dim 128); the value
  // reads keep apart in the banks by their token order (vswap in the kernel). Other rows are padded
  // by one unit.
  static constexpr bool kSwz = kTS && CBT >= 128;
  static constexpr bool kPacked = kSwz || (kFold && PAGEDKV_DECODE_UNPADDED);
  static constexpr int RS = kPacked ? CBT : CBT + 16;  // a row in the stage
  static constexpr int GS = D + 16;          // kFold: a lane quarter's (D / 4 channels) group words, padded
  static constexpr int kK = 0;               // 16 key rows
  static constexpr int kV = kK + kStep * RS;  // 16 value rows
  static constexpr int kM = kV + kStep * RS;  // kTS: 16 key then 16 value scales; kFold: value (scale, zero), D / 64 per token
  static constexpr int kMB = kTS ? 2 * 4 * kStep : kFold ? 4 * kStep * D / 64 : 0;
  static constexpr int kG = kM + kMB;        // kFold: the key group's (scale, zero) words, 4 x GS
  static constexpr int kBytes = kG + (kFold ? 4 * GS : 0);  // one warp's stage
  // Dynamic shared memory besides the stages: query fragments, warp (max, sum), kFold's fp32 query.
  static constexpr int kOther = (D / 16) * 32 * 8 + 4 * kWarps * kRows * 2 + (kFold ? 4 * kRows * (D + 4) : 0);
  static constexpr int kStatic = 4 * kDecodeSplitCols + 3 * 4 * kRows;
  // The stages of the block's warps, reused after the loop for the warps' accumulators.
  static constexpr int area(int ns) { return ns * kWarps * kBytes > 4 * kWarps * kRows * D ? ns * kWarps * kBytes : 4 * kWarps * kRows * D; }
  // Blocks per SM: two at head_dim 256; three at 128 for int4 / int2 / int8 / fp8 (168 registers: at
  // 128 the query fragments spill inside the loop; ncu and the same-run benchmark in
  // benchmarks/RESULTS.md) and where two stages of four blocks do not fit (16-bit pages); else four.
  // Per block: 228 KB / blocks less 1 KB reserved; three stages where they fit, four for swizzled rows
  // (the int8 kernel's largest stall was the wait for a step's copies with three).
  static constexpr bool fit(int blocks, int ns) { return area(ns) + kOther + kStatic <= 228 * 1024 / blocks - 1024; }
#ifdef PAGEDKV_DECODE_BLOCKS  // experiments: blocks per SM below head_dim 256
  static constexpr int kBlocks = D == 256 ? 2 : fit(PAGEDKV_DECODE_BLOCKS, 2) ? PAGEDKV_DECODE_BLOCKS : 3;
#else
  static constexpr int kBlocks = D == 256 ? 2 : D == 128 && FD != Feed::kPass ? 3 : fit(4, 2) ? 4 : 3;
#endif
  // Pairs of steps for the quantized feeds (PAGEDKV_DECODE_PAIRS = 0 turns them off): the loop takes
  // two clean fast steps (of one key group) at a time, so it waits for two stages and keeps NS - 2 in
  // flight, with up to six stages where they fit.
  static constexpr bool kPairs = PAGEDKV_DECODE_PAIRS && FD != Feed::kPass;
  // The most stages, up to n, that fit kBlocks blocks per SM (two at the least; the kernel asserts they fit).
  static constexpr int most_stages(int n) { return n <= 2 || fit(kBlocks, n) ? n : most_stages(n - 1); }
#ifdef PAGEDKV_DECODE_STAGES  // experiments: stages per warp (the most that fit, up to this)
  static constexpr int NS = most_stages(PAGEDKV_DECODE_STAGES);
#else
  static constexpr int NS = most_stages(kPairs ? 6 : kSwz ? 4 : 3);
#endif
  static constexpr int kSmem = area(NS) + kOther;
};

template <int D, Format F, typename T, Feed FD>
__global__ void __launch_bounds__(kThreads, Stage<D, F>::kBlocks) attention_decode_kernel(const __grid_constant__ KParams p) {
  constexpr int KS = D / 16;   // k-steps of S^T and m-tiles of O^T
  constexpr int LK = D / 4;    // key channels per lane
  constexpr int LV = D / 8;    // value channels per lane
  constexpr int VCH = LV / 8;  // 8-channel value pieces per lane and token (>= 1: D >= 64)
  constexpr int BITS = bits_of<F, FD>();
  constexpr bool kTS = FD == Feed::kTokenScale, kFold = FD == Feed::kFold;
  // int8 fast steps: S^T on the integer mma (keys as stored, the query as two int8 terms), values as
  // 1152 + code (the bias's share removed at the end: cz).
  constexpr bool kI8 = kTS && F == Format::kInt8;
  // kFold: odd unpacked pairs read magic + HI x code (unpack_lohi): keys in T, values in fp16.
  constexpr int HIK = kFold ? kHi<BITS, T> : 1, HIV = kFold ? kHi<BITS, __half> : 1;
  constexpr int PW = kFold ? 32 / BITS : 4;  // codes per unpacked key unit
  constexpr int KPW = PW / 4;                // k-steps per unit
  constexpr int GW = PW > 8 ? PW : 8;        // generic steps: key channels loaded together
  constexpr int KW = LK * BITS / 32;         // key words per lane and token
  constexpr int VB = LV * BITS / 8;          // value bytes per lane and token
  constexpr int VW = VB >= 4 ? VB / 4 : 1;
  constexpr int NC = D / 64;                 // kFold: 64-channel value chunks
  constexpr int CBT = LK * 4 * BITS / 8;     // code bytes per token
  constexpr int QS = D + 4;                  // fp32 query row stride (kFold)
  using TK = std::conditional_t<kTS, __half, T>;            // the S^T mma's type
  using TV = std::conditional_t<kTS || kFold, __half, T>;   // the O^T mma's type
  using SG = Stage<D, F>;
  static_assert(SG::FD == FD, "the decode feed of the format");
  static_assert(SG::fit(SG::kBlocks, 2), "two stages must fit");
  constexpr int NS = SG::NS;
  constexpr bool kPairs = SG::kPairs && NS >= 3;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* stages = smem;                                    // [kWarps][NS] stages, then the accumulators:
  float* so = reinterpret_cast<float*>(smem);                // [kWarps][kRows][D] after the loop
  uint2* sq = reinterpret_cast<uint2*>(smem + SG::area(NS)); // [KS][32] query B fragments (unfolded)
  float* sml = reinterpret_cast<float*>(sq + KS * 32);       // [kWarps][kRows][2] warp (max, sum)
  float* sqf = sml + kWarps * kRows * 2;                     // [kRows][QS] fp32 query rows (kFold)
  __shared__ int row_lo[kRows], row_hi[kRows];
  __shared__ float q_amax[kRows];  // kI8: max |q| of each row
  __shared__ uint32_t cols[kDecodeSplitCols];

  const int split = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
#ifdef PAGEDKV_CTA_TIMES  // experiments (scripts/cta_times.py): each warp prints its timeline
  const uint64_t t_launch = global_ns();
#endif
  grid_dependency_wait();  // launched programmatically: what the kernels before wrote is visible from here
#ifdef PAGEDKV_CTA_TIMES
  const uint64_t t_start = global_ns();
#endif
  const int64_t plen = p.lens[s];
  const int64_t skip = p.skip ? p.skip[s] : 0;
  const int64_t n = plen + p.tail_len;
  // The block-table columns of the whole split (it lies within them whatever the sequence's length
  // and the rows' windows), so their loads need no length and overlap the query's.
  const int bs_shift = __ffs(p.k.L.block_size) - 1, bmask = (1 << bs_shift) - 1;
  const int col0 = static_cast<int>((skip + split * p.split_tokens) >> bs_shift);
  split_cols(p, s, col0, static_cast<int>((skip + (split + 1) * p.split_tokens - 1) >> bs_shift) - col0 + 1, cols, tid,
             kThreads);
  if (tid < kRows) {
    int lo = INT_MAX, hi = -1;  // rows past p.rows (padding) attend nothing
    if (tid < p.rows) {
      int64_t lo64, hi64;
      row_window(p, n, tid, lo64, hi64);
      lo = static_cast<int>(lo64);
      hi = static_cast<int>(hi64);
    }
    row_lo[tid] = lo;
    row_hi[tid] = hi;
  }
  // The query rows as fp32, loaded 8 channels of a row a thread at once, one round trip (element-wise
  // loads took one each). kFold: in sqf (row stride QS, odd channels divided by HIK: see refold);
  // else in qrow (stride D), warp 0's last stage, which its first step's copy refills (so the first
  // copies may be in flight while the query fragments are made).
  float* const qrow = reinterpret_cast<float*>(stages + (NS - 1) * SG::kBytes);
  static_assert(kFold || SG::kBytes >= 4 * kRows * D, "qrow fits one stage");
  constexpr int QST = kFold ? QS : D;
  float* const qdst = kFold ? sqf : qrow;
  for (int idx = tid; idx < kRows * D / 8; idx += kThreads) {
    const int r = idx / (D / 8), d0 = 8 * (idx % (D / 8));
    float x[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (r < p.rows) query8(p, s, h, r, D, d0, x);
#pragma unroll
    for (int i = 0; i < 8; ++i) qdst[r * QST + d0 + i] = x[i] * (kFold && i % 2 ? 1.0f / HIK : 1.0f);
  }
  __syncthreads();
  for (int idx = tid; idx < KS * 32; idx += kThreads) {
    const int kk = idx >> 5, r = (idx & 31) >> 2, base = (idx & 3) * LK;
    float x[4];
#pragma unroll
    for (int sl = 0; sl < 4; ++sl) {
      const int ch = base + key_channel<FD, PW>(kk, sl);
      // kFold's odd channels times HIK again: exact (a power of two) for bf16 / fp16 queries, and for
      // fp32 ones above 2^-122 in magnitude (below, the division lost low bits to the subnormal range).
      x[sl] = qdst[r * QST + ch] * (kFold && ch % 2 ? static_cast<float>(HIK) : 1.0f);
    }
    sq[idx] = make_uint2(pack2<TK>(x[0], x[1]), pack2<TK>(x[2], x[3]));
  }
  __syncthreads();
  // The lane's query fragments (qa, ksc; made after the first copies are issued, below).
  uint32_t qa[KS][2];
  float ksc[2] = {0.0f, 0.0f};
  // kFold: per-row score offsets of the lane's rows 2c and 2c + 1, the folded zero minus the magic
  // offset's share (set with q').
  float kb[2] = {0.0f, 0.0f};
  int lo_all = INT_MAX, hi_all = -1, lo_max = -1, hi_min = INT_MAX;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    lo_all = min(lo_all, row_lo[r]);
    hi_all = max(hi_all, row_hi[r]);
    if (r < p.rows) {
      lo_max = max(lo_max, row_lo[r]);
      hi_min = min(hi_min, row_hi[r]);
    }
  }
  // The split's warps walk its pages; the dense tail's steps go round every warp of the sequence's
  // splits (below the loop), so a long tail (up to residual_length + a key group of generic steps)
  // is not one warp's serial chain.
  int64_t e0, e1;
  split_range(p, split, n, lo_all, hi_all, e0, e1);
  const int64_t len = max(min(e1, plen) - e0, static_cast<int64_t>(0));
  const uint8_t* mask = p.mask ? p.mask + s * p.mask_stride + p.mask_offset : nullptr;
  const int mask_n = static_cast<int>(min(p.mask_len - p.mask_offset, static_cast<int64_t>(1) << 30));
  const SplitCols heads{static_cast<uint32_t>(__cvta_generic_to_shared(cols)), &p.k, &p.v, h * p.k.L.head_bytes,
                        h * p.v.L.head_bytes};
  const Split<SplitCols> sp{heads, col0, bs_shift, bmask, static_cast<int>(plen), static_cast<int>(skip)};
  const int lo_r[2] = {row_lo[2 * c], row_lo[2 * c + 1]}, hi_r[2] = {row_hi[2 * c], row_hi[2 * c + 1]};
  // Each warp takes a contiguous run of 16-token steps aligned to positions that are multiples of 16,
  // so a whole step lies in one block (and one key group).
  const int ie0 = static_cast<int>(e0), ie1 = ie0 + static_cast<int>(len), isk = static_cast<int>(skip);
  const int a0 = len > 0 ? ie0 - ((isk + ie0) & 15) : ie0;
  const int per_warp = (ie1 - a0 + kStep * kWarps - 1) / (kStep * kWarps) * kStep;
  const int w0 = a0 + warp * per_warp, lim = min(w0 + per_warp, ie1), wlo = max(w0, ie0);
  const int kg_shift = __ffs(p.k.L.group) - 1, vg_shift = __ffs(p.v.L.group) - 1;
  // Fast steps with no masking: inside every row's window, no key mask (with one, no step is clean).
  const int clean_lo = max(wlo, lo_max), clean_hi = p.mask ? INT_MIN : min(lim, hi_min + 1);
  const bool softcap = p.softcap > 0.0f;
  const float qk_scale = softcap ? p.scale : p.scale * kLog2e;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows 2c, 2c + 1 (base-2 maxima)
  float o[KS][4];
#pragma unroll
  for (int t = 0; t < KS; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
  // kFold: value chunk g % NC's corrections of rows 2c, 2c + 1 (columns): magic's share in row g
  // (cz[0], cz[1]), zeros' in row g + 8 (cz[2], cz[3]). kI8: the fast steps' sums of P^T (columns 2c,
  // 2c + 1; rows g and g + 8 alike), times 1152 the values' bias.
  float cz[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  // A fast step's keys and values in registers, read from its stage: key words, value words, kFold's
  // value (scale, zero) words (the kTS key and value scales of tokens g, g + 8 go to float[2] arrays).
  using KWords = uint32_t[2][KW];
  using VWords = uint32_t[4][kFold ? NC : VW];
  using VMeta = uint32_t[4][kFold ? NC : 1];
  // A step's page-head pair, offset by the lane's 16 bytes (a lane copies 16-byte units lane + 32 i
  // of each region); null when the step is not fast (not whole in the warp's range, or its block
  // absent). Copies walk the warp's steps in order, so the column looked up last is kept: a 64-token
  // page's four steps read it once (PAGEDKV_DECODE_CURSOR = 0: every step looks its column up, and
  // copies address the stage unit by unit). The column table reads through a 32-bit shared address
  // taken once (indexed through the array, every lookup recomputed its shared window address).
  const int fast_last = min(lim, static_cast<int>(plen)) - kStep;  // fast steps start in [wlo, fast_last]
  constexpr bool kCursor = PAGEDKV_DECODE_CURSOR && FD != Feed::kPass;  // 16-bit pages: it spilled
  int cur_col = INT_MIN;
  const uint8_t *cur_k = nullptr, *cur_v = nullptr;
  const auto step_heads = [&](int st, const uint8_t*& kh, const uint8_t*& vh, int& off0) {
    const int pos0 = isk + st;
    const int scol = (pos0 >> bs_shift) - col0;
    off0 = pos0 & bmask;
    const bool in = st >= wlo && st <= fast_last;
    if (in && (!kCursor || scol != cur_col)) {
      heads.get(scol, cur_k, cur_v);
      if (cur_k != nullptr) {
        cur_k += 16 * lane;
        cur_v += 16 * lane;
      }
      cur_col = scol;
    }
    kh = in ? cur_k : nullptr;  // selects, not a branch around the cursor's copy: 2% fewer int4 instructions (ncu)
    vh = in ? cur_v : nullptr;
  };
  uint8_t* const wstage = stages + warp * NS * SG::kBytes;
  const uint32_t lane_stage = static_cast<uint32_t>(__cvta_generic_to_shared(wstage)) + 16 * lane;  // shared address
  // Step st's key group needs its (scale, zero) words (kFold): the first step of a group or of the
  // warp's range (fast steps of one group are contiguous, so this is where the refold runs).
  const auto group_start = [&](int st, int off0) { return (off0 & (p.k.L.group - 1)) < kStep || st < wlo + kStep; };
  // Per-lane stage offsets (loop invariant). Copy: 16-byte unit lane + 32 i of the step's rows sits at
  // row (lane + 32 i) / U, unit (lane + 32 i) % U (U = CBT / 16 units a row); kFold's group words,
  // unit lane + 32 i of a lane quarter's D / 16; value (scale, zero) word lane + 32 i (D / 64 a token).
  constexpr int U = CBT / 16;
  constexpr bool kSwz = SG::kSwz;
  // Copies: row lane / U + 32 i / U, unit lane % U (swizzled: XOR the row's low 3 bits, which are
  // (lane / U) ^ (32 i / U) there since lane / U < 32 / U).
  const int cp_row = (lane / U) * SG::RS, cp_unit = 16 * (kSwz ? (lane % U) ^ ((lane / U) & 7) : lane % U);
  const int cp_grp = (lane / (D / 16)) * SG::GS + (lane % (D / 16)) * 16;
  const int vshift = vg_shift - 6;  // value groups of 64 << vshift channels
  // Reads: keys of token g at quarter c, values of token 2c (kFold: channels 8 g of each chunk; int2
  // inside an aligned word), value (scale, zero) words of token 2c, token scales of token g.
  // Swizzled rows: a row part plus a unit part that later units XOR (units (KW / 4) c + i of row g or
  // g + 8 for keys, (VW / 4) g + i of row 2c + dr for values).
  const int rd_key = kSwz ? g * SG::RS : g * SG::RS + c * (KW * 4);
  const int rk_unit = 16 * ((KW / 4 * c) ^ g);
  // kI8: the row of ldsm_x4's matrix lane / 8 (token lane % 8 + 8 (lane / 8 % 2), bytes 16 (lane / 16) on).
  const int rd_key8 = ((lane & 7) + 8 * ((lane >> 3) & 1)) * SG::RS + 16 * (kSwz ? (lane >> 4) ^ (lane & 7) : lane >> 4);
  const int rd_val = 2 * c * SG::RS + (kFold ? (BITS == 4 ? 4 * g : 4 * (g >> 1)) : kSwz ? 0 : g * (VW * 4));
  // kFold, packed rows (RS = CBT, a power of two): in one value load the four lane quarters read rows
  // 2c + dr, 2 CBT bytes apart, so at CBT = 32 quarters c and c + 2 share banks and at 64 all four do.
  // Where vswap is set, a lane reads each token pair (dr, dr + 1) in swapped order, which moves its
  // quarter to the other half of the banks: conflict-free at 32, 2-way at 64 (16 needs no swap, 128
  // stays 4-way). unpack_piece's byte permutes put the pairs back in order. rdv[0 / 1]: the even /
  // odd token's row offset (rows 2c + vswap and its XOR-1 neighbour).
  const int vswap = !(kFold && SG::kPacked) ? 0 : CBT == 64 ? (c & 1) : CBT == 32 ? (c >> 1) : 0;
  const int rdv[2] = {rd_val + vswap * SG::RS, (rd_val + vswap * SG::RS) ^ SG::RS};
  const uint32_t vsel = vswap ? 0x1054u : 0x5410u;  // byte_perm(b, a, vsel) = byte_perm(a, b, 0x5410) when swapped
  const int rv_unit = 16 * ((VW / 4 * g) ^ (2 * c));
  // Starts the copy of step st (when it is a fast step) into stage `slot`: cp.async, 16 bytes at a time
  // (kFold's value (scale, zero) words, one per 64 channels whatever the value group: 16 bytes a lane
  // where the groups are 64 channels, else a word at a time).
  // Returns the stage's flags: 1 = a fast step, 2 = its key group's words copied (the refold runs).
  const auto copy_step = [&](int st, int slot) -> uint32_t {
    const uint8_t *kh, *vh;  // the lane's 16 bytes on
    int off0;
    step_heads(st, kh, vh, off0);
    uint32_t flags = 0;
    if (kh != nullptr) {
      flags = 1;
      uint8_t* const sb = wstage + slot * SG::kBytes;
      const uint32_t sl = lane_stage + slot * SG::kBytes;  // the same stage, the lane's 16 bytes on, as a shared address
      const uint8_t* const krow = kh + off0 * CBT;
      const uint8_t* const vrow = vh + off0 * CBT;
      if constexpr (kCursor && kFold && SG::kPacked) {  // packed rows: unit lane + 32 i at 16 (lane + 32 i), as in the page
#pragma unroll
        for (int i = 0; i < (CBT + 31) / 32; ++i) {
          if (CBT % 32 == 0 || lane + 32 * i < CBT) {
            cp_async16_s(sl + SG::kK + 512 * i, krow + 512 * i);
            cp_async16_s(sl + SG::kV + 512 * i, vrow + 512 * i);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < (CBT + 31) / 32; ++i) {  // 16 rows of CBT bytes: CBT units of 16 bytes
          if (CBT % 32 == 0 || lane + 32 * i < CBT) {
            const int off = cp_row + (32 * i / U) * SG::RS + (kSwz ? cp_unit ^ (16 * ((32 * i / U) & 7)) : cp_unit);
            cp_async<16>(sb + SG::kK + off, krow + 512 * i);
            cp_async<16>(sb + SG::kV + off, vrow + 512 * i);
          }
        }
      }
      if constexpr (kTS) {  // 16 key scales, then 16 value scales: 4 + 4 units
        if (lane < 8) {
          const uint8_t* src = lane < 4 ? kh + p.k.L.code_bytes + 4 * off0 : vh + p.v.L.code_bytes + 4 * off0 - 64;
          cp_async<16>(sb + SG::kM + 16 * lane, src);
        }
      } else if constexpr (kFold) {
        if (kCursor && vshift == 0) {  // one word per 64 channels: the step's 16 NC words are contiguous, 4 NC units
          if (kStep * NC / 4 >= 32 || lane < kStep * NC / 4)
            cp_async16_s(sl + SG::kM, vh + p.v.L.code_bytes + 4 * NC * off0);
        } else {
          const uint32_t* vm_src = reinterpret_cast<const uint32_t*>(vh - 16 * lane + p.v.L.code_bytes);
#pragma unroll
          for (int i = 0; i < (kStep * NC + 31) / 32; ++i) {
            const int w = lane + 32 * i;  // token w / NC, chunk w % NC
            if (kStep * NC % 32 == 0 || w < kStep * NC) cp_async<4>(sb + SG::kM + 4 * w, vm_src + ((off0 * NC + w) >> vshift));
          }
        }
        if (group_start(st, off0)) {
          flags |= 2;
          const uint8_t* sz = kh + p.k.L.code_bytes + 4 * (off0 >> kg_shift) * D;
#pragma unroll
          for (int i = 0; i < (D / 4 + 31) / 32; ++i) {
            if (D >= 128 || lane + 32 * i < D / 4) cp_async<16>(sb + SG::kG + cp_grp + (32 * i / (D / 16)) * SG::GS, sz + 512 * i);
          }
        }
      }
    }
    cp_async_commit();
    return flags;
  };
  const auto read_keys = [&](int slot, KWords& kw, float (&ks)[2]) {
    const uint8_t* const sb = wstage + slot * SG::kBytes;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      if constexpr (kI8) {  // A fragment kk of the integer mma (channels 32 kk .. 32 kk + 31) in words 4 kk ..
#pragma unroll
        for (int kk = t * KS / 4; kk < (t + 1) * KS / 4; ++kk)
          ldsm_x4(sb + SG::kK + (kSwz ? rd_key8 ^ (32 * kk) : rd_key8 + 32 * kk), &kw[(4 * kk) / KW][(4 * kk) % KW]);
      } else {
#pragma unroll
        for (int i = 0; i < (KW + 3) / 4; ++i)  // 16-byte units (int2 at head_dim 64: 4 bytes)
          load_words<KW < 4 ? KW : 4>(sb + SG::kK + rd_key + 8 * t * SG::RS + (kSwz ? rk_unit ^ (16 * i) : 16 * i), kw[t] + 4 * i);
      }
      if constexpr (kTS) ks[t] = *reinterpret_cast<const float*>(sb + SG::kM + 4 * (8 * t + g));
    }
  };
  const auto read_values = [&](int slot, VWords& vw, VMeta& vm, float (&vs)[2]) {
    const uint8_t* const sb = wstage + slot * SG::kBytes;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int dr = (t & 1) + 8 * (t >> 1);  // token 2c + dr
      if constexpr (kFold) {
        const uint8_t* const row = sb + SG::kV + rdv[t & 1] + 8 * (t >> 1) * SG::RS;  // token 2c + (dr ^ vswap)
#pragma unroll
        for (int j = 0; j < NC; ++j) {
          vw[t][j] = *reinterpret_cast<const uint32_t*>(row + 8 * BITS * j);
          if constexpr (BITS == 2) vw[t][j] >>= 16 * (g & 1);
          vm[t][j] = *reinterpret_cast<const uint32_t*>(sb + SG::kM + 4 * ((2 * c + dr) * NC + j));
        }
      } else {
        const uint8_t* const sv = sb + SG::kV + rd_val;
#pragma unroll
        for (int i = 0; i < (VW + 3) / 4; ++i)
          load_words<VW < 4 ? VW : 4>(sv + dr * SG::RS + (kSwz ? rv_unit ^ (16 * (i ^ (dr & 1))) : 16 * i), vw[t] + 4 * i);
      }
    }
    if constexpr (kTS) {
#pragma unroll
      for (int t = 0; t < 2; ++t) vs[t] = *reinterpret_cast<const float*>(sb + SG::kM + 64 + 4 * (8 * t + g));
    }
  };
  // Values as (token a, token b) pairs of one channel, the A-fragment order: piece q of the lane's
  // value words (kFold: 64-channel chunk q) feeds m-tiles [q TPP, (q + 1) TPP), so a fast step unpacks
  // one piece and runs its mmas before the next (fewer live registers).
  constexpr int NPC = kFold ? NC : VW, TPP = KS / NPC;
  // m-tile t of O^T (kFold: chunk t / 4's scaled P^T in bq; the tile's channels as value_lane_channel).
  const auto pv_tile = [&](int t, const uint32_t (&vr)[2][LV], const uint32_t (&bq)[kFold ? NC : 1][2], uint32_t b0,
                           uint32_t b1) {
    if constexpr (kFold) {
      const int cg = 8 * (t / 4) + value_lane_channel(t % 4);
      mma<TV>(o[t], make_uint4(vr[0][cg], vr[0][cg + 2], vr[1][cg], vr[1][cg + 2]), bq[t / 4][0], bq[t / 4][1]);
    } else {
      mma<TV>(o[t], make_uint4(vr[0][2 * t], vr[0][2 * t + 1], vr[1][2 * t], vr[1][2 * t + 1]), b0, b1);
    }
  };
  const auto unpack_piece = [&](int q, const VWords& vw, uint32_t (&vr)[2][LV]) {
#pragma unroll
    for (int P = 0; P < 2; ++P) {
      const uint32_t wa = vw[2 * P][q], wb = vw[2 * P + 1][q];
      if constexpr (FD == Feed::kPass) {
        vr[P][2 * q] = __byte_perm(wa, wb, 0x5410);
        vr[P][2 * q + 1] = __byte_perm(wa, wb, 0x7632);
      } else if constexpr (kTS) {
        value_words<F, kI8>(wa, wb, &vr[P][4 * q]);
      } else if constexpr (BITS == 4) {  // raw codes: vr[P][8 q + i] = channel 64 q + 8 g + i, 1024 + code (odd i: HIV x code)
        unpack_lohi<4, __half>(__byte_perm(wa, wb, vsel), &vr[P][8 * q]);
        unpack_lohi<4, __half>(__byte_perm(wa, wb, vsel + 0x2222u), &vr[P][8 * q + 4]);  // 0x7632 / 0x3276
      } else {
        unpack_lohi<2, __half>(__byte_perm(wa, wb, vsel), &vr[P][8 * q]);
      }
    }
  };
  // kFold, at the first fast step of a key group (its (scale, zero) words in the step's stage): the
  // lane's folded query q' = q * scale, rounded to T, as the key mma's B fragments qa, and the score
  // offsets kb of rows 2c, 2c + 1: q . zero - magic sum(q'). Odd channels meet the odd unpacked pairs
  // (HIK x code), so sqf holds them divided by HIK (exact: a power of two) and q' costs one multiply;
  // their zeros' share is HIK times its own sum. magic sum(q') comes from the tensor core: the key mma
  // of an all-zero token (A = magic) against qa. With at most 4 query rows (one query token of a GQA
  // group of <= 4), the lanes of padding rows g = 4..7 fold the second half of row g - 4's units and
  // the halves are swapped across lanes l, l + 16, so no lane folds a padding row.
  // fold_units: NU units (PW channels each) from unit jw0 of the lane's quarter of one query row qr.
  const auto fold_units = [&](auto nu, int jw0, const uint32_t* sz, const float* qr, auto& out, float& be, float& bo) {
    constexpr int NU = decltype(nu)::value;
#pragma unroll
    for (int j = 0; j < NU; ++j) {
      uint32_t zw[PW];
      float qv[PW];
#pragma unroll
      for (int i = 0; i < PW / 4; ++i) {
        load_words<4>(reinterpret_cast<const uint8_t*>(sz + PW * (jw0 + j) + 4 * i), zw + 4 * i);
        const float4 f4 = *reinterpret_cast<const float4*>(qr + PW * (jw0 + j) + 4 * i);
        qv[4 * i] = f4.x;
        qv[4 * i + 1] = f4.y;
        qv[4 * i + 2] = f4.z;
        qv[4 * i + 3] = f4.w;
      }
#pragma unroll
      for (int u = 0; u < KPW; ++u) {
        float r[4];
#pragma unroll
        for (int sl = 0; sl < 4; ++sl) {  // slots 2, 3: the odd channels
          const int ch = key_channel<FD, PW>(u, sl);
          const float2 f = __half22float2(as_h2(zw[ch]));  // (scale, zero)
          r[sl] = qv[ch] * f.x;
          if (sl < 2) be = fmaf(qv[ch], f.y, be);
          else bo = fmaf(qv[ch], f.y, bo);
        }
        out[KPW * j + u][0] = pack2<T>(r[0], r[1]);
        out[KPW * j + u][1] = pack2<T>(r[2], r[3]);
      }
    }
  };
  const auto refold = [&](int slot) {
    constexpr int NU = LK / PW;
    const uint32_t* sz = reinterpret_cast<const uint32_t*>(wstage + slot * SG::kBytes + SG::kG + c * SG::GS);
    float be = 0.0f, bo = 0.0f;
    bool folded = false;
    if constexpr (NU % 2 == 0) {
      if (p.rows <= kRows / 2) {
        const bool hi = g >= kRows / 2;
        uint32_t tq[KS / 2][2];
        fold_units(std::integral_constant<int, NU / 2>{}, hi ? NU / 2 : 0, sz, sqf + (g & 3) * QS + c * LK, tq, be, bo);
#pragma unroll
        for (int i = 0; i < KS / 2; ++i) {
#pragma unroll
          for (int w = 0; w < 2; ++w) {
            const uint32_t other = __shfl_xor_sync(0xffffffffu, tq[i][w], 16);
            qa[i][w] = hi ? other : tq[i][w];
            qa[KS / 2 + i][w] = hi ? tq[i][w] : other;
          }
        }
        be = fmaf(static_cast<float>(HIK), bo, be);
        be += __shfl_xor_sync(0xffffffffu, be, 16);
        folded = true;
      }
    }
    if (!folded) {
      fold_units(std::integral_constant<int, NU>{}, 0, sz, sqf + g * QS + c * LK, qa, be, bo);
      be = fmaf(static_cast<float>(HIK), bo, be);
    }
    be += __shfl_xor_sync(0xffffffffu, be, 1);
    be += __shfl_xor_sync(0xffffffffu, be, 2);
    float m0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, m1[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // two chains
    const uint4 magic = make_uint4(kMagic2<T>, kMagic2<T>, kMagic2<T>, kMagic2<T>);
#pragma unroll
    for (int kk = 0; kk < KS; kk += 2) {
      mma<T>(m0, magic, qa[kk][0], qa[kk][1]);
      mma<T>(m1, magic, qa[kk + 1][0], qa[kk + 1][1]);
    }
    kb[0] = __shfl_sync(0xffffffffu, be, 8 * c) - (m0[0] + m1[0]);
    kb[1] = __shfl_sync(0xffffffffu, be, 8 * c + 4) - (m0[1] + m1[1]);
  };
  uint32_t stage_flags = 0;  // copy_step's flags, 2 bits per stage
#pragma unroll
  for (int i = 0; i + 1 < NS; ++i) stage_flags |= copy_step(w0 + i * kStep, i) << (2 * i);
  if constexpr (kI8) {
    for (int r = warp; r < kRows; r += kWarps) {
      float a = 0.0f;
      bool bad = false;  // a NaN or infinite element: the row's scores become NaN, as the fp16 path gave
#pragma unroll
      for (int d = lane; d < D; d += 32) {
        const float x = fabsf(qrow[r * D + d]);
        a = fmaxf(a, x);
        bad |= !(x <= FLT_MAX);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
      if (__any_sync(0xffffffffu, bad)) a = INFINITY;
      if (lane == 0) q_amax[r] = a;
    }
    __syncthreads();
  }
  // The lane's query fragments (row g), made while those copies are in flight: unfolded for 16- and
  // 8-bit codes, q' = q * key scale for kFold (filled at the first fast step of each key group).
  // kI8: qa[kk] (kk < KS / 2) holds the B fragments of the int8 mma's k-step kk (channels 32 kk ..
  // 32 kk + 31 in order, as ldsm_x4 loads the keys) for q_hi = rint(q / s), s = max |q| / 127, and
  // qa[KS / 2 + kk] those of q_lo = rint((q - s q_hi) / (s / 254)), so that q = s (q_hi + q_lo / 254)
  // to 1 / 64516 of max |q|. ksc: s / 254 of rows 2c, 2c + 1, the integer score's factor (the score is
  // s (hi + lo / 254)).
  if constexpr (kI8) {
    const float amax = q_amax[g], sh = amax > 0.0f ? amax / 127.0f : 1.0f, inv_h = 1.0f / sh, inv_l = 254.0f / sh;
#pragma unroll
    for (int kk = 0; kk < KS / 2; ++kk) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t hi = 0u, lo = 0u;
        const float4 x4 = *reinterpret_cast<const float4*>(qrow + g * D + 32 * kk + 16 * half + 4 * c);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float x = j == 0 ? x4.x : j == 1 ? x4.y : j == 2 ? x4.z : x4.w;
          const float qh = fminf(fmaxf(rintf(x * inv_h), -127.0f), 127.0f);
          const float ql = fminf(fmaxf(rintf((x - qh * sh) * inv_l), -127.0f), 127.0f);
          hi |= (static_cast<uint32_t>(static_cast<int>(qh)) & 0xffu) << (8 * j);
          lo |= (static_cast<uint32_t>(static_cast<int>(ql)) & 0xffu) << (8 * j);
        }
        qa[kk][half] = hi;
        qa[KS / 2 + kk][half] = lo;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float a = q_amax[2 * c + r];
      ksc[r] = a == INFINITY ? NAN : (a > 0.0f ? a / 127.0f : 1.0f) / 254.0f;
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const uint2 u = sq[kk * 32 + lane];
      qa[kk][0] = u.x;
      qa[kk][1] = u.y;
    }
  }
  if constexpr (kI8) __syncthreads();  // every warp done with qrow before warp 0's first step refills it
  // Scores to base-2 logits: softmax scale, the kTS key scales of tokens g, g + 8 (ks), soft cap.
  const auto scale_scores = [&](float (&sc)[4], const float (&ks)[2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = sc[i] * qk_scale * ks[i >> 1];
      if (softcap) v = p.softcap * tanhf(v / p.softcap) * kLog2e;
      sc[i] = v;
    }
  };
  // A fast step's S^T from the keys in its stage (sc: (token g, row 2c), (g, 2c + 1), (g + 8, 2c),
  // (g + 8, 2c + 1); ks: kTS key scales), kFold refolding the query first where the stage holds a new
  // key group's words. The mma fp16 / bf16 feeds run on two accumulator chains (even / odd k-steps;
  // kFold's odd chain starts from the score offsets kb).
  const auto fast_scores = [&](int slot, uint32_t flags, float (&sc)[4], float (&ks)[2]) {
    KWords kw;
    read_keys(slot, kw, ks);
    if constexpr (kFold) {
      if (flags & 2) refold(slot);
    }
    float sx[4] = {kb[0], kb[1], kb[0], kb[1]};
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] = 0.0f;
    if constexpr (FD == Feed::kPass) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        mma<TK>(kk % 2 ? sx : sc, make_uint4(kw[0][2 * kk], kw[1][2 * kk], kw[0][2 * kk + 1], kw[1][2 * kk + 1]), qa[kk][0],
                qa[kk][1]);
    } else if constexpr (kI8) {
      int ah[4] = {0, 0, 0, 0}, al[4] = {0, 0, 0, 0};  // sum(code q_hi), sum(code q_lo): two independent chains
#pragma unroll
      for (int kk = 0; kk < KS / 2; ++kk) {
        const uint32_t* a = &kw[(4 * kk) / KW][(4 * kk) % KW];
        mma_s8(ah, make_uint4(a[0], a[1], a[2], a[3]), qa[kk][0], qa[kk][1]);
        mma_s8(al, make_uint4(a[0], a[1], a[2], a[3]), qa[KS / 2 + kk][0], qa[KS / 2 + kk][1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[i] = static_cast<float>(ah[i] * 254 + al[i]) * ksc[i & 1];  // |.| < 2^31 to head_dim 256
    } else if constexpr (kTS) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a0, a1, a2, a3;
        key_word<F>(kw[0][kk], a0, a2);
        key_word<F>(kw[1][kk], a1, a3);
        mma<TK>(kk % 2 ? sx : sc, make_uint4(a0, a1, a2, a3), qa[kk][0], qa[kk][1]);
      }
    } else {
#pragma unroll
      for (int jw = 0; jw < KW; ++jw) {
        uint32_t ra[PW / 2], rb[PW / 2];
        unpack_lohi<BITS, T>(kw[0][jw], ra);
        unpack_lohi<BITS, T>(kw[1][jw], rb);
#pragma unroll
        for (int u = 0; u < KPW; ++u)
          mma<TK>((KPW * jw + u) % 2 ? sx : sc, make_uint4(ra[2 * u], rb[2 * u], ra[2 * u + 1], rb[2 * u + 1]),
                  qa[KPW * jw + u][0], qa[KPW * jw + u][1]);
      }
    }
    if constexpr (!kI8) {
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[i] += sx[i];
    }
  };
  // Online softmax per row over NT steps' logits (lanes g = 0..7 hold tokens g, g + 8 of each): they
  // become probabilities against the new running maxima; l, o and cz are rescaled.
  const auto softmax = [&](auto& sc) {
    constexpr int NT = sizeof(sc) / sizeof(sc[0]);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(sc[0][r], sc[0][2 + r]);
#pragma unroll
      for (int t = 1; t < NT; ++t) mx = fmaxf(mx, fmaxf(sc[t][r], sc[t][2 + r]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float mn = fmaxf(m[r], mx);
      alpha[r] = mn == -INFINITY ? 1.0f : exp2_approx(m[r] - mn);
      m[r] = mn;
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float p0 = mn == -INFINITY ? 0.0f : exp2_approx(sc[t][r] - mn);
        const float p1 = mn == -INFINITY ? 0.0f : exp2_approx(sc[t][2 + r] - mn);
        sum += p0 + p1;
        sc[t][r] = p0;
        sc[t][2 + r] = p1;
      }
      l[r] = l[r] * alpha[r] + sum;
    }
    if (alpha[0] != 1.0f || alpha[1] != 1.0f) {  // the running maxima rarely move late in a long sequence
#pragma unroll
      for (int t = 0; t < KS; ++t) {
        o[t][0] *= alpha[0];
        o[t][1] *= alpha[1];
        o[t][2] *= alpha[0];
        o[t][3] *= alpha[1];
      }
      if constexpr (kFold || kI8) {
        cz[0] *= alpha[0];
        cz[1] *= alpha[1];
        cz[2] *= alpha[0];
        cz[3] *= alpha[1];
      }
    }
  };
  // P^T as the B fragment (times the value scale for kTS: P diag(s) codes = P V).
  const auto p_fragments = [&](const float (&pr)[4], const float (&vs)[2], uint32_t& b0, uint32_t& b1) {
    b0 = transpose8x8(pack2<TV>(pr[0] * vs[0], pr[1] * vs[0]));
    b1 = transpose8x8(pack2<TV>(pr[2] * vs[1], pr[3] * vs[1]));
  };
  // P V of a fast step from its value words (pr: its probabilities, as sc).
  // kFold: chunk j's m-tiles take P^T times the tokens' value scales of chunk j (the raw codes on A);
  // m-tile 4 j + i holds channels 64 j + 8 g + value_lane_channel(i) (row g) and + 2 (row g + 8), so
  // one tile's codes share a scale. cz collects the rest: in row g, -1024 times chunk g % NC's scaled
  // P^T (the magic's share, the same in odd tiles, which are then divided by HIV); in row g + 8, chunk
  // g % NC's zeros against P^T (za, zb).
  const auto fast_pv = [&](const VWords& vw, const VMeta& vm, const float (&vs)[2], const float (&pr)[4]) {
    uint32_t b0, b1, bq[kFold ? NC : 1][2], za = 0u, zb = 0u;
    p_fragments(pr, vs, b0, b1);
    // The cz mmas: int8's ones, kFold's zeros and magic offsets. At head_dim >= 128 they go first, so
    // that their chain's latency overlaps the P V mmas (at 64 that spilled at four blocks per SM).
    const auto corrections = [&] {
      if constexpr (kI8) mma<__half>(cz, make_uint4(0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u), b0, b1);  // ones
      if constexpr (kFold) {
        mma<__half>(cz, make_uint4(0u, za, 0u, zb), b0, b1);
#pragma unroll
        for (int j = 0; j < NC; ++j) {
          const uint32_t a = g % NC == j ? 0xe400e400u : 0u;  // -1024 in fp16
          mma<__half>(cz, make_uint4(a, 0u, a, 0u), bq[j][0], bq[j][1]);
        }
      }
    };
    if constexpr (kFold) {
      const int jg = g % NC;
      uint32_t zs[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        zs[t] = vm[t][0];
#pragma unroll
        for (int j = 1; j < NC; ++j) zs[t] = jg == j ? vm[t][j] : zs[t];
      }
      za = __byte_perm(zs[0], zs[1], 0x7632);
      zb = __byte_perm(zs[2], zs[3], 0x7632);
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        bq[j][0] = h2_bits(__hmul2(as_h2(b0), as_h2(__byte_perm(vm[0][j], vm[1][j], 0x5410))));
        bq[j][1] = h2_bits(__hmul2(as_h2(b1), as_h2(__byte_perm(vm[2][j], vm[3][j], 0x5410))));
      }
    }
    if constexpr (D >= 128) corrections();
    uint32_t vr[2][LV];  // value pairs (tokens 2c + 8 P, 2c + 8 P + 1) of the lane's channels
#pragma unroll
    for (int q = 0; q < NPC; ++q) {
      unpack_piece(q, vw, vr);
#pragma unroll
      for (int u = 0; u < TPP; ++u) pv_tile(q * TPP + u, vr, bq, b0, b1);
    }
    if constexpr (D < 128) corrections();
  };
  // The key mask of tokens g, g + 8 of step st, loaded early so that its latency hides behind the
  // step's math (read where the softmax needs it, a dependent global load stalled every masked step).
  const auto load_keep = [&](int st, bool (&keep)[2]) {
    keep[0] = keep[1] = true;
    if (mask != nullptr) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int e = st + 8 * t + g;
        if (e >= 0 && e < mask_n) keep[t] = __ldg(mask + e) != 0;
      }
    }
  };
  // Scores of entries outside the rows' windows, the key mask, or storage to -inf.
  const auto mask_scores = [&](int st, float (&sc)[4], const bool (&tok_ok)[2], const bool (&keep)[2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = st + 8 * (i >> 1) + g;
      const bool ok = tok_ok[i >> 1] && e >= lo_r[i & 1] && e <= hi_r[i & 1] && keep[i >> 1];
      if (!ok) sc[i] = -INFINITY;
    }
  };
  // Generic step over entries [st, st + kStep) within [elo, ehi): one by one (block edges, the dense
  // tail, absent blocks), dequantized in fp32 and rounded; scores against the unfolded query.
  // tail_only (std::true_type: every entry is a tail entry, e >= plen) drops the page paths and the
  // branch on the tail's type from the tail loop's copy. Measured (ncu, Gemma-3 shape, int4, 192-token
  // tail): the general copy ran ~2300 instructions a step, its stalls mostly waiting for instruction
  // fetch (no_inst), as each warp runs it once.
  const auto generic_step = [&](auto tail_only, int st, int elo, int ehi) {
    constexpr bool kTailOnly = decltype(tail_only)::value;
    const auto entry = [&](int e, Tok* v) -> Tok {
      if constexpr (kTailOnly) {
        const Tok t{nullptr, e - static_cast<int>(plen), true, e < ehi};
        *v = t;
        return t;
      } else {
        return sp.at(e, elo, ehi, v);
      }
    };
    const auto tail8 = [&](const Tok& t, const void* tail, const int64_t* ts, int c0, float* x) {
      if (t.ok) {
        load_tail<FD != Feed::kPass, T>(p, tail, ts, s, h, t.off, c0, x);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = 0.0f;
      }
    };
    float sc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}}, ks[2] = {1.0f, 1.0f}, vs[2] = {1.0f, 1.0f};
    bool tok_ok[2], keep[2];
    load_keep(st, keep);
    Tok kt[2], vt[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      kt[t] = entry(st + 8 * t + g, &vt[t]);
      tok_ok[t] = kt[t].ok;
      if constexpr (kTS && !kTailOnly) {
        ks[t] = token_scale(p.k.L, kt[t]);
        vs[t] = token_scale(p.v.L, vt[t]);
      }
    }
#pragma unroll
    for (int u0 = 0; u0 < LK / GW; ++u0) {
      float xa[GW], xb[GW];
#pragma unroll
      for (int i = 0; i < GW / 8; ++i) {
        const int c0 = c * LK + GW * u0 + 8 * i;
        if constexpr (kTailOnly) {
          tail8(kt[0], p.kt, p.kts, c0, xa + 8 * i);
          tail8(kt[1], p.kt, p.kts, c0, xb + 8 * i);
        } else {
          entry8<F, Role::kKey, FD>(p, p.k.L, kt[0], p.kt, p.kts, s, h, c0, nullptr, xa + 8 * i);
          entry8<F, Role::kKey, FD>(p, p.k.L, kt[1], p.kt, p.kts, s, h, c0, nullptr, xb + 8 * i);
        }
      }
#pragma unroll
      for (int v = 0; v < GW / 4; ++v) {
        const int kk = u0 * (GW / 4) + v;
        int ch[4];
#pragma unroll
        for (int sl = 0; sl < 4; ++sl) ch[sl] = key_channel<FD, PW>(kk, sl) - GW * u0;
        const uint2 b = sq[kk * 32 + lane];
        mma<TK>(sc[0], make_uint4(pack2<TK>(xa[ch[0]], xa[ch[1]]), pack2<TK>(xb[ch[0]], xb[ch[1]]),
                               pack2<TK>(xa[ch[2]], xa[ch[3]]), pack2<TK>(xb[ch[2]], xb[ch[3]])), b.x, b.y);
      }
    }
    scale_scores(sc[0], ks);
    mask_scores(st, sc[0], tok_ok, keep);
    softmax(sc);
    uint32_t b0, b1, bq[kFold ? NC : 1][2];
    p_fragments(sc[0], vs, b0, b1);
#pragma unroll
    for (int j = 0; j < (kFold ? NC : 1); ++j) {
      bq[j][0] = b0;
      bq[j][1] = b1;
    }
    uint32_t vr[2][LV];
#pragma unroll
    for (int P = 0; P < 2; ++P) {
      Tok ta, tb;
      entry(st + 8 * P + 2 * c, &ta);
      entry(st + 8 * P + 2 * c + 1, &tb);
#pragma unroll
      for (int q = 0; q < VCH; ++q) {  // kFold: the fast step's channels, odd ones times HIV
        const int c0 = kFold ? 64 * q + 8 * g : g * LV + 8 * q;
        float xa[8], xb[8];
        if constexpr (kTailOnly) {
          tail8(ta, p.vt, p.vts, c0, xa);
          tail8(tb, p.vt, p.vts, c0, xb);
        } else {
          entry8<F, Role::kValue, FD>(p, p.v.L, ta, p.vt, p.vts, s, h, c0, nullptr, xa);
          entry8<F, Role::kValue, FD>(p, p.v.L, tb, p.vt, p.vts, s, h, c0, nullptr, xb);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float mul = i % 2 ? static_cast<float>(HIV) : 1.0f;
          vr[P][8 * q + i] = pack2<TV>(xa[i] * mul, xb[i] * mul);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < KS; ++t) pv_tile(t, vr, bq, b0, b1);
  };
  // The ring: step st's stage is `slot`; the copies of steps before nx are issued, nx's goes to nslot.
  int slot = 0, nx = w0 + (NS - 1) * kStep, nslot = NS - 1;
#ifdef PAGEDKV_CTA_TIMES
  const uint64_t t_loop = global_ns();
#endif
  for (int st = w0; st < lim;) {
    // Every lane done reading the stages of the steps before st; the copies of the steps up to
    // st + (NS - 1) kStep refill them (one, or two after a pair).
    __syncwarp();
    while (nx < st + NS * kStep) {
      stage_flags = (stage_flags & ~(3u << (2 * nslot))) | copy_step(nx, nslot) << (2 * nslot);
      nx += kStep;
      nslot = nslot + 1 == NS ? 0 : nslot + 1;
    }
    const int slot1 = slot + 1 == NS ? 0 : slot + 1;
    const uint32_t flags = stage_flags >> (2 * slot) & 3u;
    if constexpr (kPairs) {
      // Two clean fast steps of one key group: one softmax update for 32 tokens, two independent
      // score chains.
      if ((flags & 1u) && (stage_flags >> (2 * slot1) & 3u) == 1u && st >= clean_lo && st + 2 * kStep <= clean_hi) {
        cp_async_wait<NS - 2>();  // both steps' copies done (every lane's, after the warp barrier)
        __syncwarp();
        float sc[2][4], ks[2][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}};
        fast_scores(slot, flags, sc[0], ks[0]);
        fast_scores(slot1, 0u, sc[1], ks[1]);
        VWords vw;
        VMeta vm;
        float vs[2] = {1.0f, 1.0f};
        read_values(slot, vw, vm, vs);  // its latency hides behind the softmax
        scale_scores(sc[0], ks[0]);
        scale_scores(sc[1], ks[1]);
        softmax(sc);
        fast_pv(vw, vm, vs, sc[0]);
        read_values(slot1, vw, vm, vs);
        fast_pv(vw, vm, vs, sc[1]);
        st += 2 * kStep;
        slot = slot1 + 1 == NS ? 0 : slot1 + 1;
        continue;
      }
    }
    cp_async_wait<NS - 1>();  // this step's copies done
    __syncwarp();
    if (!(flags & 1u)) {  // a generic step (block edges, absent blocks)
      generic_step(std::false_type{}, st, wlo, lim);
      st += kStep;
      slot = slot1;
      continue;
    }
    const bool clean = st >= clean_lo && st + kStep <= clean_hi;
    float sc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}}, ks[2] = {1.0f, 1.0f}, vs[2] = {1.0f, 1.0f};
    VWords vw;
    VMeta vm;
    const bool tok_ok[2] = {true, true};
    bool keep[2];
    load_keep(st, keep);
    fast_scores(slot, flags, sc[0], ks);
    read_values(slot, vw, vm, vs);  // its latency hides behind the softmax
    scale_scores(sc[0], ks);
    if (__builtin_expect(!clean, 0)) mask_scores(st, sc[0], tok_ok, keep);  // predicated: its ~30 instructions issue on clean steps too
    softmax(sc);
    fast_pv(vw, vm, vs, sc[0]);
    st += kStep;
    slot = slot1;
  }
  {
    // The dense tail: steps of kStep entries from the first the rows see, step j going to warp j of
    // the sequence's splits x kWarps (entries keep their numbering: masks and windows apply as in
    // the loop). A second inlined copy of the generic step: one call site for both (the loop leaving
    // its generic steps to this one) made the loop 5-11% slower (H100, b8 32k, int8 / int4).
    const int t0 = static_cast<int>(max(plen, static_cast<int64_t>(lo_all)));
    const int t1 = static_cast<int>(min(n, static_cast<int64_t>(hi_all) + 1));
    const int tail_stride = kStep * static_cast<int>(p.num_splits) * kWarps;
    for (int st = t0 + kStep * (split * kWarps + warp); st < t1; st += tail_stride) generic_step(std::true_type{}, st, st, min(st + kStep, t1));
  }
#ifdef PAGEDKV_CTA_TIMES
  const uint64_t t_loop_end = global_ns();
#endif
  grid_dependents_launch();  // the merge's blocks may take the SM slots of finished ones from here
  cp_async_wait<0>();
  __syncthreads();  // the accumulators reuse the stages of every warp

  // Merge the warps: full row sums, then each warp's state to shared memory (maxima back to base e).
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int d = 4; d <= 16; d <<= 1) l[r] += __shfl_xor_sync(0xffffffffu, l[r], d);
  float* ow = so + warp * kRows * D;
  if constexpr (kFold) {
    float cm[NC][2], cs[NC][2];  // chunk j's magic and zero corrections of rows 2c, 2c + 1 (lane 4 j + c)
#pragma unroll
    for (int j = 0; j < NC; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        cm[j][r] = __shfl_sync(0xffffffffu, cz[r], 4 * j + c);
        cs[j][r] = __shfl_sync(0xffffffffu, cz[2 + r], 4 * j + c);
      }
    }
#pragma unroll
    for (int t = 0; t < KS; ++t) {
      const int j = t / 4, ch = 64 * j + 8 * g + value_lane_channel(t % 4);
      const float inv = t % 2 ? 1.0f / HIV : 1.0f;
      ow[(2 * c) * D + ch] = (o[t][0] + cm[j][0]) * inv + cs[j][0];
      ow[(2 * c + 1) * D + ch] = (o[t][1] + cm[j][1]) * inv + cs[j][1];
      ow[(2 * c) * D + ch + 2] = (o[t][2] + cm[j][0]) * inv + cs[j][0];
      ow[(2 * c + 1) * D + ch + 2] = (o[t][3] + cm[j][1]) * inv + cs[j][1];
    }
  } else {
    const float z0 = kI8 ? 1152.0f * cz[0] : 0.0f, z1 = kI8 ? 1152.0f * cz[1] : 0.0f;  // int8 values' bias
#pragma unroll
    for (int t = 0; t < KS; ++t) {
      const int ch = g * LV + 2 * t;
      *reinterpret_cast<float2*>(ow + (2 * c) * D + ch) = make_float2(o[t][0] - z0, o[t][2] - z0);
      *reinterpret_cast<float2*>(ow + (2 * c + 1) * D + ch) = make_float2(o[t][1] - z1, o[t][3] - z1);
    }
  }
  if (g == 0) {
    float* mlw = sml + warp * kRows * 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mlw[2 * (2 * c + r)] = m[r] == -INFINITY ? -INFINITY : m[r] / kLog2e;
      mlw[2 * (2 * c + r) + 1] = l[r];
    }
  }
  __syncthreads();
  store_split_partial<kWarps, kRows>(p, so, sml, s, h, split, 0, D);
#ifdef PAGEDKV_CTA_TIMES
  __syncthreads();
  if (lane == 0) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    printf("CTA %d %d %d %d %u %llu %llu %llu %llu %llu %d\n", split, h, s, warp, sm, (unsigned long long)t_launch,
           (unsigned long long)t_start, (unsigned long long)t_loop, (unsigned long long)t_loop_end,
           (unsigned long long)global_ns(), lim - w0);
  }
#endif
}

template <int D, Format F, typename T, Feed FD>
cudaError_t launch(const KParams& k, dim3 grid, cudaStream_t stream) {
  const size_t smem = Stage<D, F>::kSmem;
  PKV_CUDA_TRY((allow_smem<attention_decode_kernel<D, F, T, FD>>(smem)));
  return launch_programmatic(attention_decode_kernel<D, F, T, FD>, grid, dim3(kThreads), smem, stream, k);
}

template <int D, typename T>
cudaError_t launch_format(const KParams& k, dim3 grid, cudaStream_t stream) {
  switch (k.k.L.format) {
    case Format::kBF16:
      if constexpr (D <= 128 && std::is_same_v<T, __nv_bfloat16>) return launch<D, Format::kBF16, T, Feed::kPass>(k, grid, stream);
      return cudaErrorInvalidValue;
    case Format::kFP16:
      if constexpr (D <= 128 && std::is_same_v<T, __half>) return launch<D, Format::kFP16, T, Feed::kPass>(k, grid, stream);
      return cudaErrorInvalidValue;
    case Format::kFP8E4M3: return launch<D, Format::kFP8E4M3, T, Feed::kTokenScale>(k, grid, stream);
    case Format::kInt8: return launch<D, Format::kInt8, T, Feed::kTokenScale>(k, grid, stream);
    case Format::kInt4: return launch<D, Format::kInt4, T, Feed::kFold>(k, grid, stream);
    case Format::kInt2: return launch<D, Format::kInt2, T, Feed::kFold>(k, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

struct Formats {
  template <int D, typename T>
  static cudaError_t run(const KParams& k, dim3 grid, cudaStream_t stream) { return launch_format<D, T>(k, grid, stream); }
};

}  // namespace

bool attention_decode_supported(const AttentionParams& p) {
  if (!attention_mma_supported(p) || p.rows() > kRows || p.k.layout.block_size < 16) return false;
  // SplitCols packs (chunk, block in chunk) into 32 bits; keys and values share the block numbering.
  if (p.k.blocks_per_chunk != p.v.blocks_per_chunk || p.k.blocks_per_chunk >= (1 << kColShift) ||
      std::max(p.k.num_chunks, p.v.num_chunks) > (1 << (32 - kColShift)))
    return false;
  const Format f = p.k.layout.format;
  const bool pass = ((f == Format::kBF16 && p.dtype == DType::kBF16) || (f == Format::kFP16 && p.dtype == DType::kF16)) &&
                    p.head_dim() <= 128;
  const bool grouped = (f == Format::kInt4 || f == Format::kInt2) && p.k.layout.group >= 16 && p.v.layout.group >= 64;
  return pass || f == Format::kInt8 || f == Format::kFP8E4M3 || grouped;
}

template <int D>
int blocks_per_sm(Format f) {
  switch (f) {
    case Format::kBF16:
      if constexpr (D <= 128) return Stage<D, Format::kBF16>::kBlocks;
      return 1;  // 16-bit pages take this kernel up to head_dim 128
    case Format::kFP16:
      if constexpr (D <= 128) return Stage<D, Format::kFP16>::kBlocks;
      return 1;
    case Format::kFP8E4M3: return Stage<D, Format::kFP8E4M3>::kBlocks;
    case Format::kInt8: return Stage<D, Format::kInt8>::kBlocks;
    case Format::kInt4: return Stage<D, Format::kInt4>::kBlocks;
    case Format::kInt2: return Stage<D, Format::kInt2>::kBlocks;
    default: return 1;
  }
}

int attention_decode_blocks_per_sm(const AttentionParams& p) {
  const int64_t D = p.head_dim();
  return D == 64 ? blocks_per_sm<64>(p.k.layout.format) : D == 128 ? blocks_per_sm<128>(p.k.layout.format) : blocks_per_sm<256>(p.k.layout.format);
}

cudaError_t attention_decode_launch(const KParams& k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(k.num_splits), static_cast<unsigned>(k.H), static_cast<unsigned>(k.B));
  return launch_dim_dtype<Formats>(k, grid, stream);
}

}  // namespace pagedkv
