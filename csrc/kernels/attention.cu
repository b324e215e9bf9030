// Paged decode attention and the KV write, for the GPU fast path (see attention.h).
//
// Attention: grid (head, sequence, partition), 128 threads. Each partition covers kDecodePartition
// keys. Groups of lanes read one row at a time as 16-byte vectors (a warp covers 32 / group rows
// per load, coalesced), dot keys with the query and reduce by shuffles. Two kernels:
// - rows (large batches): the block scores all keys of the partition, takes the max and the
//   exponentials with block-wide reductions, then the same lane groups accumulate the weighted
//   value rows;
// - warps (small batches, where latency rules): keys and values are loaded together; each warp
//   keeps a running max, sum and weighted sum of values over its rows (rescaled when the max
//   grows), so no barrier separates keys from values, and the warps are merged once at the end.
//   Under programmatic launch its first rows are loaded before the wait for the previous kernel.
// Both reduce the values over the warp by shuffles and over the warps in shared memory. With one
// partition the block writes the output; with several, each writes (max, sum, unnormalised
// output) to the workspace, so a batch of one still spreads over many SMs, and the partials are
// combined either by the block that finishes a row's last partition (given a counter per row:
// each block counts its partitions with one atomic after a fence, and the last one combines and
// resets the counter to 0 for the next launch) or by a second kernel.
// Given the new token's K and V (k_new, v_new), the kernels also store them at position ctx - 1
// of the cache, as the KV write kernel would (one block per sequence and KV head), and read that
// row from k_new / v_new, never from the cache: one kernel instead of two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention.h"
#include "kernels/element.cuh"
#include "kernels/env.h"
#include "kernels/pdl.cuh"

namespace dejavu {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kPart = static_cast<int>(kDecodePartition);

using elem::from_f;
using elem::to_f;
using elem::warp_sum;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reductions; every thread gets the result. `red` holds kWarps floats.
__device__ float block_max(float v, float* red) {
  v = warp_max(v);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[w] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r = fmaxf(r, red[i]);
  return r;
}
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) r += red[i];
  return r;
}

// The lane-group layout both attention kernels read rows with: G lanes hold one key (or value)
// row as 16-byte vectors, so a warp reads 32 / G rows per load instruction, coalesced; each lane
// keeps kInFlight rows' loads in flight before it uses them.
template <typename T, int D>
struct Lanes {
  static constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
  static constexpr int kVecs = D / kVec;       // vectors per row
  static constexpr int G = kVecs <= 1 ? 1 : kVecs <= 2 ? 2 : kVecs <= 4 ? 4 : kVecs <= 8 ? 8 : kVecs <= 16 ? 16 : 32;
  static constexpr int kRows = 32 / G;         // rows per warp per load
  static constexpr int kInFlight = 4;
  static constexpr int kWarpRows = kRows * kInFlight;  // rows per warp per iteration
  static_assert(D % kVec == 0 && kVecs <= 32, "head_dim must be a multiple of 16 bytes, at most 512 bytes");
};

// Where one (sequence, head) of a decode step reads: its KV head, the cache strides, its block
// table and ALiBi slope, and this thread's place in the lane-group layout.
template <typename T, int D>
struct Head {
  int kvh;
  int64_t tok_stride;  // elements between tokens of a block
  int64_t kv_stride;   // K half -> V half of a block
  int64_t blk_stride;
  const int64_t* table;
  float slope;
  int warp, lane, grp, sub;
  bool active;  // the lane holds part of a row (head sizes whose vectors do not fill the group)
  __device__ __forceinline__ Head(int h, int b, int H, int KVH, int BS, const int64_t* block_tables,
                                  int64_t bt_stride, const float* slopes)
      : kvh(h / (H / KVH)),
        tok_stride(static_cast<int64_t>(KVH) * D),
        kv_stride(static_cast<int64_t>(BS) * tok_stride),
        blk_stride(2 * kv_stride),
        table(block_tables + b * bt_stride),
        slope(slopes ? slopes[h] : 0.f),
        warp(threadIdx.x / 32),
        lane(threadIdx.x % 32),
        grp(lane / Lanes<T, D>::G),
        sub(lane % Lanes<T, D>::G),
        active(sub < Lanes<T, D>::kVecs) {}
};

