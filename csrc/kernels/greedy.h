// The end of a greedy decode step (the GPU fast path): each row's argmax over its logits, stored on
// the device and in pinned host memory, and the next step's inputs advanced in place, so that a
// decode step that follows it over the same sequences needs nothing from the host (CUDA graphs,
// engine/cuda_graphs.py). Pointers, sizes and a stream only: no torch. torch.argmax is the
// reference (and the CPU path).
#pragma once
#include <cstdint>
#include <string>

namespace dejavu {

// Threads of a greedy_step_end block that takes a whole row (DEJAVU_GREEDY_SPLIT=0, or a row of
// one slice), and of a block that takes one slice of a row.
constexpr int kGreedyThreads = 1024;
constexpr int kGreedySliceThreads = 256;
// Logits per slice (kGreedySliceThreads x 8: two rounds of four loads per thread) and most
// slices per row.
constexpr int64_t kGreedySliceLogits = 2048;
constexpr int64_t kGreedyMaxSlices = 1024;

// Slices greedy_step_end splits a row of `vocab` logits into: one block each (1 where
// DEJAVU_GREEDY_SPLIT=0, the single-block kernel, a baseline for benchmarks; 1 past INT32_MAX
// logits, since a slice's best index is stored as int32).
int64_t greedy_slices(int64_t vocab);
// int32 words of device memory greedy_step_end needs for its slices' bests at `rows` rows (0:
// none; the row is one block).
int64_t greedy_part_words(int64_t rows, int64_t vocab);

// Per-row fields of a bucket's decode inputs, before the block tables (see `fields` below).
constexpr int kStepFields = 6;

// For each row r < rows of logits ([rows, vocab] fp32, row stride `stride` elements):
//   token = the index of the row's largest value (the first of equal ones; a NaN counts as the
//   largest, as torch.argmax has it); tokens[r] = token, and host_tokens[r] = token unless
//   host_tokens is null (pinned memory the device can write).
// With `fields` (not null), the decode inputs of a bucket of `bucket` rows as the engine's graphs
// lay them out (int64: ids, positions, slot blocks, slot offsets, context lengths, ring rows, each
// `bucket` long, then block tables [bucket, max_blocks]) are advanced for the next step of a row
// whose slot block is >= 0 (a live row; padding rows keep -1): id = token, position + 1, context
// length = position + 2, slot offset = (position + 1) % block_size, slot block = its block
// table's entry for position + 1 (or -1 past max_blocks), ring row -1, or with ring_size > 0 and
// a ring row >= 0 the row ReplicaSender::ring_stage reserves next for it (the live rows are the
// bucket's first n and take rows first..first+n-1 of a ring of ring_size rows; the next step's are
// the n rows from first + n, or from 0 where those would run past the end). The caller runs a step
// on those only where that block-table entry is current, and with ring rows only where ring_stage
// reserved exactly those rows. Needs rows <= bucket when fields is given.
// Where a row is in slices (greedy_part_words > 0): `counters`, `rows` zeroed uint32 on the device
// (one set per stream: launches on a stream never overlap, and each leaves them zeroed), and
// `parts`, greedy_part_words(rows, vocab) int32 words of any content.
std::string greedy_step_end(const float* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* tokens,
                            int64_t* host_tokens, int64_t* fields, int64_t bucket, int64_t max_blocks,
                            int64_t block_size, int64_t ring_size, unsigned* counters, int32_t* parts, void* stream);

}  // namespace dejavu
