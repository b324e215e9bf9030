// small_linear: one warp per output feature reads its weight row in coalesced 16-byte chunks
// (four in flight per lane, streamed past L1) and dots it with each input row (through the
// read-only cache: every warp of the grid reads the same few rows); a warp shuffle reduces.
// Launched with programmatic dependent launch (pdl.h), each warp loads the first kPre chunks per
// lane of its row (all of a 2048-wide row) before it waits for the kernel that writes its input.
// Long rows are split over KS warps of the block (split-K: up to 2 from 4096 inputs, 4 from 8192),
// each taking a contiguous slice, so more of a long row is loaded before the wait and more warps
// keep loads in flight; the slices' sums meet in shared memory. Without a prologue the split is
// the widest whose blocks fit on the device in one wave (plain_split).
// With a norm prologue (NORM), each block computes x = norm(h + a) itself after the wait, into
// shared memory (norm.cuh: add_norm_row, as the add_norm kernel computes it, staged in that
// shared row so that no registers are held across its reductions), and block 0 stores h + a: the
// add_norm kernel before the linear layer and its launch disappear. The grid is then only as
// large as fits on the device at once, each block taking every gridDim.x-th tile of output
// features, so each normalises once rather than once per tile. Each tile is a round of loads, so
// the registers (blocks per SM) set the number of rounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/gemv.h"
#include "kernels/element.cuh"
#include "kernels/env.h"
#include "kernels/norm.cuh"
#include "kernels/pdl.cuh"