// Stores n elements of a new token's K and V (ks, vs) at kd and vd, and, unless rd is null, at rd
// and rd + ring_v: the token's row of a replication ring in host memory, [2 (K, V), KVH, D] (these
// stores cross PCIe). The block's threads share the elements. Used by the KV write kernel (a whole
// row) and by the attention kernels' fused write (one KV head). With `vec` and every address
// 16-byte aligned, in 16-byte vectors: a 64-wide fp16 head's half is then one 128-byte store of 8
// threads, not two 64-byte warp stores (half the PCIe writes into the ring). DEJAVU_KV_STORE=scalar
// (kv_store_vectors()) stores element by element: the baseline for benchmarks.
template <typename T>
__device__ __forceinline__ void store_kv(T* kd, T* vd, T* rd, int64_t ring_v, const T* ks, const T* vs, int64_t n,
                                         bool vec) {
  constexpr int kV = 16 / sizeof(T);
  const uintptr_t bits = reinterpret_cast<uintptr_t>(kd) | reinterpret_cast<uintptr_t>(vd) |
                         reinterpret_cast<uintptr_t>(ks) | reinterpret_cast<uintptr_t>(vs) |
                         static_cast<uintptr_t>(n * sizeof(T)) |
                         (rd ? reinterpret_cast<uintptr_t>(rd) | static_cast<uintptr_t>(ring_v * sizeof(T)) : 0);
  if (vec && bits % 16 == 0) {
    for (int64_t j = threadIdx.x * static_cast<int64_t>(kV); j < n; j += static_cast<int64_t>(blockDim.x) * kV) {
      const uint4 kv = *reinterpret_cast<const uint4*>(ks + j), vv = *reinterpret_cast<const uint4*>(vs + j);
      *reinterpret_cast<uint4*>(kd + j) = kv;
      *reinterpret_cast<uint4*>(vd + j) = vv;
      if (rd) {
        *reinterpret_cast<uint4*>(rd + j) = kv;
        *reinterpret_cast<uint4*>(rd + ring_v + j) = vv;
      }
    }
    return;
  }
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T kv = ks[j], vv = vs[j];
    kd[j] = kv;
    vd[j] = vv;
    if (rd) {
      rd[j] = kv;
      rd[ring_v + j] = vv;
    }
  }
}

// Where the fused KV write leaves a block: the new token's K/V as the kernel's inputs, or none.
template <typename T>
struct NewKV {
  T* cache;  // the layer's cache, written at position ctx - 1 (null: nothing fused)
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;  // elements between sequences' rows
  T* ring;                     // a replication ring's layer (host memory), or null
  const int64_t* ring_rows;    // the ring row of each sequence's new token (negative: none)
  bool vec;                    // store_kv in 16-byte vectors where aligned (kv_store_vectors())
};

// The new token's row (key or value half) of sequence b, this lane's 16 bytes.
template <typename T, int D>
__device__ __forceinline__ const uint4* new_row(const NewKV<T>& nk, const Head<T, D>& g, int b, bool value) {
  const T* base = value ? nk.v + b * nk.v_stride : nk.k + b * nk.k_stride;
  return reinterpret_cast<const uint4*>(base + g.kvh * D + g.sub * Lanes<T, D>::kVec);
}

// Stores the new token's K and V at position ctx - 1 of sequence b (after the wait: the kernel
// before this one writes them). One block per (sequence, KV head) does it; no block of this
// launch reads that row of the cache.
template <typename T, int D>
__device__ __forceinline__ void store_new_kv(const NewKV<T>& nk, const Head<T, D>& g, int b, int h, int H, int KVH,
                                             int BS, int ctx) {
  if (nk.cache == nullptr || blockIdx.z != 0 || h % (H / KVH) != 0) return;
  const int t = ctx - 1;
  T* dst = nk.cache + g.table[t / BS] * g.blk_stride + (t % BS) * g.tok_stride + static_cast<int64_t>(g.kvh) * D;
  const T* ks = nk.k + b * nk.k_stride + static_cast<int64_t>(g.kvh) * D;
  const T* vs = nk.v + b * nk.v_stride + static_cast<int64_t>(g.kvh) * D;
  // The replication ring's row of this token (tok_stride = KVH * D elements per half).
  T* rd = nk.ring != nullptr && nk.ring_rows[b] >= 0
              ? nk.ring + nk.ring_rows[b] * 2 * g.tok_stride + static_cast<int64_t>(g.kvh) * D
              : nullptr;
  store_kv<T>(dst, dst + g.kv_stride, rd, g.tok_stride, ks, vs, D, nk.vec);
}

