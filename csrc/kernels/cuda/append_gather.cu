// CUDA append (quantize + scatter), gather (dequantize) and copy_blocks. One warp per (token, head)
// for per-token formats with one scale, else one thread per (token, head) or (key group, head), built on the scalar reference codec in
// pagedkv/page_codec.h, so results are bit-identical to the CPU kernels (compiled with
// --fmad=false). Fused paged attention, which reads pages without gathering, is separate work.
#include "cuda/kv_cuda.h"

namespace pagedkv {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kThreads = 128;

__device__ __forceinline__ float load_elem(const void* src, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(src)[i];
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
    default: return fp16_to_float(static_cast<const uint16_t*>(src)[i]);
  }
}

__device__ __forceinline__ void store_elem(void* out, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kF32: static_cast<float*>(out)[i] = v; return;
    case DType::kBF16: static_cast<uint16_t*>(out)[i] = bf16_from_float(v); return;
    default: static_cast<uint16_t*>(out)[i] = fp16_from_float(v); return;
  }
}

__global__ void append_token_kernel(AppendParams p) {
  const PageLayout& L = p.dst.layout;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= p.num_tokens * L.num_kv_heads) return;
  const int64_t t = w / L.num_kv_heads, h = w % L.num_kv_heads;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  float x[kMaxHeadDim];
  for (int d = 0; d < L.head_dim; ++d) x[d] = load_elem(p.src, p.src_dtype, t * p.token_stride + h * p.head_stride + d);
  encode_token(L, p.dst.head_ptr(slot / L.block_size, h), slot % L.block_size, x);
}

// Per-token formats with at most one scale per token (fp32 / bf16 / fp16 / int8 / fp8): one warp per
// (token, head), lanes striding over head_dim. The absmax is a warp max (exact, order-free) and every
// code comes from the same scalar functions as encode_token, so the bytes equal the reference's; the
// thread-per-token kernel ran a head_dim-long serial loop per thread (19 us per decode call at batch
// 16 x 8 heads on the H100).
__global__ void append_token_warp_kernel(AppendParams p) {
  const PageLayout& L = p.dst.layout;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= p.num_tokens * L.num_kv_heads) return;
  const int64_t t = w / L.num_kv_heads, h = w % L.num_kv_heads;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t o = slot % L.block_size;
  uint8_t* head = p.dst.head_ptr(slot / L.block_size, h);
  uint8_t* row = codec::code_row(L, head, o);
  const int64_t base = t * p.token_stride + h * p.head_stride;
  float x[kMaxHeadDim / 32];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxHeadDim / 32; ++i) {  // unrolled: x stays in registers
    const int d = lane + 32 * i;
    x[i] = d < L.head_dim ? load_elem(p.src, p.src_dtype, base + d) : 0.0f;
    amax = fmaxf(amax, fabsf(x[i]));
  }
  for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  const float scale = L.format == Format::kInt8 ? int8_scale(amax) : fp8_scale(amax);
  if ((L.format == Format::kInt8 || L.format == Format::kFP8E4M3) && lane == 0) {
    memcpy(head + L.code_bytes + 4 * o, &scale, 4);
  }
#pragma unroll
  for (int i = 0; i < kMaxHeadDim / 32; ++i) {
    const int d = lane + 32 * i;
    if (d >= L.head_dim) break;
    switch (L.format) {
      case Format::kFP32: memcpy(row + 4 * d, &x[i], 4); break;
      case Format::kBF16: {
        const uint16_t b = bf16_from_float(x[i]);
        memcpy(row + 2 * d, &b, 2);
        break;
      }
      case Format::kFP16: {
        const uint16_t b = fp16_from_float(x[i]);
        memcpy(row + 2 * d, &b, 2);
        break;
      }
      case Format::kInt8: row[d] = static_cast<uint8_t>(int8_code(x[i], scale)); break;
      default: row[d] = fp8_code(x[i], scale); break;
    }
  }
}

