// add_norm: one thread block per row; each thread keeps its 8-element chunks of the sum in
// registers between the two reductions (mean, then variance), so every row is read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/norm.h"
#include "kernels/element.cuh"
#include "kernels/pdl.cuh"

namespace dejavu {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;
constexpr int kMaxChunks = kAddNormMaxHidden / (kThreads * kVec);  // per thread

using elem::from_f;
using elem::to_f;

__device__ float block_sum(float v, float* shared) {
  v = elem::warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return elem::warp_sum(lane < kThreads / 32 ? shared[lane] : 0.f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_norm_kernel(T* __restrict__ sum_out, T* __restrict__ y, const T* __restrict__ h, const T* __restrict__ a,
                    const T* __restrict__ weight, const T* __restrict__ bias, int64_t hidden, float eps, int rms) {
  __shared__ float shared[kThreads / 32];
  pdl::release();
  pdl::wait();  // h and a come from the kernels before this one
  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
  const int64_t chunks = hidden / kVec;
  float v[kMaxChunks][kVec];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < chunks) {
      const uint4 hv = *reinterpret_cast<const uint4*>(h + base + c * kVec);
      const uint4 av = *reinterpret_cast<const uint4*>(a + base + c * kVec);
      const T* ht = reinterpret_cast<const T*>(&hv);
      const T* at = reinterpret_cast<const T*>(&av);
      uint4 sv;
      T* st = reinterpret_cast<T*>(&sv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        st[j] = from_f<T>(to_f(ht[j]) + to_f(at[j]));  // the sum as torch stores it, then normalised
        v[i][j] = to_f(st[j]);
        sum += v[i][j];
      }
      *reinterpret_cast<uint4*>(sum_out + base + c * kVec) = sv;
    }
  }
  const float inv_n = 1.f / static_cast<float>(hidden);
  const float mean = rms ? 0.f : block_sum(sum, shared) * inv_n;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    if (threadIdx.x + static_cast<int64_t>(i) * kThreads < chunks) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) sq += (v[i][j] - mean) * (v[i][j] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(sq, shared) * inv_n + eps);
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < chunks) {
      const uint4 wv = *reinterpret_cast<const uint4*>(weight + c * kVec);
      const T* wt = reinterpret_cast<const T*>(&wv);
      uint4 bv = make_uint4(0, 0, 0, 0);
      if (bias != nullptr) bv = *reinterpret_cast<const uint4*>(bias + c * kVec);
      const T* bt = reinterpret_cast<const T*>(&bv);
      uint4 yv;
      T* yt = reinterpret_cast<T*>(&yv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (rms) {
          yt[j] = from_f<T>(to_f(from_f<T>(v[i][j] * rstd)) * to_f(wt[j]));
        } else {
          const float b = bias != nullptr ? to_f(bt[j]) : 0.f;
          yt[j] = from_f<T>((v[i][j] - mean) * rstd * to_f(wt[j]) + b);
        }
      }
      *reinterpret_cast<uint4*>(y + base + c * kVec) = yv;
    }
  }
}

}  // namespace

std::string add_norm(void* sum_out, void* y, const void* h, const void* a, const void* weight, const void* bias,
                     int64_t rows, int64_t hidden, float eps, int rms, DType dtype, void* stream) {
  if (rows < 1) return "";
  if (hidden % kVec || hidden < kVec || hidden > kAddNormMaxHidden)
    return "add_norm: hidden must be a multiple of 8 up to " + std::to_string(kAddNormMaxHidden);
  const uintptr_t any = reinterpret_cast<uintptr_t>(sum_out) | reinterpret_cast<uintptr_t>(y) |
                        reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(a) |
                        reinterpret_cast<uintptr_t>(weight) | reinterpret_cast<uintptr_t>(bias);
  if (any % 16) return "add_norm: every pointer must be 16-byte aligned";
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
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
