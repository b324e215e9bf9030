#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kvstream/cuda_copy.h"
#include "kernels/env.h"

namespace dejavu {

namespace {

// Work units are (span, segment) pairs: segment k of span i covers bytes [k*seg, (k+1)*seg), so a
// few large spans still spread over every SM; thread blocks stride over the units (when the grid
// is capped, see copy_grid_cap). 16-byte
// accesses when everything is aligned, four in flight per thread.
__global__ void copy_spans_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                  const int64_t* __restrict__ desc, int64_t n, int64_t segs, int64_t seg) {
  for (int64_t u = blockIdx.x; u < n * segs; u += gridDim.x) {
    const int64_t i = u / segs;
    const int64_t so = desc[3 * i], dof = desc[3 * i + 1], total = desc[3 * i + 2];
    const int64_t begin = (u % segs) * seg;
    if (begin >= total) continue;
    const int64_t nb = total - begin < seg ? total - begin : seg;
    const uint8_t* s = src + so + begin;
    uint8_t* d = dst + dof + begin;
    const bool aligned = ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | nb) & 15) == 0;
    if (aligned) {
      const uint4* s4 = reinterpret_cast<const uint4*>(s);
      uint4* d4 = reinterpret_cast<uint4*>(d);
      const int64_t n4 = nb / 16;
      const int64_t step = blockDim.x;
      int64_t j = threadIdx.x;
      for (; j + 3 * step < n4; j += 4 * step) {  // four loads in flight before the stores
        const uint4 a = s4[j], b = s4[j + step], c = s4[j + 2 * step], e = s4[j + 3 * step];
        d4[j] = a;
        d4[j + step] = b;
        d4[j + 2 * step] = c;
        d4[j + 3 * step] = e;
      }
      for (; j < n4; j += step) d4[j] = s4[j];
    } else {
      for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) d[j] = s[j];
    }
  }
}

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace {
// Thread blocks of one span copy: one per work unit by default (measured fastest alone on the H200:
// 1.14 TB/s gathering 16-token blocks, against 0.86-1.0 with 4 blocks per SM); DEJAVU_COPY_BLOCKS=N
// caps the grid at N blocks (they then stride over the units), leaving SMs to kernels beside it.
int64_t copy_grid_cap() {
  static const int64_t cap = [] {
    const int64_t n = env::integer("DEJAVU_COPY_BLOCKS", 0);
    return n > 0 ? n : (int64_t{1} << 31) - 1;
  }();
  return cap;
}
}  // namespace

std::string cuda_copy_spans(const void* src, void* dst, const int64_t* desc, int64_t n, void* stream,
                            int64_t max_bytes) {
  if (n <= 0) return "";
  // Segments of 64 KiB when the caller knows the largest span and it is larger than that.
  constexpr int64_t kSeg = 64 << 10;
  const int64_t segs = max_bytes > kSeg ? (max_bytes + kSeg - 1) / kSeg : 1;
  const int64_t seg = segs > 1 ? ((max_bytes + segs - 1) / segs + 15) / 16 * 16 : INT64_MAX;  // keeps 16-B alignment
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(n * segs, copy_grid_cap()));
  copy_spans_kernel<<<static_cast<unsigned>(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), desc, n, segs, seg);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("copy_spans launch failed: ") + cudaGetErrorString(err);
  return "";
}

namespace {
#define DJV_CUDA(call)                                                                         \
  do {                                                                                         \
    cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) return std::string(#call " failed: ") + cudaGetErrorString(e_);  \
  } while (0)
}  // namespace