// The workspace of a launch with several partitions: per row and partition a max, a sum, and the
// unnormalised output.
struct Workspace {
  float* max;
  float* sum;
  float* out;
  __device__ __forceinline__ Workspace(float* ws, int num_seqs, int H, int num_parts)
      : max(ws),
        sum(ws + static_cast<int64_t>(num_seqs) * H * num_parts),
        out(ws + 2 * static_cast<int64_t>(num_seqs) * H * num_parts) {}
};

// out[row] from the first n partitions' partials (n == 0: zeros). Loads go through L2: other
// blocks of the same launch may have written them. Partials are merged 8 at a time with a running
// max (rescaled as it grows): each group's maxima, sums and outputs are loaded together, so a
// short row costs one round of loads rather than one per quantity.
template <typename T, int D>
__device__ void combine_row(T* __restrict__ out, const Workspace& w, int64_t row, int n, int num_parts) {
  constexpr int kGroup = 8;
  const float* m_p = w.max + row * num_parts;
  const float* s_p = w.sum + row * num_parts;
  const float* o_p = w.out + row * num_parts * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float m = -INFINITY, total = 0.f, o = 0.f;
    for (int p0 = 0; p0 < n; p0 += kGroup) {
      float mp[kGroup], sp[kGroup], op[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const bool ok = p0 + i < n;
        mp[i] = ok ? __ldcg(m_p + p0 + i) : -INFINITY;
        sp[i] = ok ? __ldcg(s_p + p0 + i) : 0.f;
        op[i] = ok ? __ldcg(o_p + (p0 + i) * D + d) : 0.f;
      }
      float m_new = m;
#pragma unroll
      for (int i = 0; i < kGroup; ++i) m_new = fmaxf(m_new, mp[i]);  // finite: partition p0 is below n
      const float alpha = expf(m - m_new);                           // 0 for the first group
      total *= alpha;
      o *= alpha;
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const float e = expf(mp[i] - m_new);  // 0 past n
        total += sp[i] * e;
        o += op[i] * e;
      }
      m = m_new;
    }
    out[row * D + d] = from_f<T>(n > 0 ? o / total : 0.f);
  }
}

// After a block has written the partials of its `mine` partitions of a row (of n): true (in every
// thread) when they were the row's last ones, so this block combines them. A block that owns all
// of its row's partitions (grid z of 1) needs no count. Otherwise one fence and one atomic per
// block (not per partition): its partials are visible device-wide before they are counted.
__device__ __forceinline__ bool count_partitions(unsigned* counters, int64_t row, int mine, int n, int* flag_s) {
  if (gridDim.z == 1) {
    __syncthreads();  // the block's own partials (global memory) are visible to all its threads
    return true;
  }
  if (mine == 0) return false;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag_s = atomicAdd(counters + row, static_cast<unsigned>(mine)) + mine == static_cast<unsigned>(n);
  __syncthreads();
  return *flag_s != 0;
}

