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

// Whether a planned call takes the decode kernel's balanced schedule, which wants p.decode_claims:
// attention_cuda_claims(p) int32 counters, zeroed before each call. The warps of all of a sequence's
// splits then share its steps at run time, so the slowest warp no longer sets the kernel's end;
// results may differ between calls in the last bits (the order of the sums). kAuto: balanced for
// splits of >= kBalancedMinSplit entries (below, zeroing the counters costs more than the balance
// gains); kStatic / kBalanced force it (calls that do not take the decode kernel are never balanced).
enum class Schedule { kAuto, kStatic, kBalanced };
constexpr int64_t kBalancedMinSplit = 1024;
bool attention_cuda_balanced(const AttentionParams& p, Schedule schedule);
int64_t attention_cuda_claims(const AttentionParams& p);

cudaError_t paged_attention_cuda(const AttentionParams& p, const void* query, cudaStream_t stream);

}  // namespace pagedkv
