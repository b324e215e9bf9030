// Device-side span copies (the "gather kernel" of buffered streaming). Compiled only when the
// build found nvcc; otherwise the stubs report that CUDA is not built in.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kvstream/layout.h"

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

// Thin runtime wrappers for a host thread of our own that moves device memory (the replica sender),
// so code outside the .cu files needs no CUDA headers. Each returns "" or the CUDA error text.
std::string cuda_set_device(int device);
std::string cuda_stream_new(void** stream);                 // a non-blocking stream
void cuda_stream_free(void* stream);
std::string cuda_event_new(void** event, bool blocking);    // blocking: waiting sleeps, no spinning
void cuda_event_free(void* event);
std::string cuda_event_record(void* event, void* stream);
std::string cuda_stream_wait_event(void* stream, void* event);
std::string cuda_event_wait(void* event);
// Copy-engine (DMA) gathers from a paged cache ([layers][blocks][K, V][block_size][token_bytes]) into
// pinned host memory on `stream`, using no SMs (so nothing is taken from kernels running beside
// them). Slots: one 3-D copy per slot (its K and V rows of every layer), packed [layers][n][K, V][token
// bytes]. Blocks: one 2-D copy per block (its chunk of every layer), packed [layers][n][chunk].
std::string cuda_dma_gather_slots(const void* cache, void* host, const int64_t* blocks, const int64_t* slots, int64_t n,
                                  int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t token_bytes,
                                  void* stream);
std::string cuda_dma_gather_blocks(const void* cache, void* host, const int64_t* blocks, int64_t n, int64_t num_layers,
                                   int64_t num_blocks, int64_t chunk_bytes, void* stream);
// Copy-engine block copies between two paged caches laid out [layers][blocks][chunk] (either one
// may be pinned host memory): for each run, blocks run.src .. run.src+count-1 of src go to run.dst ..
// of dst, every layer, as one 2-D copy on `stream` (per-layer copies where a pitch exceeds the 2-D
// limit). No SMs are used, so kernels running beside it keep the whole GPU. Note that a copy
// engine works through its queue in order: a small host-to-device memcpy enqueued after a large
// one waits for it, whichever stream it is on (docs/BENCHMARKS.md, "Microbatch swapping").
std::string cuda_dma_copy_blocks(const void* src, void* dst, const std::vector<BlockRun>& runs, int64_t num_layers,
                                 int64_t src_blocks, int64_t dst_blocks, int64_t chunk_bytes, void* stream);
// Pinned, portable, device-mapped host memory: *host for the CPU, *device for kernels.
std::string cuda_host_alloc(size_t bytes, void** host, void** device);
void cuda_host_free(void* host);

}  // namespace dejavu