std::string cuda_staged_copy(void* cache, void* host, const int64_t* desc, const std::vector<int64_t>& piece_rows,
                             const std::vector<int64_t>& piece_bytes, void* staging0, void* staging1,
                             void* kernel_stream, void* dma_stream, bool out) {
  auto ks = static_cast<cudaStream_t>(kernel_stream);
  auto ds = static_cast<cudaStream_t>(dma_stream);
  uint8_t* stage[2] = {static_cast<uint8_t*>(staging0), static_cast<uint8_t*>(staging1)};
  uint8_t* h = static_cast<uint8_t*>(host);
  cudaEvent_t ready[2], freed[2];
  bool has_freed[2] = {false, false};
  for (int k = 0; k < 2; ++k) {
    DJV_CUDA(cudaEventCreateWithFlags(&ready[k], cudaEventDisableTiming));
    DJV_CUDA(cudaEventCreateWithFlags(&freed[k], cudaEventDisableTiming));
  }
  std::string err;
  int64_t base = 0;
  for (size_t i = 0; i < piece_bytes.size() && err.empty(); ++i) {
    const int k = static_cast<int>(i & 1);
    const int64_t n = piece_bytes[i];
    const int64_t r0 = piece_rows[i], rows = piece_rows[i + 1] - r0;
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, copy_grid_cap())));
    if (out) {
      if (has_freed[k] && cudaStreamWaitEvent(ks, freed[k], 0) != cudaSuccess) err = "cudaStreamWaitEvent failed";
      copy_spans_kernel<<<blocks, 256, 0, ks>>>(static_cast<const uint8_t*>(cache), stage[k], desc + 3 * r0, rows,
                                                1, INT64_MAX);
      if (cudaGetLastError() != cudaSuccess) err = "gather kernel launch failed";
      if (err.empty() && cudaEventRecord(ready[k], ks) != cudaSuccess) err = "cudaEventRecord failed";
      if (err.empty() && cudaStreamWaitEvent(ds, ready[k], 0) != cudaSuccess) err = "cudaStreamWaitEvent failed";
      if (err.empty()) {
        cudaError_t e = cudaMemcpyAsync(h + base, stage[k], static_cast<size_t>(n), cudaMemcpyDeviceToHost, ds);
        if (e != cudaSuccess) err = std::string("cudaMemcpyAsync D2H failed: ") + cudaGetErrorString(e);
      }
      if (err.empty() && cudaEventRecord(freed[k], ds) != cudaSuccess) err = "cudaEventRecord failed";
    } else {
      if (has_freed[k] && cudaStreamWaitEvent(ds, freed[k], 0) != cudaSuccess) err = "cudaStreamWaitEvent failed";
      if (err.empty()) {
        cudaError_t e = cudaMemcpyAsync(stage[k], h + base, static_cast<size_t>(n), cudaMemcpyHostToDevice, ds);
        if (e != cudaSuccess) err = std::string("cudaMemcpyAsync H2D failed: ") + cudaGetErrorString(e);
      }
      if (err.empty() && cudaEventRecord(ready[k], ds) != cudaSuccess) err = "cudaEventRecord failed";
      if (err.empty() && cudaStreamWaitEvent(ks, ready[k], 0) != cudaSuccess) err = "cudaStreamWaitEvent failed";
      if (err.empty()) {
        copy_spans_kernel<<<blocks, 256, 0, ks>>>(stage[k], static_cast<uint8_t*>(cache), desc + 3 * r0, rows,
                                                  1, INT64_MAX);
        if (cudaGetLastError() != cudaSuccess) err = "scatter kernel launch failed";
      }
      if (err.empty() && cudaEventRecord(freed[k], ks) != cudaSuccess) err = "cudaEventRecord failed";
    }
    has_freed[k] = true;
    base += n;
  }
  // Join: the stream that finishes last is waited on by the other, so the next transfer in this
  // direction cannot overwrite staging still in use.
  if (err.empty()) {
    cudaStream_t last = out ? ds : ks, other = out ? ks : ds;
    if (cudaEventRecord(ready[0], last) != cudaSuccess || cudaStreamWaitEvent(other, ready[0], 0) != cudaSuccess)
      err = "joining the copy streams failed";
  }
  for (int k = 0; k < 2; ++k) {
    cudaEventDestroy(ready[k]);  // released once their pending work completes
    cudaEventDestroy(freed[k]);
  }
  return err;
}

std::string cuda_set_device(int device) {
  DJV_CUDA(cudaSetDevice(device));
  return "";
}

std::string cuda_stream_new(void** stream) {
  cudaStream_t s = nullptr;
  DJV_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  *stream = s;
  return "";
}

void cuda_stream_free(void* stream) {
  if (stream) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

std::string cuda_event_new(void** event, bool blocking) {
  cudaEvent_t e = nullptr;
  DJV_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | (blocking ? cudaEventBlockingSync : 0)));
  *event = e;
  return "";
}

