// small_linear: one warp per output feature reads its weight row in coalesced 16-byte chunks
// (four in flight per lane, streamed past L1) and dots it with each input row (through the
// read-only cache: every warp of the grid reads the same few rows); a warp shuffle reduces.
// Launched with programmatic dependent launch (pdl.h), each warp loads the first kPre chunks per
// lane of its row (all of a 2048-wide row) before it waits for the kernel that writes its input.
// Long rows are split over KS warps of the block (split-K: 2 from 4096 inputs, 4 from 8192), each
// taking a contiguous slice, so an 8192-wide row is loaded whole before the wait as well and four
// times as many warps keep loads in flight; the slices' sums meet in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

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

template <typename T, int M, int KS>
__global__ void __launch_bounds__(kWarps * 32)
    small_linear_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                        const T* __restrict__ bias, int64_t n_out, int64_t k_in, int64_t x_stride, int act) {
  static_assert(kWarps % KS == 0, "the block's warps split evenly over its rows");
  __shared__ float part_s[KS > 1 ? kWarps : 1][M];
  pdl::release();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slice = warp % KS;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kWarps / KS) + warp / KS;
  if (KS == 1 && n >= n_out) return;  // (with slices every warp reaches the barrier below)
  const bool valid = n < n_out;
  const int64_t chunks = k_in / kVec / KS;  // this warp's slice of the row
  const uint4* row = reinterpret_cast<const uint4*>(w + n * k_in) + slice * chunks;
  x += slice * chunks * kVec;
  uint4 pre[kPre];  // weights only: no kernel of the step writes them
#pragma unroll
  for (int i = 0; i < kPre; ++i)
    if (valid && lane + 32 * i < chunks) pre[i] = __ldcs(row + lane + 32 * i);
  pdl::wait();  // the input (and y) belong to the kernels before this one
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll
  for (int i = 0; i < kPre; ++i)
    if (valid && lane + 32 * i < chunks) dot_chunk<T, M>(acc, pre[i], x, x_stride, lane + 32 * i);
  int64_t c = valid ? lane + 32 * kPre : chunks;
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
  if (KS > 1) {  // the row's slices meet in shared memory; its first warp adds them up
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) part_s[warp][m] = acc[m];
    __syncthreads();
    if (slice != 0 || !valid) return;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) v += part_s[warp + k][m];  // (warp is the row's first: slice 0)
      acc[m] = v;
    }
  }
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

// Slices per row: 4 from 8192 inputs, 2 from 4096, else 1 (the slice must be whole chunks).
// DEJAVU_LINEAR_SPLIT=1 (2, 4) caps it, a baseline for benchmarks. Read once.
int split_for(int64_t k_in) {
  static const int cap = [] {
    const char* v = std::getenv("DEJAVU_LINEAR_SPLIT");
    const int c = v == nullptr ? 4 : std::atoi(v);
    return c >= 4 ? 4 : c >= 2 ? 2 : 1;
  }();
  const int64_t chunks = k_in / kVec;
  if (cap >= 4 && chunks >= 4 * 256 && chunks % 4 == 0) return 4;
  if (cap >= 2 && chunks >= 2 * 256 && chunks % 2 == 0) return 2;
  return 1;
}

template <typename T, int KS>
cudaError_t launch_split(T* y, const T* x, const T* w, const T* bias, int64_t rows, int64_t n_out, int64_t k_in,
                         int64_t x_stride, int act, cudaStream_t s) {
  constexpr int per_block = kWarps / KS;
  const dim3 grid(static_cast<unsigned>((n_out + per_block - 1) / per_block)), block(kWarps * 32);
  switch (rows) {
    case 1: return pdl::launch(small_linear_kernel<T, 1, KS>, grid, block, s, y, x, w, bias, n_out, k_in, x_stride, act);
    case 2: return pdl::launch(small_linear_kernel<T, 2, KS>, grid, block, s, y, x, w, bias, n_out, k_in, x_stride, act);
    case 3: return pdl::launch(small_linear_kernel<T, 3, KS>, grid, block, s, y, x, w, bias, n_out, k_in, x_stride, act);
    case 4: return pdl::launch(small_linear_kernel<T, 4, KS>, grid, block, s, y, x, w, bias, n_out, k_in, x_stride, act);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch(void* y, const void* x, const void* w, const void* bias, int64_t rows, int64_t n_out,
                   int64_t k_in, int64_t x_stride, int act, cudaStream_t s) {
  auto Y = static_cast<T*>(y);
  auto X = static_cast<const T*>(x);
  auto W = static_cast<const T*>(w);
  auto B = static_cast<const T*>(bias);
  switch (split_for(k_in)) {
    case 4: return launch_split<T, 4>(Y, X, W, B, rows, n_out, k_in, x_stride, act, s);
    case 2: return launch_split<T, 2>(Y, X, W, B, rows, n_out, k_in, x_stride, act, s);
    default: return launch_split<T, 1>(Y, X, W, B, rows, n_out, k_in, x_stride, act, s);
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
