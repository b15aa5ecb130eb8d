// CUDA launchers for append / gather / copy_blocks. Torch-free: (Params, cudaStream_t) -> cudaError_t.
// The params are the CPU kernels' structs; PagedView::chunks must point to DEVICE memory holding the
// chunk base pointers, and every other pointer is a device pointer. Validation (slot and block-id
// ranges) is done on the host by the torch layer before launching, exactly as on CPU.
#pragma once

#include <cuda_runtime.h>

#include "cpu/kv_cpu.h"

namespace pagedkv {

cudaError_t append_cuda(const AppendParams& p, cudaStream_t stream);
cudaError_t gather_cuda(const GatherParams& p, cudaStream_t stream);
cudaError_t copy_blocks_cuda(const PagedView& pages, const int64_t* pairs, int64_t num_pairs, cudaStream_t stream);

}  // namespace pagedkv