// The combine of the last block: the other blocks' partials (fenced before their counts), then
// the counter back to 0 for the next launch.
template <typename T, int D>
__device__ void combine_last(T* __restrict__ out, const Workspace& w, unsigned* counters, int64_t row, int n,
                             int num_parts) {
  __threadfence();
  combine_row<T, D>(out, w, row, n, num_parts);
  if (threadIdx.x == 0 && gridDim.z > 1) counters[row] = 0;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_attention_rows_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ cache,
                        const int64_t* __restrict__ block_tables, const int64_t* __restrict__ context_lens,
                        const float* __restrict__ slopes, float* __restrict__ ws, int num_seqs, int H, int KVH,
                        int BS, int64_t bt_stride, int64_t q_stride, int num_parts, float scale,
                        NewKV<T> nk, unsigned* __restrict__ counters) {
  // Loops run whole warps (the shuffles need every lane).
  using L = Lanes<T, D>;
  constexpr int kVec = L::kVec, G = L::G, kRows = L::kRows, kInFlight = L::kInFlight, kWarpRows = L::kWarpRows;

  pdl::release();
  pdl::wait();  // q and the new token's K/V come from the kernels before this one
  const int h = blockIdx.x, b = blockIdx.y;
  const int ctx = static_cast<int>(context_lens[b]);
  const int64_t row = static_cast<int64_t>(b) * H + h;
  if (ctx == 0) {  // padding row
    if (blockIdx.z == 0)
      for (int d = threadIdx.x; d < D; d += kThreads) out[row * D + d] = from_f<T>(0.f);
    return;
  }
  __shared__ float q_s[D];
  __shared__ float p_s[kPart];
  __shared__ int flag_s;
  __shared__ float red[kWarps];
  __shared__ float acc_s[kWarps][D];
  __shared__ int64_t blk_s[kPart + 1];  // cache blocks of the partition's keys
  const Head<T, D> g(h, b, H, KVH, BS, block_tables, bt_stride, slopes);
  for (int i = threadIdx.x; i < D; i += kThreads) q_s[i] = to_f(q[b * q_stride + static_cast<int64_t>(h) * D + i]);
  store_new_kv<T, D>(nk, g, b, h, H, KVH, BS, ctx);
  const Workspace wsp(ws, num_seqs, H, num_parts);
  const int n_parts = (ctx + kPart - 1) / kPart;  // partitions below the context
  int mine = 0;                                    // of them, those this block took

  // The grid's z dimension may be smaller than num_parts: blocks stride over the partitions.
  for (int part = blockIdx.z; part < num_parts; part += gridDim.z) {
    const int start = part * kPart;
    if (start >= ctx) break;  // (the combine reads only the partitions below the context)
    const int end = min(ctx, start + kPart);
    const int first_blk = start / BS;
    const int nblk = (end - 1) / BS - first_blk + 1;
    for (int i = threadIdx.x; i < nblk; i += kThreads) blk_s[i] = g.table[first_blk + i];
    __syncthreads();
    float qv[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) qv[j] = g.active ? q_s[g.sub * kVec + j] : 0.f;
    // Row t's key (value: the V half) for this lane; the new token's from k_new / v_new when fused.
    auto load_row = [&](int t, bool value) -> uint4 {
      if (nk.cache != nullptr && t == ctx - 1) return *new_row<T, D>(nk, g, b, value);
      return *reinterpret_cast<const uint4*>(cache + blk_s[t / BS - first_blk] * g.blk_stride +
                                             (value ? g.kv_stride : 0) + (t % BS) * g.tok_stride + g.kvh * D +
                                             g.sub * kVec);
    };

    // Scores.
    float local_max = -INFINITY;
    for (int base = start + g.warp * kWarpRows; base < end; base += kWarps * kWarpRows) {
      uint4 raw[kInFlight];
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        if (t < end && g.active) raw[r] = load_row(t, false);
      }
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        float s = 0.f;
        if (t < end && g.active) {
          const T* e = reinterpret_cast<const T*>(&raw[r]);
#pragma unroll
          for (int j = 0; j < kVec; ++j) s += qv[j] * to_f(e[j]);
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (t < end && g.sub == 0) {
          s *= scale;
          if (slopes) s += g.slope * static_cast<float>(t);
          p_s[t - start] = s;
          local_max = fmaxf(local_max, s);
        }
      }
    }
    const float m = block_max(local_max, red);  // its barriers also publish p_s
    float local_sum = 0.f;
    for (int t = start + threadIdx.x; t < end; t += kThreads) {
      const float e = expf(p_s[t - start] - m);
      p_s[t - start] = e;
      local_sum += e;
    }
    const float sum = block_sum(local_sum, red);

    // Values: each lane group accumulates its rows' weighted values, 16 bytes per lane.
    float acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
    for (int base = start + g.warp * kWarpRows; base < end; base += kWarps * kWarpRows) {
      uint4 raw[kInFlight];
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        if (t < end && g.active) raw[r] = load_row(t, true);
      }
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        if (t < end && g.active) {
          const T* e = reinterpret_cast<const T*>(&raw[r]);
          const float p = p_s[t - start];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += p * to_f(e[j]);
        }
      }
    }
#pragma unroll
    for (int o = G; o < 32; o <<= 1)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
    if (g.grp == 0 && g.active)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc_s[g.warp][g.sub * kVec + j] = acc[j];
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += acc_s[w][d];
      if (num_parts == 1)
        out[row * D + d] = from_f<T>(o / sum);
      else
        wsp.out[(row * num_parts + part) * D + d] = o;
    }
    if (num_parts > 1 && threadIdx.x == 0) {
      wsp.max[row * num_parts + part] = m;
      wsp.sum[row * num_parts + part] = sum;
    }
    ++mine;
    __syncthreads();  // shared memory is reused by the next partition
  }
  if (num_parts > 1 && counters != nullptr && count_partitions(counters, row, mine, n_parts, &flag_s))
    combine_last<T, D>(out, wsp, counters, row, n_parts, num_parts);
}

