// add_norm: one thread block per row (norm.cuh: add_norm_row), so every row is read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/norm.cuh"
#include "kernels/pdl.cuh"

namespace dejavu {
namespace {

template <typename T>
__global__ void __launch_bounds__(norm::kThreads)
    add_norm_kernel(T* __restrict__ sum_out, T* __restrict__ y, const T* __restrict__ h, const T* __restrict__ a,
                    const T* __restrict__ weight, const T* __restrict__ bias, int64_t hidden, float eps, int rms) {
  __shared__ float shared[norm::kThreads / 32];
  pdl::release();
  pdl::wait();  // h and a come from the kernels before this one
  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
  norm::add_norm_row(sum_out + base, y + base, h + base, a + base, weight, bias, hidden, eps, rms, shared);
}

}  // namespace

std::string add_norm(void* sum_out, void* y, const void* h, const void* a, const void* weight, const void* bias,
                     int64_t rows, int64_t hidden, float eps, int rms, DType dtype, void* stream) {
  if (rows < 1) return "";
  if (hidden % norm::kVec || hidden < norm::kVec || hidden > kAddNormMaxHidden)
    return "add_norm: hidden must be a multiple of 8 up to " + std::to_string(kAddNormMaxHidden);
  const uintptr_t any = reinterpret_cast<uintptr_t>(sum_out) | reinterpret_cast<uintptr_t>(y) |
                        reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(a) |
                        reinterpret_cast<uintptr_t>(weight) | reinterpret_cast<uintptr_t>(bias);
  if (any % 16) return "add_norm: every pointer must be 16-byte aligned";
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(rows)), block(norm::kThreads);
  cudaError_t e;
  if (dtype == DType::kFloat16)
    e = pdl::launch(add_norm_kernel<__half>, grid, block, s, static_cast<__half*>(sum_out), static_cast<__half*>(y),
                    static_cast<const __half*>(h), static_cast<const __half*>(a),
                    static_cast<const __half*>(weight), static_cast<const __half*>(bias), hidden, eps, rms);
  else if (dtype == DType::kBFloat16)
    e = pdl::launch(add_norm_kernel<__nv_bfloat16>, grid, block, s, static_cast<__nv_bfloat16*>(sum_out),
                    static_cast<__nv_bfloat16*>(y), static_cast<const __nv_bfloat16*>(h),
                    static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(weight),
                    static_cast<const __nv_bfloat16*>(bias), hidden, eps, rms);
  else
    return "add_norm: fp16 or bf16 only";
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dejavu
