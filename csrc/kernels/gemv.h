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

// Most bytes of input (rows x in_features elements) a norm prologue holds in shared memory.
constexpr int64_t kSmallLinearNormMaxBytes = 40 * 1024;

// A residual add and norm in front of the linear layer (the add_norm of norm.h, computed by every
// thread block for its own use): x = norm(h + a), and h + a is stored to sum_out. h, a, sum_out:
// [rows, in_features] contiguous; weight (and bias, which may be null) [in_features]. sum_out
// must not alias h or a (every block reads them while one writes it).
struct NormPrologue {
  const void* h = nullptr;
  const void* a = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* sum_out = nullptr;
  float eps = 0.f;
  int rms = 0;  // 0 LayerNorm, 1 RMSNorm
};

// y[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]) for m < rows, n < out_features, with fp32
// accumulation. x: [rows, in_features], row stride x_stride elements; w: [out_features,
// in_features] contiguous; bias: [out_features] or null; y: [rows, out_features] contiguous.
// fp16 or bf16. Needs 1 <= rows <= kSmallLinearMaxRows, in_features and x_stride multiples of 8,
// and x, w 16-byte aligned. act: 0 none, 1 ReLU. With `norm`, x is norm(h + a) as NormPrologue says
// (x and x_stride are then unused): in_features up to kAddNormMaxHidden and rows x in_features
// elements within kSmallLinearNormMaxBytes; every pointer 16-byte aligned. out_f32: y is fp32, each
// output rounded to the dtype first (the dtype's outputs, converted: an LM head's fp32 logits).
std::string small_linear(void* y, const void* x, const void* w, const void* bias, int64_t rows,
                         int64_t out_features, int64_t in_features, int64_t x_stride, int act, DType dtype,
                         void* stream, const NormPrologue* norm = nullptr, bool out_f32 = false);

}  // namespace dejavu