template <typename T, int D, int NW>
__global__ void __launch_bounds__(NW * 32)
decode_attention_warps_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ cache,
                        const int64_t* __restrict__ block_tables, const int64_t* __restrict__ context_lens,
                        const float* __restrict__ slopes, float* __restrict__ ws, int num_seqs, int H, int KVH,
                        int BS, int64_t bt_stride, int64_t q_stride, int num_parts, float scale,
                        NewKV<T> nk, unsigned* __restrict__ counters) {
  // Each lane keeps kInFlight rows' keys and values in flight at once. Each warp runs its own
  // softmax over its rows (a running max, rescaled), and the warps are merged once at the end of
  // the partition. Loops run whole warps (the shuffles need every lane).
  using L = Lanes<T, D>;
  constexpr int kVec = L::kVec, G = L::G, kRows = L::kRows, kInFlight = L::kInFlight, kWarpRows = L::kWarpRows;

  pdl::release();
  // Before the wait: only what no kernel of this step writes. Context lengths and block tables
  // come from the host; cached keys and values were written by earlier steps, except the new
  // token's row (ctx - 1), which the KV write just before this kernel stores (or, fused, k_new /
  // v_new hold) and which is read again after the wait.
  const int h = blockIdx.x, b = blockIdx.y;
  const int ctx = static_cast<int>(context_lens[b]);
  const int64_t row = static_cast<int64_t>(b) * H + h;
  if (ctx == 0) {  // padding row
    if (blockIdx.z == 0) {
      pdl::wait();
      for (int d = threadIdx.x; d < D; d += NW * 32) out[row * D + d] = from_f<T>(0.f);
    }
    return;
  }
  __shared__ float q_s[D];
  __shared__ float red_m[NW], red_l[NW];
  __shared__ float acc_s[NW][D];
  __shared__ int64_t blk_s[kPart + 1];  // cache blocks of the partition's keys
  __shared__ int flag_s;
  const Head<T, D> g(h, b, H, KVH, BS, block_tables, bt_stride, slopes);
  const Workspace wsp(ws, num_seqs, H, num_parts);
  const int n_parts = (ctx + kPart - 1) / kPart;  // partitions below the context
  int mine = 0;                                    // of them, those this block took
  bool waited = false;

  // The grid's z dimension may be smaller than num_parts: blocks stride over the partitions.
  for (int part = blockIdx.z; part < num_parts; part += gridDim.z) {
    const int start = part * kPart;
    if (start >= ctx) break;  // (the combine kernel reads only the partitions below the context)
    const int end = min(ctx, start + kPart);
    const int first_blk = start / BS;
    const int nblk = (end - 1) / BS - first_blk + 1;
    for (int i = threadIdx.x; i < nblk; i += NW * 32) blk_s[i] = g.table[first_blk + i];
    __syncthreads();
    auto row_ptr = [&](int t, int64_t half) {
      return reinterpret_cast<const uint4*>(cache + blk_s[t / BS - first_blk] * g.blk_stride + half +
                                            (t % BS) * g.tok_stride + g.kvh * D + g.sub * kVec);
    };
    uint4 kr[kInFlight], vr[kInFlight];
    // Row t's key and value for this lane (through L2, never a line loaded before the wait);
    // fused, the new token's come from k_new / v_new (only after the wait: the kernel before
    // this one writes them).
    auto load_row = [&](int r, int t) {
      if (waited && nk.cache != nullptr && t == ctx - 1) {
        kr[r] = __ldcg(new_row<T, D>(nk, g, b, false));
        vr[r] = __ldcg(new_row<T, D>(nk, g, b, true));
      } else {
        kr[r] = __ldcg(row_ptr(t, 0));
        vr[r] = __ldcg(row_ptr(t, g.kv_stride));
      }
    };
    auto load = [&](int base) {
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        if (t < end && g.active) load_row(r, t);
      }
    };
    int base = start + g.warp * kWarpRows;
    if (base < end) load(base);
    if (!waited) {  // (the same for the whole block)
      pdl::wait();
      waited = true;
      for (int i = threadIdx.x; i < D; i += NW * 32) q_s[i] = to_f(q[b * q_stride + static_cast<int64_t>(h) * D + i]);
      store_new_kv<T, D>(nk, g, b, h, H, KVH, BS, ctx);
      if (base < end) {
#pragma unroll
        for (int r = 0; r < kInFlight; ++r) {
          const int t = base + r * kRows + g.grp;
          if (t == ctx - 1 && g.active) load_row(r, t);  // the row the previous kernel wrote
        }
      }
      __syncthreads();
    }
    float qv[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) qv[j] = g.active ? q_s[g.sub * kVec + j] : 0.f;

    float m_w = -INFINITY, l_w = 0.f, acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
    for (bool first = true; base < end; base += NW * kWarpRows, first = false) {
      if (!first) load(base);
      float s[kInFlight];
      float it_max = -INFINITY;
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        float x = 0.f;
        if (t < end && g.active) {
          const T* e = reinterpret_cast<const T*>(&kr[r]);
#pragma unroll
          for (int j = 0; j < kVec; ++j) x += qv[j] * to_f(e[j]);
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        s[r] = t < end ? x * scale + (slopes ? g.slope * static_cast<float>(t) : 0.f) : -INFINITY;
        it_max = fmaxf(it_max, s[r]);
      }
#pragma unroll
      for (int o = G; o < 32; o <<= 1) it_max = fmaxf(it_max, __shfl_xor_sync(0xffffffffu, it_max, o));
      const float m_new = fmaxf(m_w, it_max);  // finite: the warp's first row of this iteration is < end
      const float alpha = expf(m_w - m_new);   // 0 on the first iteration
      l_w *= alpha;
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] *= alpha;
#pragma unroll
      for (int r = 0; r < kInFlight; ++r) {
        const int t = base + r * kRows + g.grp;
        if (t < end) {
          const float p = expf(s[r] - m_new);
          l_w += p;
          if (g.active) {
            const T* e = reinterpret_cast<const T*>(&vr[r]);
#pragma unroll
            for (int j = 0; j < kVec; ++j) acc[j] += p * to_f(e[j]);
          }
        }
      }
      m_w = m_new;
    }
    // Sum over the warp's lane groups (lanes with the same `sub`), then over the warps, each
    // scaled from its own max to the block's.
