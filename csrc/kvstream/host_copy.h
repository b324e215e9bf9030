// Host gather/scatter: move a list of spans of a cache to/from one contiguous buffer.
// Large copies are split over a few threads (a single core cannot saturate host memory).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kvstream/layout.h"

namespace dejavu {

// Packs the spans of `base`, in order, into `dst`. Returns the bytes copied.
int64_t host_gather(const uint8_t* base, const Span* spans, size_t n_spans, uint8_t* dst, int max_threads = 4);

// Unpacks `src` (laid out as host_gather packs it) into the spans of `base`. Returns the bytes copied.
int64_t host_scatter(uint8_t* base, const Span* spans, size_t n_spans, const uint8_t* src, int max_threads = 4);

// Copies n rows (src_offset, dst_offset, bytes), `rows` holding 3n int64s, from `src` to `dst`:
// many blocks between a paged cache and scattered host ranges in one call. Returns bytes copied.
int64_t host_copy_rows(const uint8_t* src, uint8_t* dst, const int64_t* rows, size_t n, int max_threads = 4);

// CRC-32C (Castagnoli) of a buffer; `seed` chains calls. Used to checksum chunks on the wire and on disk.
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t seed = 0);
// Three CRCs at once over three buffers of n bytes each: crc[i] = crc32c(data[i], n, crc[i]) (three
// independent chains keep the CRC instruction busy; what a replica holder does per token slot).
void crc32c_x3(const uint8_t* const data[3], size_t n, uint32_t crc[3]);

// One CRC-32C per item, over the item's pieces in order, in place (no packing copy): item j's
// checksum covers the piece_bytes at base + item_offsets[j] + piece_offsets[p] for p = 0..n_pieces-1.
// Writes n_items values (as int64) to out; uses up to `threads` threads.
void crc32c_items(const uint8_t* base, const int64_t* item_offsets, int64_t n_items, const int64_t* piece_offsets,
                  int64_t n_pieces, int64_t piece_bytes, int64_t* out, int threads);

}  // namespace dejavu
