// Device and launch helpers of programmatic dependent launch (see pdl.h).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "kernels/pdl.h"

namespace dejavu {
namespace pdl {

// Lets the next kernel on the stream be scheduled (once every block of this one has called it or
// exited). Call at the start of a kernel.
__device__ __forceinline__ void release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the previous kernel on the stream has finished and its writes are visible. A
// no-op when this kernel was not launched with PDL.
__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A fact about `kernel` on the current device (its occupancy for `key` bytes of shared memory,
// say), computed once per (device, kernel, key) by `compute(device, kernel, key)` and kept;
// `fallback` where the current device cannot be read. Key 0 of every kernel is enabled_for's; each
// other fact of a kernel needs a key of its own.
int64_t kernel_fact(const void* kernel, size_t key, int64_t (*compute)(int, const void*, size_t), int64_t fallback);

// Whether `kernel` is launched with PDL on the current device: the setting is on and the code
// the device runs was compiled for compute capability 9.0 or later (so it has the waits).
bool enabled_for(const void* kernel);

// Launches `kernel` with `smem` bytes of dynamic shared memory, with PDL where enabled_for says.
template <typename... P, typename... A>
cudaError_t launch_smem(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = enabled_for(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
  return launch_smem(kernel, grid, block, 0, stream, std::forward<A>(args)...);
}

}  // namespace pdl
}  // namespace dejavu
