// The row body of add_norm (norm.h) as a device function, shared by the add_norm kernel and the
// linear kernel's norm prologue (gemv.h: NormPrologue), so both round every element alike.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/element.cuh"
#include "kernels/norm.h"

namespace dejavu {
namespace norm {

constexpr int kThreads = 256;  // the block add_norm_row runs on
constexpr int kVec = 8;
constexpr int kMaxChunks = kAddNormMaxHidden / (kThreads * kVec);  // 8-element chunks per thread

// Sum of v over the block (kThreads threads); `shared` holds kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  v = elem::warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return elem::warp_sum(lane < kThreads / 32 ? shared[lane] : 0.f);
}

// One row, by the whole block: sum = h + a rounded to T (stored to sum_out unless null), then
// y = LayerNorm(sum) * weight + bias (rms 0; bias may be null) or RMSNorm (rms 1) with fp32
// statistics. Each thread keeps its chunks of the sum in registers between the reductions, or,
// STAGED, in y itself (then normalised in place: the same values in the same order, so the same
// bits, with no registers held across the reductions; for y in shared memory). y may point to
// shared memory. hidden: a multiple of 8 up to kAddNormMaxHidden; 16-byte aligned rows. CG: h and
// a are read through L2 only (ld.global.cg), for rows other blocks of the same kernel wrote.
template <typename T, bool STAGED = false, bool CG = false>
__device__ __forceinline__ void add_norm_row(T* sum_out, T* y, const T* __restrict__ h, const T* __restrict__ a,
                                             const T* __restrict__ weight, const T* __restrict__ bias,
                                             int64_t hidden, float eps, int rms, float* shared) {
  using elem::from_f;
  using elem::to_f;
  const int64_t chunks = hidden / kVec;
  float v[STAGED ? 1 : kMaxChunks][kVec];
  // Chunk i of this thread's sum, as floats, into v[i] (STAGED: v[0], read back from y).
  auto held = [&](int i, int64_t c) -> float* {
    if constexpr (!STAGED) {
      return v[i];
    } else {
      const uint4 sv = *reinterpret_cast<const uint4*>(y + c * kVec);
      const T* st = reinterpret_cast<const T*>(&sv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[0][j] = to_f(st[j]);
      return v[0];
    }
  };
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < chunks) {
      uint4 hv, av;
      if constexpr (CG) {
        hv = __ldcg(reinterpret_cast<const uint4*>(h + c * kVec));
        av = __ldcg(reinterpret_cast<const uint4*>(a + c * kVec));
      } else {
        hv = *reinterpret_cast<const uint4*>(h + c * kVec);
        av = *reinterpret_cast<const uint4*>(a + c * kVec);
      }
      const T* ht = reinterpret_cast<const T*>(&hv);
      const T* at = reinterpret_cast<const T*>(&av);
      uint4 sv;
      T* st = reinterpret_cast<T*>(&sv);
      float* vi = v[STAGED ? 0 : i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        st[j] = from_f<T>(to_f(ht[j]) + to_f(at[j]));  // the sum as torch stores it, then normalised
        vi[j] = to_f(st[j]);
        sum += vi[j];
      }
      if (sum_out != nullptr) *reinterpret_cast<uint4*>(sum_out + c * kVec) = sv;
      if (STAGED) *reinterpret_cast<uint4*>(y + c * kVec) = sv;
    }
  }
  const float inv_n = 1.f / static_cast<float>(hidden);
  const float mean = rms ? 0.f : block_sum(sum, shared) * inv_n;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < chunks) {
      const float* vi = held(i, c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sq += (vi[j] - mean) * (vi[j] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(sq, shared) * inv_n + eps);
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (c < chunks) {
      const float* vi = held(i, c);
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
          yt[j] = from_f<T>(to_f(from_f<T>(vi[j] * rstd)) * to_f(wt[j]));
        } else {
          const float b = bias != nullptr ? to_f(bt[j]) : 0.f;
          yt[j] = from_f<T>((vi[j] - mean) * rstd * to_f(wt[j]) + b);
        }
      }
      *reinterpret_cast<uint4*>(y + c * kVec) = yv;
    }
  }
}

}  // namespace norm
}  // namespace dejavu
