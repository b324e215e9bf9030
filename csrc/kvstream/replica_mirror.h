// The holding side of KV replication in C++: a mirror of another worker's paged cache (memory owned
// by the caller: python/dejavu/kvstream/replica.py's Mirror, in RAM or a mapped file) with one
// CRC-32C per token slot, and the connection loop that applies the replica protocol's data frames
// (put_slots, put_blocks) without the Python interpreter, handing every other frame back to it.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kvstream/layout.h"

namespace dejavu {

class ReplicaMirror {
 public:
  // data: the cache's layout; chk: num_blocks x block_size int64 slot checksums (the CRC-32C of a
  // slot's bytes, layer-major: layer 0 K, layer 0 V, layer 1 K, ...).
  ReplicaMirror(const KVLayout& layout, uintptr_t data, uintptr_t chk);
  const KVLayout& layout() const { return layout_; }
  // A non-empty key makes every slot's checksum its keyed MAC (blake2b.h's slot_tag) instead of its
  // CRC-32C: for mirrors kept on disk, where whoever can write the files could fix up CRCs.
  void set_key(const std::string& key);
  // payload: [layers][slots][K, V][token bytes], as the sender packs it. Throws std::invalid_argument.
  void put_slots(const std::vector<int64_t>& blocks, const std::vector<int64_t>& slots, const uint8_t* payload,
                 int64_t n);
  // payload: [layers][blocks][chunk].
  void put_blocks(const std::vector<int64_t>& blocks, const uint8_t* payload, int64_t n);
  // out: [layers][blocks][chunk]; chk_out: [blocks][block_size].
  void get_blocks(const std::vector<int64_t>& blocks, uint8_t* out, int64_t* chk_out) const;

 private:
  void check_blocks(const std::vector<int64_t>& blocks) const;
  int64_t slot_mac(int64_t block, int64_t slot) const;  // from the mirror's bytes
  const KVLayout layout_;
  std::string key_;
  uint8_t* const data_;
  int64_t* const chk_;
  mutable std::mutex mu_;
};

class ReplicaFastPath {
 public:
  explicit ReplicaFastPath(int64_t max_payload = int64_t{16} << 30) : max_payload_(max_payload) {}
  void add(const std::string& src, std::shared_ptr<ReplicaMirror> m);
  // Reads frames from a connection that passed HELLO, applying and answering put_slots / put_blocks
  // for mirrors added here; returns the msgpack header of the first other frame (its payload is
  // still unread), or "" once the peer closed. Throws TransportError on a broken stream.
  std::string serve(int fd);
  int64_t bytes_in() const;
  int64_t refused() const;

 private:
  std::shared_ptr<ReplicaMirror> find(const std::string& src) const;
  const int64_t max_payload_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<ReplicaMirror>> mirrors_;
  int64_t bytes_in_ = 0, refused_ = 0;
};

}  // namespace dejavu
