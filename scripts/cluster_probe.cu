// How many thread-block clusters of 1..8 blocks the device keeps resident at once, for a 128-thread
// kernel held to 3 blocks per SM (the decode kernel's bound at head_dim 128) with a given dynamic
// shared memory per block (the occupancy API's answer, cudaOccupancyMaxActiveClusters).
// Build and run on the device: nvcc -arch=sm_90 -o /tmp/cluster_probe scripts/cluster_probe.cu &&
// /tmp/cluster_probe 72576 (the int4 decode kernel's dynamic shared memory at head_dim 128).
#include <cstdio>
#include <cstdlib>

__global__ void __launch_bounds__(128, 3) probe_kernel(float* x) {
  extern __shared__ float s[];
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  x[threadIdx.x] = s[127 - threadIdx.x];
}

int main(int argc, char** argv) {
  const int smem = argc > 1 ? atoi(argv[1]) : 72576;
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, probe_kernel, 128, smem);
  printf("dynamic shared memory %d bytes: %d blocks per SM\n", smem, per_sm);
  for (int c = 1; c <= 8; ++c) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(c, 8, 8);
    cfg.blockDim = dim3(128);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute a;
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = c;
    a.val.clusterDim.y = a.val.clusterDim.z = 1;
    cfg.attrs = &a;
    cfg.numAttrs = 1;
    int n = -1;
    const cudaError_t e = cudaOccupancyMaxActiveClusters(&n, probe_kernel, &cfg);
    printf("clusters of %d: %d resident (%d blocks) %s\n", c, n, n * c, cudaGetErrorString(e));
  }
  return 0;
}