#pragma unroll
    for (int o = G; o < 32; o <<= 1) {
      l_w += __shfl_xor_sync(0xffffffffu, l_w, o);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
    }
    if (g.lane == 0) {
      red_m[g.warp] = m_w;
      red_l[g.warp] = l_w;
    }
    if (g.grp == 0 && g.active)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc_s[g.warp][g.sub * kVec + j] = acc[j];
    __syncthreads();
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) m = fmaxf(m, red_m[w]);
    float wscale[NW], sum = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      wscale[w] = expf(red_m[w] - m);  // 0 for a warp without rows (-inf)
      sum += red_l[w] * wscale[w];
    }
    for (int d = threadIdx.x; d < D; d += NW * 32) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) o += acc_s[w][d] * wscale[w];
      if (num_parts == 1)
        out[row * D + d] = from_f<T>(o / sum);
      else
        wsp.out[(row * num_parts + part) * D + d] = o;
    }
    if (num_parts > 1 && threadIdx.x == 0) {
      wsp.max[row * num_parts + part] = m;
      wsp.sum[row * num_parts + part] = sum;
    }
    ++mine;
    __syncthreads();  // shared memory is reused by the next partition
  }
  if (num_parts > 1 && counters != nullptr && count_partitions(counters, row, mine, n_parts, &flag_s))
    combine_last<T, D>(out, wsp, counters, row, n_parts, num_parts);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
combine_kernel(T* __restrict__ out, float* __restrict__ ws, const int64_t* __restrict__ context_lens,
               int num_seqs, int H, int num_parts) {
  pdl::release();
  pdl::wait();
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(b) * H + h;
  const int n = static_cast<int>((context_lens[b] + kPart - 1) / kPart);
  combine_row<T, D>(out, Workspace(ws, num_seqs, H, num_parts), row, n, num_parts);
}

