// CUDA fused paged attention launcher. Torch-free: (AttentionParams, stream) -> cudaError_t.
// Params as on CPU (attention_cpu.h), except: every data pointer is a device pointer; the chunk
// pointer arrays of p.k / p.v are HOST arrays (copied into the kernel parameters, at most
// kMaxAttentionChunks each); `query` is the query as contiguous [B, Hq, Lq, D] in p.dtype; out,
// partial_acc and partial_ml are device buffers sized by attention_cuda_plan.
#pragma once

#include <cuda_runtime.h>

#include "cpu/attention_cpu.h"

namespace pagedkv {

constexpr int kMaxAttentionChunks = 1024;  // chunk pointers travel in the kernel parameters

// Fills split_tokens / num_splits for an upper bound of entries per sequence (forced_splits > 0:
// that many, within the kernel's shared-memory cap on split length).
void attention_cuda_plan(AttentionParams& p, int64_t max_entries, int num_sms, int64_t forced_splits);

cudaError_t paged_attention_cuda(const AttentionParams& p, const void* query, cudaStream_t stream);

}  // namespace pagedkv
