#include "kvstream/blake2b.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace dejavu {

namespace {

constexpr uint64_t kIV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                             0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                             0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline void mix(uint64_t* v, int a, int b, int c, int d, uint64_t x, uint64_t y) {
  v[a] = v[a] + v[b] + x;
  v[d] = rotr(v[d] ^ v[a], 32);
  v[c] = v[c] + v[d];
  v[b] = rotr(v[b] ^ v[c], 24);
  v[a] = v[a] + v[b] + y;
  v[d] = rotr(v[d] ^ v[a], 16);
  v[c] = v[c] + v[d];
  v[b] = rotr(v[b] ^ v[c], 63);
}

}  // namespace

Blake2b::Blake2b(size_t out_len, const uint8_t* key, size_t key_len) : out_len_(out_len) {
  if (out_len == 0 || out_len > 64 || key_len > 64) throw std::invalid_argument("BLAKE2b: bad output or key length");
  for (int i = 0; i < 8; ++i) h_[i] = kIV[i];
  h_[0] ^= 0x01010000ULL ^ (static_cast<uint64_t>(key_len) << 8) ^ out_len;
  if (key_len) {  // the key, zero-padded, is the first block
    std::memset(buf_, 0, sizeof buf_);
    std::memcpy(buf_, key, key_len);
    fill_ = sizeof buf_;
  }
}

void Blake2b::compress(const uint8_t* block, bool last) {
  uint64_t m[16], v[16];
  for (int i = 0; i < 16; ++i) m[i] = load64(block + 8 * i);
  for (int i = 0; i < 8; ++i) v[i] = h_[i], v[i + 8] = kIV[i];
  v[12] ^= t_[0];
  v[13] ^= t_[1];
  if (last) v[14] = ~v[14];
  for (const auto& s : kSigma) {
    mix(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    mix(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    mix(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    mix(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    mix(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    mix(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    mix(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    mix(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (int i = 0; i < 8; ++i) h_[i] ^= v[i] ^ v[i + 8];
}

void Blake2b::update(const uint8_t* data, size_t n) {
  while (n) {
    if (fill_ == sizeof buf_) {  // a full block is compressed only once more input follows it
      t_[0] += sizeof buf_;
      if (t_[0] < sizeof buf_) ++t_[1];
      compress(buf_, false);
      fill_ = 0;
    }
    if (fill_ == 0) {
      while (n > sizeof buf_) {  // whole blocks straight from the input
        t_[0] += sizeof buf_;
        if (t_[0] < sizeof buf_) ++t_[1];
        compress(data, false);
        data += sizeof buf_, n -= sizeof buf_;
      }
    }
    const size_t k = std::min(n, sizeof buf_ - fill_);
    std::memcpy(buf_ + fill_, data, k);
    fill_ += k, data += k, n -= k;
  }
}

void Blake2b::final(uint8_t* out) {
  t_[0] += fill_;
  if (t_[0] < fill_) ++t_[1];
  std::memset(buf_ + fill_, 0, sizeof buf_ - fill_);
  compress(buf_, true);
  uint8_t full[64];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) full[8 * i + j] = static_cast<uint8_t>(h_[i] >> (8 * j));
  std::memcpy(out, full, out_len_);
}

int64_t slot_tag(const std::string& key, int64_t block, int64_t slot, const uint8_t* const* pieces, int64_t n_pieces,
                 int64_t piece_bytes) {
  Blake2b h(8, reinterpret_cast<const uint8_t*>(key.data()), key.size());
  uint8_t ids[16];
  for (int j = 0; j < 8; ++j) {
    ids[j] = static_cast<uint8_t>(static_cast<uint64_t>(block) >> (8 * j));
    ids[8 + j] = static_cast<uint8_t>(static_cast<uint64_t>(slot) >> (8 * j));
  }
  h.update(ids, sizeof ids);
  for (int64_t p = 0; p < n_pieces; ++p) h.update(pieces[p], static_cast<size_t>(piece_bytes));
  uint8_t out[8];
  h.final(out);
  int64_t tag;
  std::memcpy(&tag, out, sizeof tag);
  return tag;
}

void mac_items(const std::string& key, const uint8_t* base, const int64_t* item_offsets, const int64_t* ids,
               int64_t n_items, const int64_t* piece_offsets, int64_t n_pieces, int64_t piece_bytes, int64_t* out) {
  std::vector<const uint8_t*> pieces(static_cast<size_t>(n_pieces));
  for (int64_t j = 0; j < n_items; ++j) {
    for (int64_t p = 0; p < n_pieces; ++p) pieces[p] = base + item_offsets[j] + piece_offsets[p];
    out[j] = slot_tag(key, ids[2 * j], ids[2 * j + 1], pieces.data(), n_pieces, piece_bytes);
  }
}

}  // namespace dejavu
