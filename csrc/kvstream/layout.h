// Layout of a paged KV cache and the arithmetic that turns regions of it into copy spans.
//
// One cache (one worker, one tensor-parallel shard) is a single allocation laid out as
//   [num_layers][num_blocks][2 (K, V)][block_size][num_kv_heads][head_dim]
// so one (layer, block) pair -- a "chunk" -- is contiguous, K before V. Layer-by-layer streaming
// moves the chunks of one layer; swapping moves the chunks of some blocks over a layer range;
// token-level streaming moves one token slot's K and V rows of each chunk.
#pragma once
#include <cstdint>
#include <vector>

namespace dejavu {

struct Span {
  int64_t offset;  // bytes from the start of the cache
  int64_t bytes;
};

struct KVLayout {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;
  int64_t block_size = 0;  // tokens per block
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t elem_size = 0;  // bytes per element

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
  int64_t token_bytes() const { return num_kv_heads * head_dim * elem_size; }  // one token, K or V
  int64_t half_chunk_bytes() const { return block_size * token_bytes(); }       // K or V of a chunk
  int64_t chunk_bytes() const { return 2 * half_chunk_bytes(); }
  int64_t total_bytes() const { return num_layers * num_blocks * chunk_bytes(); }
  int64_t chunk_offset(int64_t layer, int64_t block) const {
    return (layer * num_blocks + block) * chunk_bytes();
  }
  // kv: 0 for K, 1 for V.
  int64_t token_offset(int64_t layer, int64_t block, int64_t slot, int64_t kv) const {
    return chunk_offset(layer, block) + kv * half_chunk_bytes() + slot * token_bytes();
  }
};

// Spans for whole chunks: every layer in `layers` times every block in `blocks`, layer-major
// (all blocks of layers[0], then layers[1], ...). Adjacent spans are merged.
std::vector<Span> chunk_spans(const KVLayout& layout, const std::vector<int64_t>& layers,
                              const std::vector<int64_t>& blocks);

// Spans for single token slots: for every layer, for every (block, slot) pair, the K row then
// the V row. Used for token-level streaming ("the newest token of these requests").
std::vector<Span> token_spans(const KVLayout& layout, const std::vector<int64_t>& layers,
                              const std::vector<int64_t>& blocks, const std::vector<int64_t>& slots);

// Block-to-block copies between two caches of the same chunk size: block src[i] -> block dst[i],
// grouped into runs where both sides are consecutive (src, src+1, ... -> dst, dst+1, ...), in the
// given order, so a run of any length is one strided copy over the layers. Throws
// std::invalid_argument when the lists differ in length or hold a negative id.
struct BlockRun {
  int64_t src;
  int64_t dst;
  int64_t count;
};
std::vector<BlockRun> block_runs(const std::vector<int64_t>& src, const std::vector<int64_t>& dst);

// Merge spans that touch end-to-start, keeping order. Packed order is unchanged by merging.
std::vector<Span> merge_adjacent(const std::vector<Span>& spans);

int64_t total_bytes(const std::vector<Span>& spans);

// Copy descriptors for the span-copy kernels: rows of (src_offset, dst_offset, bytes). `out` packs
// (cache -> buffer), otherwise unpacks (buffer -> cache). With piece_bytes > 0 the packed side is
// cut into pieces of at most piece_bytes, each with packed offsets starting at 0 (for a staging
// buffer of that size); piece_rows[i] is the first row of piece i (plus a final end marker).
struct CopyDesc {
  int64_t rows = 0;
  int64_t bytes = 0;
  std::vector<int64_t> piece_rows;
  std::vector<int64_t> piece_bytes;
};
// Writes at most `cap` rows into desc (3 int64 each); throws std::length_error if more are needed.
CopyDesc fill_copy_desc(const std::vector<Span>& spans, bool out, int64_t piece_bytes, int64_t* desc, int64_t cap);
// An upper bound on the rows fill_copy_desc writes.
int64_t copy_desc_rows_bound(const std::vector<Span>& spans, int64_t piece_bytes);

}  // namespace dejavu
