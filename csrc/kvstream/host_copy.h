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

// CRC-32C (Castagnoli) of a buffer; `seed` chains calls. Used to checksum chunks on the wire and on disk.
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t seed = 0);

}  // namespace dejavu
