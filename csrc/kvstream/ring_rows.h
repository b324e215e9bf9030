// The step ring's row rule, in one place: ReplicaSender::ring_stage reserves rows by it, the
// greedy kernel (kernels/greedy.cu) advances CUDA graphs' ring rows by it, and the engine
// (dejavu._C.next_ring_row, engine/cuda_graphs.py) predicts the sender's next reservation by it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DEJAVU_HOST_DEVICE __host__ __device__
#else
#define DEJAVU_HOST_DEVICE
#endif

namespace dejavu {

// The first of n consecutive rows reserved at row `at` of a ring of `size` rows: `at`, or row 0
// where they would run past the end (rows of one step stay consecutive).
DEJAVU_HOST_DEVICE inline int64_t ring_rows_from(int64_t at, int64_t n, int64_t size) {
  return at + n > size ? 0 : at;
}

// The first row reserved for a step of n rows after one that took n rows from `first`, when the
// sender is not behind; -1 where `first` or `size` is (no ring rows).
DEJAVU_HOST_DEVICE inline int64_t next_ring_row(int64_t first, int64_t n, int64_t size) {
  if (first < 0 || size <= 0) return -1;
  return ring_rows_from((first + n) % size, n, size);
}

}  // namespace dejavu