namespace dejavu {
namespace {

constexpr int kWarps = 8;  // output features per thread block
constexpr int kVec = 8;    // elements per 16-byte chunk
constexpr int kPre = 8;    // chunks per lane loaded before the wait for the input

using elem::from_f;
using elem::to_f;

// The key of pdl::kernel_fact for the plain kernel's occupancy (key 0 is pdl's own fact, and the
// prologue kernels' occupancy is keyed by their shared memory size).
constexpr size_t kFactResidentPlain = ~size_t{0};

// Input rows come through the read-only cache from global memory, or from shared memory (SMEM).
template <bool SMEM>
__device__ __forceinline__ uint4 load_x(const uint4* p) {
  if constexpr (SMEM) return *p;
  else return __ldg(p);
}

// Bits of small_linear_kernel's `act`: ReLU, and outputs stored as fp32 (rounded to T first, so
// they equal the T outputs converted: an LM head's logits without a conversion kernel after it).
constexpr int kActRelu = 1;
constexpr int kOutF32 = 2;

template <typename T>
__device__ __forceinline__ void store_out(T* y, int64_t i, float v, int act) {
  if (act & kOutF32) reinterpret_cast<float*>(y)[i] = to_f(from_f<T>(v));
  else y[i] = from_f<T>(v);
}

template <typename T, int M, bool SMEM>
__device__ __forceinline__ void dot_chunk(float (&acc)[M], const uint4& wv, const T* __restrict__ x,
                                          int64_t x_stride, int64_t c) {
  const T* wt = reinterpret_cast<const T*>(&wv);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4 xv = load_x<SMEM>(reinterpret_cast<const uint4*>(x + m * x_stride) + c);
    const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[m] = fmaf(to_f(wt[j]), to_f(xt[j]), acc[m]);
  }
}

// NormPrologue with typed pointers (all null when the kernel has no prologue).
template <typename T>
struct NormArgs {
  const T* h;
  const T* a;
  const T* weight;
  const T* bias;
  T* sum_out;
  float eps;
  int rms;
};

template <typename T, int M, int KS, bool NORM>
__global__ void __launch_bounds__(kWarps * 32)
    small_linear_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                        const T* __restrict__ bias, int64_t n_out, int64_t k_in, int64_t x_stride, int act,
                        NormArgs<T> norm_args) {
  static_assert(kWarps % KS == 0, "the block's warps split evenly over its rows");
  static_assert(!NORM || kWarps * 32 == norm::kThreads, "add_norm_row runs on the whole block");
  constexpr int per_block = kWarps / KS;  // output features of a tile
  __shared__ float part_s[KS > 1 ? kWarps : 1][M];
  extern __shared__ uint4 x_shared[];  // NORM: the normalised rows, [M, k_in]
  pdl::release();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slice = warp % KS;
  // Tiles of per_block features: one per block, or with a prologue (a grid of the blocks that fit
  // at once) every gridDim.x-th, so that each block normalises its input once.
  const int64_t tiles = (n_out + per_block - 1) / per_block;
  int64_t tile = blockIdx.x;
  int64_t n = tile * per_block + warp / KS;
  // (with slices or a prologue every warp reaches the barriers below)
  if (KS == 1 && !NORM && n >= n_out) return;
  const int64_t chunks = k_in / kVec / KS;  // this warp's slice of the row
  uint4 pre[kPre];  // weights only: no kernel of the step writes them
  auto preload = [&](bool valid, const uint4* row) {
#pragma unroll
    for (int i = 0; i < kPre; ++i)
      if (valid && lane + 32 * i < chunks) pre[i] = __ldcs(row + lane + 32 * i);
  };
  preload(n < n_out, reinterpret_cast<const uint4*>(w + n * k_in) + slice * chunks);
  pdl::wait();  // the input (and y) belong to the kernels before this one
  if constexpr (NORM) {
    __shared__ float red[norm::kThreads / 32];
    T* xs = reinterpret_cast<T*>(x_shared);
#pragma unroll 1
    for (int m = 0; m < M; ++m)
      norm::add_norm_row<T, true>(blockIdx.x == 0 ? norm_args.sum_out + m * k_in : static_cast<T*>(nullptr), xs + m * k_in,
                         norm_args.h + m * k_in, norm_args.a + m * k_in, norm_args.weight, norm_args.bias, k_in,
                         norm_args.eps, norm_args.rms, red);
    __syncthreads();
    x = xs;
    x_stride = k_in;
  }
  x += slice * chunks * kVec;
  for (;;) {
    const bool valid = n < n_out;
    const uint4* row = reinterpret_cast<const uint4*>(w + n * k_in) + slice * chunks;
    // With a prologue, the block's next tile (its chunks are loaded after this one's arithmetic).
    const int64_t next_tile = tile + gridDim.x;
    const int64_t n_next = next_tile * per_block + warp / KS;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
#pragma unroll
    for (int i = 0; i < kPre; ++i)
      if (valid && lane + 32 * i < chunks) dot_chunk<T, M, NORM>(acc, pre[i], x, x_stride, lane + 32 * i);
    int64_t c = valid ? lane + 32 * kPre : chunks;
    for (; c + 96 < chunks; c += 128) {  // four loads in flight before any arithmetic
      const uint4 w0 = __ldcs(row + c), w1 = __ldcs(row + c + 32), w2 = __ldcs(row + c + 64),
                  w3 = __ldcs(row + c + 96);
      dot_chunk<T, M, NORM>(acc, w0, x, x_stride, c);
      dot_chunk<T, M, NORM>(acc, w1, x, x_stride, c + 32);
      dot_chunk<T, M, NORM>(acc, w2, x, x_stride, c + 64);
      dot_chunk<T, M, NORM>(acc, w3, x, x_stride, c + 96);
    }
    for (; c < chunks; c += 32) dot_chunk<T, M, NORM>(acc, __ldcs(row + c), x, x_stride, c);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = elem::warp_sum(acc[m]);
    bool writes = valid;
    if (KS > 1) {  // the row's slices meet in shared memory; its first warp adds them up
      if (lane == 0)
#pragma unroll
        for (int m = 0; m < M; ++m) part_s[warp][m] = acc[m];
      __syncthreads();
      writes = valid && slice == 0;
      if (writes) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float v = 0.f;
#pragma unroll
          for (int k = 0; k < KS; ++k) v += part_s[warp + k][m];  // (warp is the row's first: slice 0)
          acc[m] = v;
        }
      }
    }
    if (lane == 0 && writes) {
      const float b = bias != nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[m] + b;
        if (act & kActRelu) v = fmaxf(v, 0.f);
        store_out(y, m * n_out + n, v, act);
      }
    }
    tile = next_tile;
    if (!NORM || tile >= tiles) return;
    if (KS > 1) __syncthreads();  // part_s is read above before the next tile writes it
    n = n_next;
    preload(n < n_out, reinterpret_cast<const uint4*>(w + n * k_in) + slice * chunks);
  }
}

// Slices per row at most: 4 from 8192 inputs, 2 from 4096, else 1 (the slice must be whole chunks);
// the plain kernel may take fewer (plain_split). DEJAVU_LINEAR_SPLIT=1 (2, 4) caps it, a baseline
// for benchmarks. Read once.
int split_for(int64_t k_in) {
  static const int cap = [] {
    const long long c = env::integer("DEJAVU_LINEAR_SPLIT", 4);
    return c >= 4 ? 4 : c >= 2 ? 2 : 1;
  }();
  const int64_t chunks = k_in / kVec;
  if (cap >= 4 && chunks >= 4 * 256 && chunks % 4 == 0) return 4;
  if (cap >= 2 && chunks >= 2 * 256 && chunks % 2 == 0) return 2;
  return 1;
}

