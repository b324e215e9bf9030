// Decode-time kernels over the paged KV cache (the GPU fast path). Pointers, sizes and a stream
// only: no torch. The torch implementation in python/dejavu/models/layers.py is the reference.
//
// One layer's cache is [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim], contiguous.
#pragma once
#include <cstdint>
#include <string>

namespace dejavu {

// Element types of the kernels (the codes Python passes).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Head sizes the attention kernel is compiled for (others use the torch path).
bool decode_attention_supports(int64_t head_dim);

// Tokens per partition of the context: each (sequence, head) is split over ceil(context / this)
// thread blocks whose partial results a second kernel combines (split-K over the keys).
constexpr int64_t kDecodePartition = 128;

// Floats of workspace paged_decode_attention needs for num_parts > 1 (0 when num_parts == 1).
int64_t decode_attention_workspace(int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t num_parts);

// Stores n new K and V rows ([n, kv_heads, head_dim], row strides k_stride / v_stride elements)
// at (slot_blocks[i], slot_offsets[i]) of one layer's cache. Rows whose block is negative are
// skipped (padding of a captured batch). k, v and the cache share one dtype.
std::string write_kv_cache(void* cache, const void* k, const void* v, const int64_t* slot_blocks,
                           const int64_t* slot_offsets, int64_t n, int64_t num_kv_heads, int64_t head_dim,
                           int64_t block_size, int64_t k_stride, int64_t v_stride, DType dtype, void* stream,
                           void* ring_layer = nullptr, const int64_t* ring_rows = nullptr);

// What paged_decode_attention may do besides attending (all optional):
// - k_new / v_new ([num_seqs, num_kv_heads, head_dim], row strides k_stride / v_stride elements):
//   the new token's K and V, stored at position context_lens[b] - 1 of the cache through the block
//   table (what write_kv_cache would do for a decode step, in the same kernel) and used from there;
//   With ring_layer (a replication ring's layer in host memory, [rows, 2, kv_heads, head_dim]) the
//   new K/V also go to row ring_rows[b] (negative: none), as write_kv_cache writes them;
// - counters (num_seqs * num_heads unsigned, all 0): with num_parts > 1 the block that finishes
//   a row's last partition combines the partials, instead of a second kernel; they are 0 again
//   when the launch ends. One set of counters per stream (launches on one stream never overlap).
struct DecodeFusion {
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_stride = 0, v_stride = 0;
  void* ring_layer = nullptr;
  const int64_t* ring_rows = nullptr;
  unsigned* counters = nullptr;
};

// Up to this many (sequence, head) rows a decode step uses the attention kernel for small batches
// (latency-bound, "warps"), beyond it the one for large batches ("rows"). On an H200 (OPT-1.3B,
// fp16, context ~640) the warps kernel took 24% less time at batch 1 and 15% less at batch 8 (32
// heads: 32 and 256 rows), and 24% more at batch 32 (1024 rows).
constexpr int64_t kDecodeWarpsMaxRows = 512;

// One query per sequence ([num_seqs, num_heads, head_dim], row stride q_stride elements) attends
// to the first context_lens[b] tokens of its sequence, found through block_tables ([num_seqs,
// bt_stride] block ids). GQA when num_heads > num_kv_heads; alibi_slopes ([num_heads] float, or
// null) adds slope * key_position to each score. out: [num_seqs, num_heads, head_dim]; a sequence
// with context 0 gets zeros. num_parts must be at least ceil(max context / kDecodePartition);
// workspace holds decode_attention_workspace(...) floats when num_parts > 1. grid_parts (1 to
// num_parts; out of range: num_parts) is the grid's partition dimension: its thread blocks stride
// over the partitions, so a CUDA graph captured for a long max context does not launch a block per
// possible partition.
std::string paged_decode_attention(void* out, const void* q, const void* cache, const int64_t* block_tables,
                                   const int64_t* context_lens, const float* alibi_slopes, float* workspace,
                                   int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, int64_t bt_stride, int64_t q_stride, int64_t num_parts,
                                   int64_t grid_parts, float scale, DType dtype, void* stream,
                                   const DecodeFusion& fusion = DecodeFusion{});

}  // namespace dejavu
