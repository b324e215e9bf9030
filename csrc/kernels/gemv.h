// Linear layers at decode batch sizes (the GPU fast path). A decode step multiplies a handful of
// rows by each weight matrix: the step is a read of the weights, and a GEMM library's small-M
// kernels leave much of the memory bandwidth unused on matrices of a few MB. Pointers, sizes and a
// stream only: no torch. torch.nn.functional.linear is the reference and the path for larger batches.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/attention.h"  // DType

namespace dejavu {

// Most input rows small_linear takes.
constexpr int64_t kSmallLinearMaxRows = 4;

// y[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]) for m < rows, n < out_features, with fp32
// accumulation. x: [rows, in_features], row stride x_stride elements; w: [out_features,
// in_features] contiguous; bias: [out_features] or null; y: [rows, out_features] contiguous.
// fp16 or bf16. Needs 1 <= rows <= kSmallLinearMaxRows, in_features and x_stride multiples of 8,
// and x, w 16-byte aligned. act: 0 none, 1 ReLU.
std::string small_linear(void* y, const void* x, const void* w, const void* bias, int64_t rows,
                         int64_t out_features, int64_t in_features, int64_t x_stride, int act, DType dtype,
                         void* stream);

}  // namespace dejavu
