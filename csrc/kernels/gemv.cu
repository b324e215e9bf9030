// small_linear: one warp per output feature reads its weight row in coalesced 16-byte chunks
// (four in flight per lane, streamed past L1) and dots it with each input row (through the
// read-only cache: every warp of the grid reads the same few rows); a warp shuffle reduces.
// Launched with programmatic dependent launch (pdl.h), each warp loads the first kPre chunks per
// lane of its row (all of a 2048-wide row) before it waits for the kernel that writes its input.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/gemv.h"
#include "kernels/element.cuh"
#include "kernels/pdl.cuh"

namespace dejavu {
namespace {

constexpr int kWarps = 8;  // output features per thread block
constexpr int kVec = 8;    // elements per 16-byte chunk
constexpr int kPre = 8;    // chunks per lane loaded before the wait for the input

using elem::from_f;
using elem::to_f;

template <typename T, int M>
__device__ __forceinline__ void dot_chunk(float (&acc)[M], const uint4& wv, const T* __restrict__ x,
                                          int64_t x_stride, int64_t c) {
  const T* wt = reinterpret_cast<const T*>(&wv);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * x_stride) + c);
    const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[m] = fmaf(to_f(wt[j]), to_f(xt[j]), acc[m]);
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
    small_linear_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                        const T* __restrict__ bias, int64_t n_out, int64_t k_in, int64_t x_stride, int act) {
  pdl::release();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;
  const uint4* row = reinterpret_cast<const uint4*>(w + n * k_in);
  const int64_t chunks = k_in / kVec;
  uint4 pre[kPre];  // weights only: no kernel of the step writes them
#pragma unroll
  for (int i = 0; i < kPre; ++i)
    if (lane + 32 * i < chunks) pre[i] = __ldcs(row + lane + 32 * i);
  pdl::wait();  // the input (and y) belong to the kernels before this one
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll
  for (int i = 0; i < kPre; ++i)
    if (lane + 32 * i < chunks) dot_chunk<T, M>(acc, pre[i], x, x_stride, lane + 32 * i);
  int64_t c = lane + 32 * kPre;
  for (; c + 96 < chunks; c += 128) {  // four loads in flight before any arithmetic
    const uint4 w0 = __ldcs(row + c), w1 = __ldcs(row + c + 32), w2 = __ldcs(row + c + 64),
                w3 = __ldcs(row + c + 96);
    dot_chunk<T, M>(acc, w0, x, x_stride, c);
    dot_chunk<T, M>(acc, w1, x, x_stride, c + 32);
    dot_chunk<T, M>(acc, w2, x, x_stride, c + 64);
    dot_chunk<T, M>(acc, w3, x, x_stride, c + 96);
  }
  for (; c < chunks; c += 32) dot_chunk<T, M>(acc, __ldcs(row + c), x, x_stride, c);
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = elem::warp_sum(acc[m]);
  if (lane == 0) {
    const float b = bias != nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[m] + b;
      if (act == 1) v = fmaxf(v, 0.f);
      y[m * n_out + n] = from_f<T>(v);
    }
  }
}

template <typename T>
cudaError_t launch(void* y, const void* x, const void* w, const void* bias, int64_t rows, int64_t n_out,
                   int64_t k_in, int64_t x_stride, int act, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((n_out + kWarps - 1) / kWarps)), block(kWarps * 32);
  auto Y = static_cast<T*>(y);
  auto X = static_cast<const T*>(x);
  auto W = static_cast<const T*>(w);
  auto B = static_cast<const T*>(bias);
  switch (rows) {
    case 1: return pdl::launch(small_linear_kernel<T, 1>, grid, block, s, Y, X, W, B, n_out, k_in, x_stride, act);
    case 2: return pdl::launch(small_linear_kernel<T, 2>, grid, block, s, Y, X, W, B, n_out, k_in, x_stride, act);
    case 3: return pdl::launch(small_linear_kernel<T, 3>, grid, block, s, Y, X, W, B, n_out, k_in, x_stride, act);
    case 4: return pdl::launch(small_linear_kernel<T, 4>, grid, block, s, Y, X, W, B, n_out, k_in, x_stride, act);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

std::string small_linear(void* y, const void* x, const void* w, const void* bias, int64_t rows,
                         int64_t out_features, int64_t in_features, int64_t x_stride, int act, DType dtype,
                         void* stream) {
  if (rows < 1 || rows > kSmallLinearMaxRows) return "small_linear: rows must be 1.." + std::to_string(kSmallLinearMaxRows);
  if (in_features % kVec || x_stride % kVec || out_features < 1)
    return "small_linear: in_features and x_stride must be multiples of 8";
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) % 16)
    return "small_linear: x and w must be 16-byte aligned";
  if (act != 0 && act != 1) return "small_linear: act must be 0 (none) or 1 (relu)";
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  if (dtype == DType::kFloat16)
    e = launch<__half>(y, x, w, bias, rows, out_features, in_features, x_stride, act, s);
  else if (dtype == DType::kBFloat16)
    e = launch<__nv_bfloat16>(y, x, w, bias, rows, out_features, in_features, x_stride, act, s);
  else
    return "small_linear: fp16 or bf16 only";
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dejavu