// Blocks of `kernel` (kWarps * 32 threads, smem bytes of dynamic shared memory) resident on the
// current device at once, at most DEJAVU_NORM_BLOCKS_PER_SM per SM where that is set (a knob for
// benchmarks: fewer leaves room for the next kernel's blocks to start early); at least 1. Asked
// once per (device, kernel, smem).
int64_t resident_blocks(const void* kernel, size_t smem) {
  return pdl::kernel_fact(kernel, smem, [](int dev, const void* k, size_t bytes) -> int64_t {
    static const int cap = static_cast<int>(env::integer("DEJAVU_NORM_BLOCKS_PER_SM", 0));
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kWarps * 32, bytes) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 1;
    if (cap > 0) per_sm = std::min(per_sm, cap);
    return std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
  }, 1);
}

// Blocks of the plain kernel (no prologue) for `rows` rows and KS slices per row that the current
// device holds at once (by registers; asked once per device and kernel).
template <typename T, int KS>
int64_t plain_resident(int64_t rows) {
  const void* k = rows == 1   ? reinterpret_cast<const void*>(small_linear_kernel<T, 1, KS, false>)
                  : rows == 2 ? reinterpret_cast<const void*>(small_linear_kernel<T, 2, KS, false>)
                  : rows == 3 ? reinterpret_cast<const void*>(small_linear_kernel<T, 3, KS, false>)
                              : reinterpret_cast<const void*>(small_linear_kernel<T, 4, KS, false>);
  return pdl::kernel_fact(k, kFactResidentPlain, [](int dev, const void* kernel, size_t) -> int64_t {
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, 0) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 1;
    return std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
  }, 1);
}

// Slices per row of the plain kernel (one block per tile of kWarps / KS features): the widest that
// split_for allows whose tiles all fit on the device at once, in one wave of blocks; where none
// does, the widest. OPT-1.3B's fc2 at batch 1 (2048 x 8192) takes 2: 4 slices make 1024 blocks,
// two waves on a 132-SM Hopper (4 blocks per SM), and the step ran 3% slower (docs/BENCHMARKS.md).
// DEJAVU_LINEAR_ONE_WAVE=0 always takes the widest (the rule before; a baseline for benchmarks).
template <typename T>
int plain_split(int64_t rows, int64_t n_out, int64_t k_in) {
  static const bool one_wave = env::integer("DEJAVU_LINEAR_ONE_WAVE", 1) != 0;
  const int widest = split_for(k_in);
  if (!one_wave) return widest;
  auto tiles = [&](int ks) { return (n_out + kWarps / ks - 1) / (kWarps / ks); };
  if (widest >= 4 && tiles(4) <= plain_resident<T, 4>(rows)) return 4;
  if (widest >= 2 && tiles(2) <= plain_resident<T, 2>(rows)) return 2;
  if (tiles(1) <= plain_resident<T, 1>(rows)) return 1;
  return widest;
}

