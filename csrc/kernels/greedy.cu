// greedy_step_end: each row is split into slices of kGreedySliceLogits logits, one thread block
// each (kGreedySliceThreads threads, so each thread's loads of a slice are in flight at once). Each
// thread scans a strided share of its slice (four independent loads in flight), keeping its best
// (value, index); a warp shuffle and then a shared-memory pass over the warps' bests give the
// slice's, and the last slice block of a row to finish combines the slices' (see the kernel).
// "Better" is: a NaN over a number, a larger number, and among equals the smaller index, so the
// result is torch.argmax's. Launched with programmatic dependent launch: the block starts while
// the LM head finishes and waits for it before reading the logits.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/env.h"
#include "kernels/greedy.h"
#include "kernels/pdl.cuh"
#include "kvstream/ring_rows.h"

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

// The best of `b` and the other threads' of the block, in thread 0 (the others' results are
// unspecified). `vs`, `is`: shared memory for one entry per warp.
__device__ __forceinline__ Best block_best(Best b, float* vs, int64_t* is) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
    const int64_t j = __shfl_xor_sync(0xffffffffu, b.i, o);
    take(b, v, j);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    vs[warp] = b.v;
    is[warp] = b.i;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < warps; ++w) take(b, vs[w], is[w]);
  return b;
}

// Block (s, r) takes the s-th slice of `chunk` logits of row r. With one slice it is the row's
// result; with several, each block stores its best in `scratch` and counts itself in the row's
// counter after a fence, and the block that completes the count (it also finds every other
// slice's best stored) reduces them, sets the counter back to 0 for the next launch, and ends the
// row. counters: [rows]; parts (int32 words): values [rows, slices] (float bits), then indices
// [rows, slices].
__global__ void __launch_bounds__(kGreedyThreads)
    greedy_step_end_kernel(const float* __restrict__ logits, int64_t vocab, int64_t stride, int64_t chunk,
                           unsigned* counters, int32_t* parts, int64_t* tokens, int64_t* host_tokens, int64_t* fields, int64_t bucket,
                           int64_t max_blocks, int64_t block_size, int64_t ring_size) {
  pdl::release();
  const int64_t r = blockIdx.y, slice = blockIdx.x, slices = gridDim.x, rows = gridDim.y;
  const int64_t begin = slice * chunk, end = begin + chunk < vocab ? begin + chunk : vocab;
  const int64_t step = blockDim.x;
  pdl::wait();  // the logits come from the kernel before
  const float* row = logits + r * stride;
  Best b{-INFINITY, vocab};  // (any value beats it through its smaller index, -inf included)
  int64_t i = begin + threadIdx.x;
  for (; i + 3 * step < end; i += 4 * step) {
    const float v0 = row[i], v1 = row[i + step], v2 = row[i + 2 * step], v3 = row[i + 3 * step];
    take(b, v0, i);
    take(b, v1, i + step);
    take(b, v2, i + 2 * step);
    take(b, v3, i + 3 * step);
  }
  for (; i < end; i += step) take(b, row[i], i);
  __shared__ float vs[kGreedyThreads / 32];
  __shared__ int64_t is[kGreedyThreads / 32];
  __shared__ bool last;
  b = block_best(b, vs, is);
  if (slices > 1) {
    unsigned* counter = counters + r;
    float* part_v = reinterpret_cast<float*>(parts) + r * slices;
    int32_t* part_i = parts + rows * slices + r * slices;
    if (threadIdx.x == 0) {
      part_v[slice] = b.v;
      part_i[slice] = static_cast<int32_t>(b.i);
      __threadfence();  // the best is visible before the count says so
      last = atomicAdd(counter, 1u) == static_cast<unsigned>(slices - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // (the other slices' bests, stored before their counts)
    b = Best{-INFINITY, vocab};
    for (int64_t k = threadIdx.x; k < slices; k += step)
      take(b, __ldcg(part_v + k), __ldcg(part_i + k));
    __syncthreads();  // (vs and is are reused)
    b = block_best(b, vs, is);
    if (threadIdx.x == 0) *counter = 0u;
  }
  if (threadIdx.x != 0) return;
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
  const int64_t ring_row = ring[r];
  if (ring_size <= 0 || ring_row < 0) {
    ring[r] = -1;
    return;
  }
  // The next ring rows, as ReplicaSender::ring_stage reserves them (kvstream/ring_rows.h). The
  // live rows are the first n of the bucket, each with a ring row >= 0, and padding rows have -1;
  // other rows' blocks rewrite theirs meanwhile, but never across 0, so a binary search over the
  // signs finds n.
  int64_t lo = r + 1, hi = bucket;  // rows [0, lo) are live; n lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldcg(ring + mid) >= 0) lo = mid + 1;
    else hi = mid;
  }
  const int64_t n = lo;
  ring[r] = next_ring_row(ring_row - r, n, ring_size) + r;
}

}  // namespace

int64_t greedy_slices(int64_t vocab) {
  static const bool split = env::integer("DEJAVU_GREEDY_SPLIT", 1) != 0;
  if (!split || vocab > INT32_MAX) return 1;  // (a slice's best index is stored as int32)
  const int64_t slices = (vocab + kGreedySliceLogits - 1) / kGreedySliceLogits;
  return slices < kGreedyMaxSlices ? slices : kGreedyMaxSlices;
}

int64_t greedy_part_words(int64_t rows, int64_t vocab) {
  const int64_t slices = greedy_slices(vocab);
  return slices > 1 ? 2 * rows * slices : 0;
}

std::string greedy_step_end(const float* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* tokens,
                            int64_t* host_tokens, int64_t* fields, int64_t bucket, int64_t max_blocks,
                            int64_t block_size, int64_t ring_size, unsigned* counters, int32_t* parts, void* stream) {
  if (rows < 1 || vocab < 1 || stride < vocab) return "greedy_step_end: needs rows >= 1 and stride >= vocab >= 1";
  if (rows > 65535) return "greedy_step_end: at most 65535 rows";
  if (logits == nullptr || tokens == nullptr) return "greedy_step_end: logits and tokens must not be null";
  if (fields != nullptr && (rows > bucket || max_blocks < 1 || block_size < 1))
    return "greedy_step_end: with fields, rows <= bucket, max_blocks >= 1 and block_size >= 1";
  const int64_t slices = greedy_slices(vocab);
  if (slices > 1 && (counters == nullptr || parts == nullptr))
    return "greedy_step_end: a row in slices needs counters and parts (greedy_part_words)";
  const int64_t chunk = slices > 1 ? (vocab + slices - 1) / slices : vocab;
  const unsigned threads = slices > 1 ? kGreedySliceThreads : kGreedyThreads;
  const cudaError_t e =
      pdl::launch(greedy_step_end_kernel, dim3(static_cast<unsigned>(slices), static_cast<unsigned>(rows)),
                  dim3(threads), static_cast<cudaStream_t>(stream), logits, vocab, stride, chunk, counters, parts, tokens,
                  host_tokens, fields, bucket, max_blocks, block_size, ring_size);
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dejavu
