// Keyed BLAKE2b (RFC 7693), the MAC of replicas kept on disk: a slot's tag is the first 8 bytes of
// BLAKE2b(key; block id, slot id, the slot's bytes), so a replica file rewritten together with its
// tags, or a slot moved to another place, fails verification without the key.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace dejavu {

class Blake2b {
 public:
  // out_len in [1, 64]; key at most 64 bytes (empty: unkeyed).
  Blake2b(size_t out_len, const uint8_t* key, size_t key_len);
  void update(const uint8_t* data, size_t n);
  void final(uint8_t* out);  // out_len bytes

 private:
  void compress(const uint8_t* block, bool last);
  uint64_t h_[8];
  uint64_t t_[2] = {0, 0};
  uint8_t buf_[128];
  size_t fill_ = 0, out_len_;
};

// The 64-bit tag of one token slot: BLAKE2b-64 keyed with `key` over le64(block), le64(slot) and the
// slot's pieces in order (layer-major: layer 0 K, layer 0 V, layer 1 K, ...), as a signed int64.
int64_t slot_tag(const std::string& key, int64_t block, int64_t slot, const uint8_t* const* pieces, int64_t n_pieces,
                 int64_t piece_bytes);

// mac_items: slot_tag for each item (as crc32c_items, host_copy.h), item j naming (ids[2j], ids[2j+1]).
void mac_items(const std::string& key, const uint8_t* base, const int64_t* item_offsets, const int64_t* ids,
               int64_t n_items, const int64_t* piece_offsets, int64_t n_pieces, int64_t piece_bytes, int64_t* out);

}  // namespace dejavu