template <typename T, int KS, bool NORM>
cudaError_t launch_split(T* y, const T* x, const T* w, const T* bias, int64_t rows, int64_t n_out, int64_t k_in,
                         int64_t x_stride, int act, const NormArgs<T>& na, cudaStream_t s) {
  constexpr int per_block = kWarps / KS;
  const int64_t tiles = (n_out + per_block - 1) / per_block;
  const dim3 block(kWarps * 32);
  const size_t smem = NORM ? static_cast<size_t>(rows * k_in) * sizeof(T) : 0;
  auto go = [&](auto kernel) {
    // With a prologue: no more blocks than fit on the device at once (each normalises once).
    const int64_t blocks = NORM ? std::min<int64_t>(tiles, resident_blocks(reinterpret_cast<const void*>(kernel), smem)) : tiles;
    return pdl::launch_smem(kernel, dim3(static_cast<unsigned>(blocks)), block, smem, s, y, x, w, bias, n_out, k_in,
                            x_stride, act, na);
  };
  switch (rows) {
    case 1: return go(small_linear_kernel<T, 1, KS, NORM>);
    case 2: return go(small_linear_kernel<T, 2, KS, NORM>);
    case 3: return go(small_linear_kernel<T, 3, KS, NORM>);
    case 4: return go(small_linear_kernel<T, 4, KS, NORM>);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, bool NORM>
cudaError_t launch_norm(T* y, const T* x, const T* w, const T* bias, int64_t rows, int64_t n_out, int64_t k_in,
                        int64_t x_stride, int act, const NormArgs<T>& na, cudaStream_t s) {
  switch (NORM ? split_for(k_in) : plain_split<T>(rows, n_out, k_in)) {
    case 4: return launch_split<T, 4, NORM>(y, x, w, bias, rows, n_out, k_in, x_stride, act, na, s);
    case 2: return launch_split<T, 2, NORM>(y, x, w, bias, rows, n_out, k_in, x_stride, act, na, s);
    default: return launch_split<T, 1, NORM>(y, x, w, bias, rows, n_out, k_in, x_stride, act, na, s);
  }
}

template <typename T>
cudaError_t launch(void* y, const void* x, const void* w, const void* bias, int64_t rows, int64_t n_out,
                   int64_t k_in, int64_t x_stride, int act, const NormPrologue* norm, cudaStream_t s) {
  auto Y = static_cast<T*>(y);
  auto X = static_cast<const T*>(x);
  auto W = static_cast<const T*>(w);
  auto B = static_cast<const T*>(bias);
  NormArgs<T> na{};
  if (norm == nullptr) return launch_norm<T, false>(Y, X, W, B, rows, n_out, k_in, x_stride, act, na, s);
  na = NormArgs<T>{static_cast<const T*>(norm->h), static_cast<const T*>(norm->a), static_cast<const T*>(norm->weight),
                   static_cast<const T*>(norm->bias), static_cast<T*>(norm->sum_out), norm->eps, norm->rms};
  return launch_norm<T, true>(Y, X, W, B, rows, n_out, k_in, k_in, act, na, s);
}

}  // namespace

std::string small_linear(void* y, const void* x, const void* w, const void* bias, int64_t rows,
                         int64_t out_features, int64_t in_features, int64_t x_stride, int act, DType dtype,
                         void* stream, const NormPrologue* norm, bool out_f32) {
  if (rows < 1 || rows > kSmallLinearMaxRows) return "small_linear: rows must be 1.." + std::to_string(kSmallLinearMaxRows);
  if (norm != nullptr) {
    x = nullptr;  // unused: the kernel reads norm(h + a)
    x_stride = in_features;
    const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
    if (in_features > kAddNormMaxHidden || rows * in_features * elem > kSmallLinearNormMaxBytes)
      return "small_linear: a norm prologue takes up to " + std::to_string(kAddNormMaxHidden) + " inputs and " +
             std::to_string(kSmallLinearNormMaxBytes) + " bytes of input rows";
    if (norm->h == nullptr || norm->a == nullptr || norm->weight == nullptr || norm->sum_out == nullptr)
      return "small_linear: a norm prologue needs h, a, weight and sum_out";
    const uintptr_t any = reinterpret_cast<uintptr_t>(norm->h) | reinterpret_cast<uintptr_t>(norm->a) |
                          reinterpret_cast<uintptr_t>(norm->weight) | reinterpret_cast<uintptr_t>(norm->bias) |
                          reinterpret_cast<uintptr_t>(norm->sum_out);
    if (any % 16) return "small_linear: the norm prologue's pointers must be 16-byte aligned";
    if (norm->rms != 0 && norm->rms != 1) return "small_linear: rms must be 0 (LayerNorm) or 1 (RMSNorm)";
  }
  if (in_features % kVec || x_stride % kVec || out_features < 1)
    return "small_linear: in_features and x_stride must be multiples of 8";
  if (norm == nullptr && x == nullptr) return "small_linear: x is null";
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) % 16)
    return norm == nullptr ? "small_linear: x and w must be 16-byte aligned" : "small_linear: w must be 16-byte aligned";
  if (act != 0 && act != 1) return "small_linear: act must be 0 (none) or 1 (relu)";
  if (out_f32) act |= kOutF32;
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  if (dtype == DType::kFloat16)
    e = launch<__half>(y, x, w, bias, rows, out_features, in_features, x_stride, act, norm, s);
  else if (dtype == DType::kBFloat16)
    e = launch<__nv_bfloat16>(y, x, w, bias, rows, out_features, in_features, x_stride, act, norm, s);
  else
    return "small_linear: fp16 or bf16 only";
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace dejavu
