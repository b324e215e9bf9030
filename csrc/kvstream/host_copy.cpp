#include "kvstream/host_copy.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <thread>
#include <vector>

namespace dejavu {

namespace {

constexpr int64_t kBytesPerThread = 8 << 20;  // below this, threads cost more than they give

// Calls fn(first_span, last_span, packed_offset_of_first) over roughly equal byte ranges.
template <typename Fn>
int64_t for_span_ranges(const Span* spans, size_t n, int max_threads, Fn fn) {
  std::vector<int64_t> packed(n + 1, 0);
  for (size_t i = 0; i < n; ++i) packed[i + 1] = packed[i] + spans[i].bytes;
  const int64_t total = packed[n];
  int threads = static_cast<int>(std::min<int64_t>(std::max(1, max_threads), total / kBytesPerThread));
  threads = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  if (threads == 1) {
    fn(size_t{0}, n, int64_t{0});
    return total;
  }
  std::vector<std::thread> pool;
  size_t begin = 0;
  for (int t = 0; t < threads; ++t) {
    const int64_t target = total * (t + 1) / threads;
    size_t end = begin;
    while (end < n && (packed[end] < target || end == begin)) ++end;
    if (t == threads - 1) end = n;
    if (begin < end) pool.emplace_back(fn, begin, end, packed[begin]);
    begin = end;
  }
  for (auto& th : pool) th.join();
  return total;
}

}  // namespace

int64_t host_gather(const uint8_t* base, const Span* spans, size_t n, uint8_t* dst, int max_threads) {
  return for_span_ranges(spans, n, max_threads, [=](size_t b, size_t e, int64_t off) {
    for (size_t i = b; i < e; ++i) {
      std::memcpy(dst + off, base + spans[i].offset, static_cast<size_t>(spans[i].bytes));
      off += spans[i].bytes;
    }
  });
}

int64_t host_scatter(uint8_t* base, const Span* spans, size_t n, const uint8_t* src, int max_threads) {
  return for_span_ranges(spans, n, max_threads, [=](size_t b, size_t e, int64_t off) {
    for (size_t i = b; i < e; ++i) {
      std::memcpy(base + spans[i].offset, src + off, static_cast<size_t>(spans[i].bytes));
      off += spans[i].bytes;
    }
  });
}

int64_t host_copy_rows(const uint8_t* src, uint8_t* dst, const int64_t* rows, size_t n, int max_threads) {
  // for_span_ranges splits by bytes; each Span is (row index, bytes) so a range maps back to rows.
  std::vector<Span> spans(n);
  for (size_t i = 0; i < n; ++i) spans[i] = Span{static_cast<int64_t>(i), rows[3 * i + 2]};
  return for_span_ranges(spans.data(), n, max_threads, [=](size_t b, size_t e, int64_t) {
    for (size_t i = b; i < e; ++i)
      std::memcpy(dst + rows[3 * i + 1], src + rows[3 * i], static_cast<size_t>(rows[3 * i + 2]));
  });
}

namespace {
std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (0x82F63B78u ^ (c >> 1)) : (c >> 1);
    t[i] = c;
  }
  return t;
}

uint32_t crc32c_table(const uint8_t* data, size_t n, uint32_t c) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  for (size_t i = 0; i < n; ++i) c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__)
// SSE4.2 CRC32 instruction: the same polynomial (Castagnoli), 8 bytes per instruction.
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const uint8_t* data, size_t n, uint32_t c) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, data, 8);
    c64 = __builtin_ia32_crc32di(c64, v);
    data += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c64);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *data++);
  return c32;
}

// Three independent CRC chains over consecutive lanes of kLane bytes, then joined: the instruction
// has a latency of 3 cycles and a throughput of 1, so one chain runs it at a third of its speed.
// Joining uses linearity: crc(A || B, c) = crc(B, 0) ^ shift(crc(A, c)), where shift(x) = crc(kLane
// zero bytes, x) is linear in x, so four byte-indexed tables give it.
constexpr size_t kLane = 4096;

