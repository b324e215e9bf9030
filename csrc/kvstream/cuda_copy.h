// Device-side span copies (the "gather kernel" of buffered streaming). Compiled only when the
// build found nvcc; otherwise the stubs report that CUDA is not built in.
#pragma once
#include <cstdint>
#include <string>

namespace dejavu {

// True when this build contains the CUDA kernels.
bool cuda_compiled();

// Number of visible CUDA devices, 0 when none (or no driver, or not compiled).
int cuda_device_count();

// Copies n spans on `stream` (a cudaStream_t, 0 for the legacy stream). `desc` is a device array
// of n triples (src_offset, dst_offset, bytes), all in bytes from src / dst. Returns "" on success,
// else the CUDA error text. Asynchronous: completion is ordered on the stream.
std::string cuda_copy_spans(const void* src, void* dst, const int64_t* desc, int64_t n, void* stream);

}  // namespace dejavu
