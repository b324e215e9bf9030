// dejavu._C, the kernels' part: paged decode attention and the KV write, small linear layers, add_norm,
// the greedy step end, programmatic dependent launch (csrc/kernels). dtype codes: 0 fp32, 1 fp16, 2 bf16.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kernels/attention.h"
#include "kernels/gemv.h"
#include "kernels/greedy.h"
#include "kernels/norm.h"
#include "kernels/pdl.h"

#include "bind.h"

namespace py = pybind11;
using namespace dejavu;
using dejavu::bind::as_ptr;

void dejavu::bind::bind_kernels(py::module_& m) {
  m.attr("decode_partition") = kDecodePartition;
  m.attr("decode_warps_max_rows") = kDecodeWarpsMaxRows;
  m.def("decode_attention_supports", &decode_attention_supports, py::arg("head_dim"));
  m.def("decode_attention_workspace", &decode_attention_workspace, py::arg("num_seqs"), py::arg("num_heads"),
        py::arg("head_dim"), py::arg("num_parts"), "Floats of workspace paged_decode_attention needs");
  m.def("write_kv_cache", [](uintptr_t cache, uintptr_t k, uintptr_t v, uintptr_t slot_blocks, uintptr_t slot_offsets,
                             int64_t n, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t k_stride,
                             int64_t v_stride, int dtype, uintptr_t stream, uintptr_t ring, uintptr_t ring_rows) {
    std::string err = write_kv_cache(as_ptr<void>(cache), as_ptr<const void>(k), as_ptr<const void>(v),
                                     as_ptr<const int64_t>(slot_blocks), as_ptr<const int64_t>(slot_offsets), n,
                                     kv_heads, head_dim, block_size, k_stride, v_stride, static_cast<DType>(dtype),
                                     as_ptr<void>(stream), as_ptr<void>(ring), as_ptr<const int64_t>(ring_rows));
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("cache"), py::arg("k"), py::arg("v"), py::arg("slot_blocks"), py::arg("slot_offsets"), py::arg("n"),
     py::arg("kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("k_stride"), py::arg("v_stride"),
     py::arg("dtype"), py::arg("stream") = 0, py::arg("ring") = 0, py::arg("ring_rows") = 0,
     "Store n new K/V rows into one layer's paged cache (negative block: skip); with a ring (this layer's part "
     "of a replication ring) also into row ring_rows[i] (negative: none)");
  m.def("paged_decode_attention", [](uintptr_t out, uintptr_t q, uintptr_t cache, uintptr_t block_tables,
                                     uintptr_t context_lens, uintptr_t alibi_slopes, uintptr_t workspace,
                                     int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                     int64_t block_size, int64_t bt_stride, int64_t q_stride, int64_t num_parts,
                                     int64_t grid_parts, float scale, int dtype, uintptr_t stream, uintptr_t k_new,
                                     uintptr_t v_new, int64_t k_stride, int64_t v_stride, uintptr_t ring,
                                     uintptr_t ring_rows, uintptr_t counters) {
    DecodeFusion fusion;
    fusion.k_new = as_ptr<const void>(k_new);
    fusion.v_new = as_ptr<const void>(v_new);
    fusion.k_stride = k_stride;
    fusion.v_stride = v_stride;
    fusion.ring_layer = as_ptr<void>(ring);
    fusion.ring_rows = as_ptr<const int64_t>(ring_rows);
    fusion.counters = as_ptr<unsigned>(counters);
    std::string err = paged_decode_attention(
        as_ptr<void>(out), as_ptr<const void>(q), as_ptr<const void>(cache), as_ptr<const int64_t>(block_tables),
        as_ptr<const int64_t>(context_lens), as_ptr<const float>(alibi_slopes), as_ptr<float>(workspace), num_seqs,
        num_heads, kv_heads, head_dim, block_size, bt_stride, q_stride, num_parts, grid_parts, scale,
        static_cast<DType>(dtype), as_ptr<void>(stream), fusion);
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("out"), py::arg("q"), py::arg("cache"), py::arg("block_tables"), py::arg("context_lens"),
     py::arg("alibi_slopes"), py::arg("workspace"), py::arg("num_seqs"), py::arg("num_heads"), py::arg("kv_heads"),
     py::arg("head_dim"), py::arg("block_size"), py::arg("bt_stride"), py::arg("q_stride"), py::arg("num_parts"),
     py::arg("grid_parts"), py::arg("scale"), py::arg("dtype"), py::arg("stream") = 0, py::arg("k_new") = 0,
     py::arg("v_new") = 0, py::arg("k_stride") = 0, py::arg("v_stride") = 0, py::arg("ring") = 0,
     py::arg("ring_rows") = 0, py::arg("counters") = 0,
     "One query per sequence over its paged KV (split over num_parts partitions of decode_partition keys); "
     "with k_new/v_new it first stores the new token's K/V at position context_len - 1; with counters "
     "(num_seqs * num_heads zero uint32) its last block per row combines the partitions");
  m.attr("small_linear_max_rows") = kSmallLinearMaxRows;
  m.attr("small_linear_norm_max_bytes") = kSmallLinearNormMaxBytes;
  m.def("small_linear", [](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, int64_t rows, int64_t out_features,
                           int64_t in_features, int64_t x_stride, int act, int dtype, uintptr_t stream,
                           uintptr_t norm_h, uintptr_t norm_a, uintptr_t norm_weight, uintptr_t norm_bias,
                           uintptr_t sum_out, float eps, int rms, bool out_f32) {
    NormPrologue norm;
    norm.h = as_ptr<const void>(norm_h);
    norm.a = as_ptr<const void>(norm_a);
    norm.weight = as_ptr<const void>(norm_weight);
    norm.bias = as_ptr<const void>(norm_bias);
    norm.sum_out = as_ptr<void>(sum_out);
    norm.eps = eps;
    norm.rms = rms;
    const bool prologue = norm_h != 0 || norm_a != 0 || norm_weight != 0 || sum_out != 0;
    std::string err = small_linear(as_ptr<void>(y), as_ptr<const void>(x), as_ptr<const void>(w),
                                   as_ptr<const void>(bias), rows, out_features, in_features, x_stride, act,
                                   static_cast<DType>(dtype), as_ptr<void>(stream), prologue ? &norm : nullptr, out_f32);
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("rows"), py::arg("out_features"),
     py::arg("in_features"), py::arg("x_stride"), py::arg("act"), py::arg("dtype"), py::arg("stream") = 0,
     py::kw_only(), py::arg("norm_h") = 0, py::arg("norm_a") = 0, py::arg("norm_weight") = 0,
     py::arg("norm_bias") = 0, py::arg("sum_out") = 0, py::arg("eps") = 1e-5f, py::arg("rms") = 0,
     py::arg("out_f32") = false,
     "y = act(x @ w.T + bias) for a few rows of x (decode batches), fp16/bf16; with norm_h/norm_a/norm_weight/"
     "sum_out, x = norm(norm_h + norm_a) computed in the kernel (LayerNorm, or RMSNorm with rms=1) and "
     "norm_h + norm_a stored to sum_out; out_f32: y is fp32 (each output rounded to the dtype first)");
  m.def("set_programmatic_launch", &set_programmatic_launch, py::arg("mode"),
        "Programmatic dependent launch of the decode kernels: 1 on, 0 off, -1 from DEJAVU_PDL (default on); "
        "kernels use it on compute capability 9.0+ only. Captured CUDA graphs keep the launches they captured.");
  m.def("programmatic_launch", &programmatic_launch, "Whether the decode kernels ask for programmatic launch");
  m.def("programmatic_launch_active", &programmatic_launch_active,
        "Whether kernels launched now would use programmatic launch: the setting, a 9.0+ device and code "
        "compiled for 9.0+ (not JIT-compiled from the generic PTX)");
  m.attr("add_norm_max_hidden") = kAddNormMaxHidden;
  m.def("add_norm", [](uintptr_t sum_out, uintptr_t y, uintptr_t h, uintptr_t a, uintptr_t weight, uintptr_t bias,
                       int64_t rows, int64_t hidden, float eps, int rms, int dtype, uintptr_t stream) {
    std::string err = add_norm(as_ptr<void>(sum_out), as_ptr<void>(y), as_ptr<const void>(h), as_ptr<const void>(a),
                               as_ptr<const void>(weight), as_ptr<const void>(bias), rows, hidden, eps, rms,
                               static_cast<DType>(dtype), as_ptr<void>(stream));
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("sum_out"), py::arg("y"), py::arg("h"), py::arg("a"), py::arg("weight"), py::arg("bias"), py::arg("rows"),
     py::arg("hidden"), py::arg("eps"), py::arg("rms"), py::arg("dtype"), py::arg("stream") = 0,
     "sum = h + a; y = LayerNorm(sum) (rms=0) or RMSNorm(sum) (rms=1), one kernel, fp16/bf16");
  m.attr("step_fields") = kStepFields;
  m.def("greedy_part_words", &greedy_part_words, py::arg("rows"), py::arg("vocab"),
        "int32 words greedy_step_end needs for its slices' bests (0: a row is one block)");
  m.def("greedy_step_end", [](uintptr_t logits, int64_t rows, int64_t vocab, int64_t stride, uintptr_t tokens,
                              uintptr_t host_tokens, uintptr_t fields, int64_t bucket, int64_t max_blocks,
                              int64_t block_size, int64_t ring_size, uintptr_t counters, uintptr_t parts,
                              uintptr_t stream) {
    std::string err = greedy_step_end(as_ptr<const float>(logits), rows, vocab, stride, as_ptr<int64_t>(tokens),
                                      as_ptr<int64_t>(host_tokens), as_ptr<int64_t>(fields), bucket, max_blocks,
                                      block_size, ring_size, as_ptr<unsigned>(counters), as_ptr<int32_t>(parts),
                                      as_ptr<void>(stream));
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("stride"), py::arg("tokens"),
     py::arg("host_tokens") = 0, py::arg("fields") = 0, py::arg("bucket") = 0, py::arg("max_blocks") = 0,
     py::arg("block_size") = 0, py::arg("ring_size") = 0, py::arg("counters") = 0, py::arg("parts") = 0,
     py::arg("stream") = 0,
     "Each row's argmax of fp32 logits [rows, vocab] (row stride `stride`) to tokens (int64, and to pinned "
     "host_tokens unless 0); with fields, a graph bucket's decode inputs advanced for the next step (ring rows "
     "too, in a ring of ring_size rows, where ring_size > 0)");
}
