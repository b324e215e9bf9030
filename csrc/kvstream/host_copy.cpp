#include "kvstream/host_copy.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// Folding with carry-less multiplies (VPCLMULQDQ on 512-bit registers, four of them: 256 bytes a
// step), several times the CRC32 instruction's rate. A 128-bit block A (bit i: the coefficient of
// x^(127-i), as the data is reflected) moved D bits forward is A.lo * (x^(D+63) mod P) ^ A.hi *
// (x^(D-1) mod P): congruent to A * x^D, and the product's one-bit offset is in the exponents. The
// folded 16 bytes have the CRC of all the data before them, so the CRC32 instruction finishes them.
uint64_t xpow_lane(unsigned n) {  // x^n mod P, reflected into the top 32 bits of a 64-bit lane
  uint64_t r = 1;
  for (unsigned i = 0; i < n; ++i) {
    r <<= 1;
    if (r >> 32) r ^= 0x11EDC6F41ull;  // the Castagnoli polynomial, x^32 included
  }
  uint64_t lane = 0;
  for (unsigned d = 0; d < 32; ++d)
    if (r >> d & 1) lane |= uint64_t{1} << (63 - d);
  return lane;
}

// {x^(D+63), x^(D-1)} for D = 2048 (k[0]: a step), 512 (k[1]: register to register), and 384, 256
// and 128 (k[2..4]: lanes of the last register into its last).
struct FoldKeys {
  uint64_t k[5][2];
};

const FoldKeys& fold_keys() {
  static const FoldKeys f = [] {
    FoldKeys f{};
    const unsigned distance[5] = {2048, 512, 384, 256, 128};
    for (int i = 0; i < 5; ++i) f.k[i][0] = xpow_lane(distance[i] + 63), f.k[i][1] = xpow_lane(distance[i] - 1);
    return f;
  }();
  return f;
}

constexpr size_t kFoldMin = 1024;  // below this the CRC32 instruction alone is as fast

// Each 128-bit lane of a, moved forward by the distance k is for, XORed into next.
__attribute__((target("avx512f,vpclmulqdq"))) inline __m512i fold(__m512i a, __m512i k, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(a, k, 0x00), _mm512_clmulepi64_epi128(a, k, 0x11), next, 0x96);
}

__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2"))) uint32_t crc32c_fold(const uint8_t* data, size_t n, uint32_t c) {
  const FoldKeys& f = fold_keys();
  __m512i x[4];
  for (int i = 0; i < 4; ++i) x[i] = _mm512_loadu_si512(data + 64 * i);
  x[0] = _mm512_xor_si512(x[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(c))));
  data += 256, n -= 256;
  const __m512i step = _mm512_broadcast_i32x4(_mm_set_epi64x(f.k[0][1], f.k[0][0]));
  for (; n >= 256; data += 256, n -= 256)
    for (int i = 0; i < 4; ++i) x[i] = fold(x[i], step, _mm512_loadu_si512(data + 64 * i));
  const __m512i reg = _mm512_broadcast_i32x4(_mm_set_epi64x(f.k[1][1], f.k[1][0]));
  for (int i = 1; i < 4; ++i) x[i] = fold(x[i - 1], reg, x[i]);
  __m128i last = _mm512_extracti32x4_epi32(x[3], 3);
  const __m128i lanes[3] = {_mm512_extracti32x4_epi32(x[3], 0), _mm512_extracti32x4_epi32(x[3], 1),
                            _mm512_extracti32x4_epi32(x[3], 2)};
  for (int i = 0; i < 3; ++i) {
    const __m128i k = _mm_set_epi64x(f.k[2 + i][1], f.k[2 + i][0]);
    last = _mm_xor_si128(last, _mm_xor_si128(_mm_clmulepi64_si128(lanes[i], k, 0x00), _mm_clmulepi64_si128(lanes[i], k, 0x11)));
  }
  uint64_t r = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(last)));
  r = _mm_crc32_u64(r, static_cast<uint64_t>(_mm_extract_epi64(last, 1)));
  return crc32c_sse42_3way(data, n, static_cast<uint32_t>(r));
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
  static const bool folding = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
                           __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
  if (folding && n >= kFoldMin) return ~crc32c_fold(data, n, ~seed);
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
