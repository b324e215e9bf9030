// Device-side span copies (the "gather kernel" of buffered streaming). Compiled only when the
// build found nvcc; otherwise the stubs report that CUDA is not built in.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dejavu {

// True when this build contains the CUDA kernels.
bool cuda_compiled();

// Number of visible CUDA devices, 0 when none (or no driver, or not compiled).
int cuda_device_count();

// Copies n spans on `stream` (a cudaStream_t, 0 for the legacy stream). `desc` is a device array
// of n triples (src_offset, dst_offset, bytes), all in bytes from src / dst. Returns "" on success,
// else the CUDA error text. Asynchronous: completion is ordered on the stream. max_bytes, when > 0,
// is at least the largest span: spans above 64 KiB are then split over several thread blocks.
std::string cuda_copy_spans(const void* src, void* dst, const int64_t* desc, int64_t n, void* stream,
                            int64_t max_bytes = 0);

// Staged transfer between the cache (device) and a pinned host buffer, pipelined over two device
// staging buffers: piece i+1's gather kernel runs on kernel_stream while dma_stream moves piece i
// (out = cache -> host), or piece i+1's DMA overlaps piece i's scatter kernel (out = false).
// desc holds the rows of every piece (packed offsets relative to the piece), piece_rows the first
// row of each piece plus an end marker. On return every operation is enqueued; completion is the
// last work on `dma_stream` (out) or `kernel_stream` (in), and both streams are joined on it.
std::string cuda_staged_copy(void* cache, void* host, const int64_t* desc, const std::vector<int64_t>& piece_rows,
                             const std::vector<int64_t>& piece_bytes, void* staging0, void* staging1,
                             void* kernel_stream, void* dma_stream, bool out);

}  // namespace dejavu
