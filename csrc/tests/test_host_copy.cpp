// Host gather/scatter of KV blocks: round trips, threading, and CRC-32C.
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "kvstream/host_copy.h"
#include "kvstream/layout.h"
#include "tests/check.h"

using namespace dejavu;

int main() {
  std::mt19937_64 rng(1234);
  // A cache big enough that host_gather uses several threads (> 8 MiB per thread).
  KVLayout l{4, 64, 16, 4, 64, 4};  // chunk = 32 KiB, total = 8 MiB... make it larger below
  l.num_blocks = 512;                // 64 MiB total
  std::vector<uint8_t> cache(static_cast<size_t>(l.total_bytes()));
  for (auto& b : cache) b = static_cast<uint8_t>(rng());

  // Random blocks of random layers.
  std::vector<int64_t> blocks;
  for (int i = 0; i < 300; ++i) blocks.push_back(static_cast<int64_t>(rng() % l.num_blocks));
  auto spans = chunk_spans(l, {3, 0, 2}, blocks);
  const int64_t n = total_bytes(spans);
  CHECK(n == 3 * 300 * l.chunk_bytes());

  for (int threads : {1, 4}) {
    std::vector<uint8_t> packed(static_cast<size_t>(n), 0);
    CHECK(host_gather(cache.data(), spans.data(), spans.size(), packed.data(), threads) == n);
    // Every packed chunk equals its source chunk.
    int64_t off = 0;
    bool ok = true;
    for (const Span& s : spans) {
      ok = ok && std::memcmp(packed.data() + off, cache.data() + s.offset, s.bytes) == 0;
      off += s.bytes;
    }
    CHECK(ok);

    // Scatter into a blank cache puts exactly those chunks back, nothing else.
    std::vector<uint8_t> other(cache.size(), 0);
    CHECK(host_scatter(other.data(), spans.data(), spans.size(), packed.data(), threads) == n);
    ok = true;
    for (const Span& s : spans) ok = ok && std::memcmp(other.data() + s.offset, cache.data() + s.offset, s.bytes) == 0;
    CHECK(ok);
    // A chunk that was not in the list stays zero.
    std::vector<bool> touched(static_cast<size_t>(l.num_blocks), false);
    for (int64_t b : blocks) touched[b] = true;
    for (int64_t b = 0; b < l.num_blocks; ++b) {
      if (!touched[b]) {
        const uint8_t* p = other.data() + l.chunk_offset(0, b);
        bool zero = true;
        for (int64_t i = 0; i < l.chunk_bytes(); ++i) zero = zero && p[i] == 0;
        CHECK(zero);
        break;
      }
    }
  }

  // Token-level: newest token of 32 "requests" across all layers.
  std::vector<int64_t> tb, ts;
  for (int i = 0; i < 32; ++i) {
    tb.push_back(static_cast<int64_t>(rng() % l.num_blocks));
    ts.push_back(static_cast<int64_t>(rng() % l.block_size));
  }
  auto tsp = token_spans(l, {0, 1, 2, 3}, tb, ts);
  std::vector<uint8_t> tp(static_cast<size_t>(total_bytes(tsp)));
  host_gather(cache.data(), tsp.data(), tsp.size(), tp.data());
  CHECK(static_cast<int64_t>(tp.size()) == 4 * 32 * 2 * l.token_bytes());
  CHECK(std::memcmp(tp.data(), cache.data() + l.token_offset(0, tb[0], ts[0], 0), l.token_bytes()) == 0);

  // CRC-32C check value ("123456789" -> 0xE3069283) and chaining.
  const char* nine = "123456789";
  CHECK(crc32c(reinterpret_cast<const uint8_t*>(nine), 9) == 0xE3069283u);
  uint32_t c = crc32c(reinterpret_cast<const uint8_t*>(nine), 4);
  c = crc32c(reinterpret_cast<const uint8_t*>(nine) + 4, 5, c);
  CHECK(c == 0xE3069283u);
  // Odd lengths and offsets agree with byte-at-a-time chaining (the hardware path takes 8 bytes at a time).
  {
    std::vector<uint8_t> buf(1000);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    uint32_t whole = crc32c(buf.data() + 3, 997);
    uint32_t chained = 0;
    for (size_t i = 3; i < buf.size(); ++i) chained = crc32c(buf.data() + i, 1, chained);
    CHECK(whole == chained);
  }
  // Large buffers (folding from 1 KiB where the CPU has VPCLMULQDQ, else the three-lane path from
  // 12 KiB): the same CRC as pieces too small for either, on and off their step boundaries.
  {
    std::vector<uint8_t> buf(100003);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    for (size_t n : {size_t{1024}, size_t{1031}, size_t{1279}, size_t{1280}, size_t{4096}, size_t{12288}, size_t{12289},
                     size_t{24575}, size_t{100000}}) {
      const uint32_t whole = crc32c(buf.data() + 3, n, 0x1234u);
      uint32_t chained = 0x1234u;
      for (size_t at = 0; at < n; at += 1000) chained = crc32c(buf.data() + 3 + at, std::min<size_t>(1000, n - at), chained);
      CHECK(whole == chained);
      // And folded data that itself ends in a folded piece (chaining through the fold's seed).
      chained = crc32c(buf.data() + 3 + n / 2, n - n / 2, crc32c(buf.data() + 3, n / 2, 0x1234u));
      CHECK(whole == chained);
    }
  }
  // Three CRCs at once (the replica holder's per-slot checksums) equal three single ones.
  {
    std::vector<uint8_t> buf(3 * 4099);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    for (size_t n : {size_t{0}, size_t{5}, size_t{4096}, size_t{4099}}) {
      const uint8_t* rows[3] = {buf.data(), buf.data() + 4099, buf.data() + 2 * 4099};
      uint32_t c[3] = {0u, 7u, 0xFFFFFFFFu};
      const uint32_t want[3] = {crc32c(rows[0], n, 0u), crc32c(rows[1], n, 7u), crc32c(rows[2], n, 0xFFFFFFFFu)};
      crc32c_x3(rows, n, c);
      CHECK(c[0] == want[0] && c[1] == want[1] && c[2] == want[2]);
    }
  }
  // crc32c_items: per item, the CRC of its pieces in order, read in place (1 and 4 threads).
  {
    std::vector<uint8_t> buf(6 << 20);  // 4 items x 3 pieces x 1 MiB: the 4-thread call uses 3 threads
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    const std::vector<int64_t> items = {0, 40, 4000, 123};
    const std::vector<int64_t> pieces = {0, 3 << 20, 1000};
    const int64_t piece = 1 << 20;
    for (int threads : {1, 4}) {
      std::vector<int64_t> out(items.size(), -1);
      crc32c_items(buf.data(), items.data(), static_cast<int64_t>(items.size()), pieces.data(),
                   static_cast<int64_t>(pieces.size()), piece, out.data(), threads);
      for (size_t j = 0; j < items.size(); ++j) {
        std::vector<uint8_t> packed;
        for (int64_t p : pieces) packed.insert(packed.end(), buf.begin() + items[j] + p, buf.begin() + items[j] + p + piece);
        CHECK(out[j] == static_cast<int64_t>(crc32c(packed.data(), packed.size())));
      }
    }
  }
  TEST_MAIN_END();
}