void cuda_event_free(void* event) {
  if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

std::string cuda_event_record(void* event, void* stream) {
  DJV_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
  return "";
}

std::string cuda_stream_wait_event(void* stream, void* event) {
  DJV_CUDA(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
  return "";
}

std::string cuda_event_wait(void* event) {
  DJV_CUDA(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
  return "";
}

std::string cuda_host_alloc(size_t bytes, void** host, void** device) {
  void* h = nullptr;
  DJV_CUDA(cudaHostAlloc(&h, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
  void* d = nullptr;
  if (cudaError_t e = cudaHostGetDevicePointer(&d, h, 0); e != cudaSuccess) {
    cudaFreeHost(h);
    return std::string("cudaHostGetDevicePointer failed: ") + cudaGetErrorString(e);
  }
  *host = h;
  *device = d;
  return "";
}

void cuda_host_free(void* host) {
  if (host) cudaFreeHost(host);
}

std::string cuda_dma_gather_slots(const void* cache, void* host, const int64_t* blocks, const int64_t* slots, int64_t n,
                                  int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t token_bytes,
                                  void* stream) {
  // The cache as a pitched 3-D volume: x = bytes within a row of block_size tokens (pitch: a K or V
  // half of a chunk), y = (block, K/V) rows, z = layers; a layer is 2 * num_blocks such rows. A slot's
  // K and V rows of every layer are then one box of token_bytes x 2 x num_layers.
  const size_t half = static_cast<size_t>(block_size * token_bytes);
  cudaMemcpy3DParms p{};
  p.srcPtr = make_cudaPitchedPtr(const_cast<void*>(cache), half, half, static_cast<size_t>(2 * num_blocks));
  p.dstPtr = make_cudaPitchedPtr(host, static_cast<size_t>(token_bytes), static_cast<size_t>(token_bytes),
                                 static_cast<size_t>(2 * n));
  p.extent = make_cudaExtent(static_cast<size_t>(token_bytes), 2, static_cast<size_t>(num_layers));
  p.kind = cudaMemcpyDeviceToHost;
  for (int64_t j = 0; j < n; ++j) {
    p.srcPos = make_cudaPos(static_cast<size_t>(slots[j] * token_bytes), static_cast<size_t>(2 * blocks[j]), 0);
    p.dstPos = make_cudaPos(0, static_cast<size_t>(2 * j), 0);
    DJV_CUDA(cudaMemcpy3DAsync(&p, static_cast<cudaStream_t>(stream)));
  }
  return "";
}

std::string cuda_dma_gather_blocks(const void* cache, void* host, const int64_t* blocks, int64_t n, int64_t num_layers,
                                   int64_t num_blocks, int64_t chunk_bytes, void* stream) {
  const size_t cb = static_cast<size_t>(chunk_bytes);
  for (int64_t j = 0; j < n; ++j)
    DJV_CUDA(cudaMemcpy2DAsync(static_cast<uint8_t*>(host) + j * cb, static_cast<size_t>(n) * cb,
                               static_cast<const uint8_t*>(cache) + blocks[j] * cb, static_cast<size_t>(num_blocks) * cb,
                               cb, static_cast<size_t>(num_layers), cudaMemcpyDeviceToHost,
                               static_cast<cudaStream_t>(stream)));
  return "";
}

std::string cuda_dma_copy_blocks(const void* src, void* dst, const std::vector<BlockRun>& runs, int64_t num_layers,
                                 int64_t src_blocks, int64_t dst_blocks, int64_t chunk_bytes, void* stream) {
  const size_t cb = static_cast<size_t>(chunk_bytes);
  const size_t sp = static_cast<size_t>(src_blocks) * cb, dp = static_cast<size_t>(dst_blocks) * cb;
  const auto s = static_cast<cudaStream_t>(stream);
  const auto* s8 = static_cast<const uint8_t*>(src);
  auto* d8 = static_cast<uint8_t*>(dst);
  // cudaMemcpy2D's pitches are limited (2^31 - 1 bytes on current GPUs); beyond that, one copy per layer.
  constexpr size_t kMaxPitch = (size_t{1} << 31) - 1;
  for (const BlockRun& r : runs) {
    const size_t width = static_cast<size_t>(r.count) * cb;
    const uint8_t* from = s8 + static_cast<size_t>(r.src) * cb;
    uint8_t* to = d8 + static_cast<size_t>(r.dst) * cb;
    if (sp <= kMaxPitch && dp <= kMaxPitch) {
      DJV_CUDA(cudaMemcpy2DAsync(to, dp, from, sp, width, static_cast<size_t>(num_layers), cudaMemcpyDefault, s));
    } else {
      for (int64_t l = 0; l < num_layers; ++l)
        DJV_CUDA(cudaMemcpyAsync(to + l * dp, from + l * sp, width, cudaMemcpyDefault, s));
    }
  }
  return "";
}

}  // namespace dejavu