template <typename T>
__global__ void write_kv_kernel(T* __restrict__ cache, const T* __restrict__ k, const T* __restrict__ v,
                                const int64_t* __restrict__ slot_blocks, const int64_t* __restrict__ slot_offsets,
                                int64_t row_elems, int64_t BS, int64_t k_stride, int64_t v_stride,
                                T* __restrict__ ring, const int64_t* __restrict__ ring_rows, bool vec) {
  pdl::release();
  pdl::wait();
  const int64_t i = blockIdx.x;
  const int64_t blk = slot_blocks[i];
  if (blk < 0) return;
  T* kd = cache + (blk * 2 * BS + slot_offsets[i]) * row_elems;
  T* vd = kd + BS * row_elems;
  const T* ks = k + i * k_stride;
  const T* vs = v + i * v_stride;
  // The replication ring's row of this token, or none.
  T* rd = ring != nullptr && ring_rows[i] >= 0 ? ring + ring_rows[i] * 2 * row_elems : nullptr;
  store_kv<T>(kd, vd, rd, row_elems, ks, vs, row_elems, vec);
}

// DEJAVU_ATTENTION_KERNEL=rows | warps forces one of the two kernels (a baseline for benchmarks);
// unset or auto: by the number of (sequence, head) rows. Read once.
int attention_kernel_choice() {
  static const int choice = [] {
    const std::string s = env::str("DEJAVU_ATTENTION_KERNEL");
    return s == "rows" ? 1 : s == "warps" ? 2 : 0;
  }();
  return choice;
}

// Warps per block of the warps kernel: kWideWarps by default (a 128-key partition of 64-wide fp16
// heads is then one round of loads, all issued before the wait for the previous kernel); kWarps
// with DEJAVU_ATTENTION_WARPS=4 (a baseline for benchmarks). Read once.
constexpr int kWideWarps = 8;
bool wide_warps() {
  static const bool wide = env::str("DEJAVU_ATTENTION_WARPS") != "4";
  return wide;
}

// New K/V stored in 16-byte vectors (store_kv); DEJAVU_KV_STORE=scalar: element by element (a
// baseline for benchmarks). Read once.
bool kv_store_vectors() {
  static const bool vec = env::str("DEJAVU_KV_STORE") != "scalar";
  return vec;
}

template <typename T, int D>
cudaError_t launch_attention(void* out, const void* q, const void* cache, const int64_t* bt, const int64_t* ctx,
                             const float* slopes, float* ws, int64_t B, int64_t H, int64_t KVH, int64_t BS,
                             int64_t bt_stride, int64_t q_stride, int64_t parts, int64_t grid_parts, float scale,
                             const DecodeFusion& f, cudaStream_t s) {
  const NewKV<T> nk{f.k_new != nullptr ? static_cast<T*>(const_cast<void*>(cache)) : nullptr,
                    static_cast<const T*>(f.k_new),
                    static_cast<const T*>(f.v_new),
                    f.k_stride,
                    f.v_stride,
                    static_cast<T*>(f.ring_layer),
                    f.ring_rows,
                    kv_store_vectors()};
  unsigned* counters = parts > 1 ? f.counters : nullptr;
  const dim3 grid(static_cast<unsigned>(H), static_cast<unsigned>(B), static_cast<unsigned>(grid_parts));
  const int pick = attention_kernel_choice();
  const bool warps = pick == 0 ? B * H <= kDecodeWarpsMaxRows : pick == 2;
  const bool wide = warps && wide_warps();
  auto kernel = !warps ? decode_attention_rows_kernel<T, D>
                : wide ? decode_attention_warps_kernel<T, D, kWideWarps>
                       : decode_attention_warps_kernel<T, D, kWarps>;
  cudaError_t e = pdl::launch(kernel, grid, dim3((wide ? kWideWarps : kWarps) * 32), s, static_cast<T*>(out),
                              static_cast<const T*>(q), static_cast<const T*>(cache), bt, ctx, slopes, ws,
                              static_cast<int>(B), static_cast<int>(H), static_cast<int>(KVH), static_cast<int>(BS),
                              bt_stride, q_stride, static_cast<int>(parts), scale, nk, counters);
  if (e == cudaSuccess && parts > 1 && counters == nullptr)
    e = pdl::launch(combine_kernel<T, D>, dim3(static_cast<unsigned>(H), static_cast<unsigned>(B)), dim3(kThreads), s,
                    static_cast<T*>(out), ws, ctx, static_cast<int>(B),
                    static_cast<int>(H), static_cast<int>(parts));
  return e;
}

// The head sizes the attention kernel is compiled for: the switch below and
// decode_attention_supports() both expand this list.
#define DEJAVU_HEAD_DIMS(X) X(16) X(32) X(64) X(80) X(96) X(128)

