#include <cuda_runtime.h>

#include <algorithm>

#include "kvstream/cuda_copy.h"

namespace dejavu {

namespace {

// One thread block per span (grid-stride over spans); 16-byte accesses when everything is aligned.
__global__ void copy_spans_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                  const int64_t* __restrict__ desc, int64_t n) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t so = desc[3 * i], dof = desc[3 * i + 1], nb = desc[3 * i + 2];
    const uint8_t* s = src + so;
    uint8_t* d = dst + dof;
    const bool aligned = ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | nb) & 15) == 0;
    if (aligned) {
      const uint4* s4 = reinterpret_cast<const uint4*>(s);
      uint4* d4 = reinterpret_cast<uint4*>(d);
      const int64_t n4 = nb / 16;
      for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) d4[j] = s4[j];
    } else {
      for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) d[j] = s[j];
    }
  }
}

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string cuda_copy_spans(const void* src, void* dst, const int64_t* desc, int64_t n, void* stream) {
  if (n <= 0) return "";
  const int blocks = static_cast<int>(std::min<int64_t>(n, 65535));
  copy_spans_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), desc, n);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("copy_spans launch failed: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace dejavu
