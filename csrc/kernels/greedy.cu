// greedy_step_end: one thread block per row. Each thread scans a strided share of the row (four
// independent loads in flight), keeping its best (value, index); a warp shuffle and then a
// shared-memory pass over the warps' bests give the row's. "Better" is: a NaN over a number, a
// larger number, and among equals the smaller index, so the result is torch.argmax's. Launched with
// programmatic dependent launch: the block starts while the LM head finishes and waits for it
// before reading the logits.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/greedy.h"
#include "kernels/pdl.cuh"

namespace dejavu {
namespace {

struct Best {
  float v;
  int64_t i;
};

__device__ __forceinline__ bool better(float v, int64_t i, const Best& b) {
  const bool vn = isnan(v), bn = isnan(b.v);
  if (vn != bn) return vn;
  if (!vn && v != b.v) return v > b.v;
  return i < b.i;
}

__device__ __forceinline__ void take(Best& b, float v, int64_t i) {
  if (better(v, i, b)) b = Best{v, i};
}

__global__ void __launch_bounds__(kGreedyThreads)
    greedy_step_end_kernel(const float* __restrict__ logits, int64_t vocab, int64_t stride, int64_t* tokens,
                           int64_t* host_tokens, int64_t* fields, int64_t bucket, int64_t max_blocks,
                           int64_t block_size) {
  pdl::release();
  const int64_t r = blockIdx.x;
  pdl::wait();  // the logits come from the kernel before
  const float* row = logits + r * stride;
  Best b{-INFINITY, vocab};  // (any value beats it through its smaller index, -inf included)
  int64_t i = threadIdx.x;
  for (; i + 3 * kGreedyThreads < vocab; i += 4 * kGreedyThreads) {
    const float v0 = row[i], v1 = row[i + kGreedyThreads], v2 = row[i + 2 * kGreedyThreads],
                v3 = row[i + 3 * kGreedyThreads];
    take(b, v0, i);
    take(b, v1, i + kGreedyThreads);
    take(b, v2, i + 2 * kGreedyThreads);
    take(b, v3, i + 3 * kGreedyThreads);
  }
  for (; i < vocab; i += kGreedyThreads) take(b, row[i], i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
    const int64_t j = __shfl_xor_sync(0xffffffffu, b.i, o);
    take(b, v, j);
  }
  __shared__ float vs[kGreedyThreads / 32];
  __shared__ int64_t is[kGreedyThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    vs[warp] = b.v;
    is[warp] = b.i;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kGreedyThreads / 32; ++w) take(b, vs[w], is[w]);
  const int64_t token = b.i;
  tokens[r] = token;
  if (host_tokens != nullptr) host_tokens[r] = token;
  if (fields == nullptr) return;
  int64_t* ids = fields;
  int64_t* pos = fields + bucket;
  int64_t* blk = fields + 2 * bucket;
  int64_t* off = fields + 3 * bucket;
  int64_t* ctx = fields + 4 * bucket;
  int64_t* ring = fields + 5 * bucket;
  const int64_t* tables = fields + kStepFields * bucket;
  if (blk[r] < 0) return;  // padding
  const int64_t p = pos[r] + 1, logical = p / block_size;
  ids[r] = token;
  pos[r] = p;
  ctx[r] = p + 1;
  off[r] = p % block_size;
  blk[r] = logical < max_blocks ? tables[r * max_blocks + logical] : -1;
  ring[r] = -1;
}

}  // namespace

std::string greedy_step_end(const float* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* tokens,
                            int64_t* host_tokens, int64_t* fields, int64_t bucket, int64_t max_blocks,
                            int64_t block_size, void* stream) {
  if (rows < 1 || vocab < 1 || stride < vocab) return "greedy_step_end: needs rows >= 1 and stride >= vocab >= 1";
  if (logits == nullptr || tokens == nullptr) return "greedy_step_end: logits and tokens must not be null";
  if (fields != nullptr && (rows > bucket || max_blocks < 1 || block_size < 1))
    return "greedy_step_end: with fields, rows <= bucket, max_blocks >= 1 and block_size >= 1";
  const cudaError_t e =
      pdl::launch(greedy_step_end_kernel, dim3(static_cast<unsigned>(rows)), dim3(kGreedyThreads),
                  static_cast<cudaStream_t>(stream), logits, vocab, stride, tokens, host_tokens, fields, bucket,
                  max_blocks, block_size);
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dejavu