template <typename T>
cudaError_t dispatch_head_dim(int64_t D, void* out, const void* q, const void* cache, const int64_t* bt,
                              const int64_t* ctx, const float* slopes, float* ws, int64_t B, int64_t H, int64_t KVH,
                              int64_t BS, int64_t bt_stride, int64_t q_stride, int64_t parts, int64_t grid_parts,
                              float scale, const DecodeFusion& f, cudaStream_t s) {
#define DEJAVU_HEAD_DIM_CASE(d)                                                                             \
  case d:                                                                                                   \
    return launch_attention<T, d>(out, q, cache, bt, ctx, slopes, ws, B, H, KVH, BS, bt_stride, q_stride,   \
                                  parts, grid_parts, scale, f, s);
  switch (D) {
    DEJAVU_HEAD_DIMS(DEJAVU_HEAD_DIM_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DEJAVU_HEAD_DIM_CASE
}

// Calls f(T{}) with T the element type of `dtype`; false for an unknown code.
template <typename F>
bool with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return true;
    case DType::kFloat16:
      f(__half{});
      return true;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      return true;
  }
  return false;
}

std::string error_text(cudaError_t e) { return e == cudaSuccess ? "" : cudaGetErrorString(e); }

}  // namespace

bool decode_attention_supports(int64_t d) {
#define DEJAVU_HEAD_DIM_IS(x) d == x ||
  return DEJAVU_HEAD_DIMS(DEJAVU_HEAD_DIM_IS) false;
#undef DEJAVU_HEAD_DIM_IS
}

int64_t decode_attention_workspace(int64_t B, int64_t H, int64_t D, int64_t parts) {
  return parts > 1 ? B * H * parts * (D + 2) : 0;
}

std::string write_kv_cache(void* cache, const void* k, const void* v, const int64_t* slot_blocks,
                           const int64_t* slot_offsets, int64_t n, int64_t KVH, int64_t D, int64_t BS,
                           int64_t k_stride, int64_t v_stride, DType dtype, void* stream, void* ring_layer,
                           const int64_t* ring_rows) {
  if (n <= 0) return "";
  if (ring_layer != nullptr && ring_rows == nullptr) return "write_kv_cache: a ring needs its rows";
  const int64_t row = KVH * D;
  const int threads = row >= 256 ? 256 : 128;
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSuccess;
  const bool known = with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    e = pdl::launch(write_kv_kernel<T>, dim3(static_cast<unsigned>(n)), dim3(threads), s, static_cast<T*>(cache),
                    static_cast<const T*>(k), static_cast<const T*>(v), slot_blocks, slot_offsets, row, BS, k_stride,
                    v_stride, static_cast<T*>(ring_layer), ring_rows, kv_store_vectors());
  });
  if (!known) return "write_kv_cache: unsupported dtype code";
  return error_text(e);
}

std::string paged_decode_attention(void* out, const void* q, const void* cache, const int64_t* bt,
                                   const int64_t* ctx, const float* slopes, float* ws, int64_t B, int64_t H,
                                   int64_t KVH, int64_t D, int64_t BS, int64_t bt_stride, int64_t q_stride,
                                   int64_t parts, int64_t grid_parts, float scale, DType dtype, void* stream,
                                   const DecodeFusion& fusion) {
  if (B <= 0) return "";
  if (grid_parts < 1 || grid_parts > parts) grid_parts = parts;
  if (!decode_attention_supports(D)) return "paged_decode_attention: unsupported head_dim " + std::to_string(D);
  if (KVH <= 0 || H % KVH != 0) return "paged_decode_attention: num_heads must be a multiple of num_kv_heads";
  if (parts < 1 || (parts > 1 && ws == nullptr)) return "paged_decode_attention: a workspace is needed for parts > 1";
  if ((fusion.k_new == nullptr) != (fusion.v_new == nullptr))
    return "paged_decode_attention: give both the new K and V, or neither";
  if (fusion.ring_layer != nullptr && (fusion.k_new == nullptr || fusion.ring_rows == nullptr))
    return "paged_decode_attention: a ring needs the new K/V and its rows";
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSuccess;
  const bool known = with_dtype(dtype, [&](auto tag) {
    e = dispatch_head_dim<decltype(tag)>(D, out, q, cache, bt, ctx, slopes, ws, B, H, KVH, BS, bt_stride, q_stride,
                                         parts, grid_parts, scale, fusion, s);
  });
  if (!known) return "paged_decode_attention: unsupported dtype code";
  return error_text(e);
}

}  // namespace dejavu