// Grouped keys: one thread per (group, head) stages the group in global scratch-free form by
// reading the source with a token stride (the codec takes a strided source).
__global__ void append_key_group_kernel(AppendParams p, float* scratch) {
  const PageLayout& L = p.dst.layout;
  const int64_t groups = p.num_tokens / L.group;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= groups * L.num_kv_heads) return;
  const int64_t t0 = (w / L.num_kv_heads) * L.group, h = w % L.num_kv_heads;
  const int64_t slot = p.slot_mapping[t0];
  if (slot < 0) return;
  float* x = scratch + w * static_cast<int64_t>(L.group) * L.head_dim;
  for (int t = 0; t < L.group; ++t)
    for (int d = 0; d < L.head_dim; ++d)
      x[t * L.head_dim + d] = load_elem(p.src, p.src_dtype, (t0 + t) * p.token_stride + h * p.head_stride + d);
  encode_key_group(L, p.dst.head_ptr(slot / L.block_size, h), slot % L.block_size, x, L.head_dim);
}

// One thread per (seq, head, position).
__global__ void gather_kernel(GatherParams p) {
  const PageLayout& L = p.src.layout;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= p.num_seqs * L.num_kv_heads * p.out_len) return;
  const int64_t t = w % p.out_len;
  const int64_t h = (w / p.out_len) % L.num_kv_heads;
  const int64_t s = w / (p.out_len * L.num_kv_heads);
  const int64_t base = w * L.head_dim;
  if (t >= p.seq_lens[s]) {
    for (int d = 0; d < L.head_dim; ++d) store_elem(p.out, p.out_dtype, base + d, 0.0f);
    return;
  }
  const int64_t pos = t + (p.skip ? p.skip[s] : 0);
  const int32_t block = p.block_table[s * p.max_blocks_per_seq + pos / L.block_size];
  float row[kMaxHeadDim];
  decode_token(L, p.src.head_ptr(block, h), pos % L.block_size, row);
  for (int d = 0; d < L.head_dim; ++d) store_elem(p.out, p.out_dtype, base + d, row[d]);
}

__global__ void copy_blocks_kernel(PagedView v, const int64_t* pairs, int64_t num_pairs) {
  const int64_t i = blockIdx.x;
  if (i >= num_pairs) return;
  const uint8_t* src = v.head_ptr(pairs[2 * i], 0);
  uint8_t* dst = v.head_ptr(pairs[2 * i + 1], 0);
  for (int64_t b = threadIdx.x; b < v.layout.block_bytes; b += blockDim.x) dst[b] = src[b];
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

}  // namespace

cudaError_t append_cuda(const AppendParams& p, cudaStream_t stream) {
  const PageLayout& L = p.dst.layout;
  if (L.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  if (is_grouped(L.format) && L.role == Role::kKey) {
    const int64_t work = p.num_tokens / L.group * L.num_kv_heads;
    if (work == 0) return cudaSuccess;
    float* scratch = nullptr;
    PKV_CUDA_TRY(cudaMallocAsync(&scratch, sizeof(float) * work * L.group * L.head_dim, stream));
    append_key_group_kernel<<<blocks_for(work), kThreads, 0, stream>>>(p, scratch);
    PKV_CUDA_TRY(cudaGetLastError());
    return cudaFreeAsync(scratch, stream);
  }
  const int64_t work = p.num_tokens * L.num_kv_heads;
  if (work == 0) return cudaSuccess;
  const Format f = L.format;
  if (f == Format::kFP32 || f == Format::kBF16 || f == Format::kFP16 || f == Format::kInt8 || f == Format::kFP8E4M3) {
    append_token_warp_kernel<<<blocks_for(work * 32), kThreads, 0, stream>>>(p);
  } else {
    append_token_kernel<<<blocks_for(work), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t gather_cuda(const GatherParams& p, cudaStream_t stream) {
  if (p.src.layout.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const int64_t work = p.num_seqs * p.src.layout.num_kv_heads * p.out_len;
  if (work == 0) return cudaSuccess;
  gather_kernel<<<blocks_for(work), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t copy_blocks_cuda(const PagedView& pages, const int64_t* pairs, int64_t num_pairs, cudaStream_t stream) {
  if (num_pairs == 0) return cudaSuccess;
  copy_blocks_kernel<<<num_pairs, 256, 0, stream>>>(pages, pairs, num_pairs);
  return cudaGetLastError();
}

}  // namespace pagedkv