struct LaneShift {
  std::array<std::array<uint32_t, 256>, 4> t;
  uint32_t operator()(uint32_t x) const {
    return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24];
  }
};

const LaneShift& lane_shift() {
  static const LaneShift s = [] {
    static const uint8_t zeros[kLane] = {};
    LaneShift s{};
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) s.t[k][v] = crc32c_sse42(zeros, kLane, v << (8 * k));
    return s;
  }();
  return s;
}

// Three raw CRC registers advanced over the first n bytes (n a multiple of 8) of three buffers.
__attribute__((target("sse4.2"))) void crc3_raw(const uint8_t* const data[3], size_t n, uint32_t c[3]) {
  uint64_t a = c[0], b = c[1], d = c[2];
  for (size_t i = 0; i < n; i += 8) {
    uint64_t va, vb, vd;
    std::memcpy(&va, data[0] + i, 8);
    std::memcpy(&vb, data[1] + i, 8);
    std::memcpy(&vd, data[2] + i, 8);
    a = __builtin_ia32_crc32di(a, va);
    b = __builtin_ia32_crc32di(b, vb);
    d = __builtin_ia32_crc32di(d, vd);
  }
  c[0] = static_cast<uint32_t>(a), c[1] = static_cast<uint32_t>(b), c[2] = static_cast<uint32_t>(d);
}

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42_3way(const uint8_t* data, size_t n, uint32_t c) {
  if (n >= 3 * kLane) {
    const LaneShift& shift = lane_shift();
    do {
      const uint8_t* lanes[3] = {data, data + kLane, data + 2 * kLane};
      uint32_t r[3] = {c, 0, 0};
      crc3_raw(lanes, kLane, r);
      c = shift(shift(r[0]) ^ r[1]) ^ r[2];
      data += 3 * kLane;
      n -= 3 * kLane;
    } while (n >= 3 * kLane);
  }
  return crc32c_sse42(data, n, c);
}

__attribute__((target("sse4.2"))) void crc32c_x3_sse42(const uint8_t* const data[3], size_t n, uint32_t crc[3]) {
  const size_t whole = n & ~size_t{7};
  uint32_t r[3] = {~crc[0], ~crc[1], ~crc[2]};
  crc3_raw(data, whole, r);
  for (int k = 0; k < 3; ++k) crc[k] = ~crc32c_sse42(data[k] + whole, n - whole, r[k]);
}
#endif

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t n, uint32_t seed) {
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  if (hw) return ~crc32c_sse42_3way(data, n, ~seed);
#endif
  return ~crc32c_table(data, n, ~seed);
}

void crc32c_x3(const uint8_t* const data[3], size_t n, uint32_t crc[3]) {
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  if (hw) {
    crc32c_x3_sse42(data, n, crc);
    return;
  }
#endif
  for (int i = 0; i < 3; ++i) crc[i] = crc32c(data[i], n, crc[i]);
}

void crc32c_items(const uint8_t* base, const int64_t* item_offsets, int64_t n_items, const int64_t* piece_offsets,
                  int64_t n_pieces, int64_t piece_bytes, int64_t* out, int threads) {
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      uint32_t c = 0;
      for (int64_t p = 0; p < n_pieces; ++p)
        c = crc32c(base + item_offsets[j] + piece_offsets[p], static_cast<size_t>(piece_bytes), c);
      out[j] = c;
    }
  };
  const int64_t total = n_items * n_pieces * piece_bytes;
  int t = std::max(1, std::min<int>(threads, static_cast<int>(total >> 22)));  // >= 4 MiB per thread
  t = static_cast<int>(std::min<int64_t>(t, std::max<int64_t>(n_items, 1)));
  if (t <= 1) {
    run(0, n_items);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (n_items + t - 1) / t;
  for (int k = 0; k < t; ++k) {
    const int64_t lo = k * per, hi = std::min(n_items, lo + per);
    if (lo < hi) pool.emplace_back(run, lo, hi);
  }
  for (auto& th : pool) th.join();
}

}  // namespace dejavu
