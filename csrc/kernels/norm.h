// A residual add fused with the LayerNorm or RMSNorm that follows it (the GPU fast path): one
// kernel and one read of each row instead of an add and a norm. Pointers, sizes and a stream
// only; the torch ops are the reference.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/attention.h"  // DType

namespace dejavu {

// Widest row add_norm takes (elements); wider ones use the torch ops.
constexpr int64_t kAddNormMaxHidden = 8192;

// For each of `rows` rows (contiguous, `hidden` elements): sum = h + a, rounded to the dtype and
// stored in sum_out; y = LayerNorm(sum) * weight + bias (rms == 0; bias may be null), or
// y = round(sum / sqrt(mean(sum^2) + eps)) * weight (rms == 1, RMSNorm as Llama's). Statistics in
// fp32. fp16 or bf16; hidden a multiple of 8 up to kAddNormMaxHidden; 16-byte aligned rows.
std::string add_norm(void* sum_out, void* y, const void* h, const void* a, const void* weight, const void* bias,
                     int64_t rows, int64_t hidden, float eps, int rms, DType dtype, void* stream);

}  // namespace dejavu
