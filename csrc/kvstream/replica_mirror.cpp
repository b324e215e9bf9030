#include "kvstream/replica_mirror.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "kvstream/blake2b.h"
#include "kvstream/host_copy.h"
#include "kvstream/msgpack_lite.h"
#include "kvstream/net.h"
#include "kvstream/replica_wire.h"

namespace dejavu {

namespace {
constexpr int kGatherThreads = 8;
std::string range_text(int64_t hi) { return "[0, " + std::to_string(hi) + ")"; }
}  // namespace

ReplicaMirror::ReplicaMirror(const KVLayout& layout, uintptr_t data, uintptr_t chk)
    : layout_(layout), data_(reinterpret_cast<uint8_t*>(data)), chk_(reinterpret_cast<int64_t*>(chk)) {
  layout_.validate();
  if (!data_ || !chk_) throw std::invalid_argument("ReplicaMirror needs its data and checksum memory");
}

void ReplicaMirror::set_key(const std::string& key) {
  if (key.size() > 64) throw std::invalid_argument("a replica MAC key has at most 64 bytes");
  std::lock_guard<std::mutex> g(mu_);
  key_ = key;
}

int64_t ReplicaMirror::slot_mac(int64_t block, int64_t slot) const {
  const KVLayout& l = layout_;
  std::vector<const uint8_t*> pieces;
  pieces.reserve(static_cast<size_t>(l.num_layers) * 2);
  for (int64_t layer = 0; layer < l.num_layers; ++layer)
    for (int64_t kv = 0; kv < 2; ++kv) pieces.push_back(data_ + l.token_offset(layer, block, slot, kv));
  return slot_tag(key_, block, slot, pieces.data(), static_cast<int64_t>(pieces.size()), l.token_bytes());
}

void ReplicaMirror::check_blocks(const std::vector<int64_t>& blocks) const {
  for (int64_t b : blocks)
    if (b < 0 || b >= layout_.num_blocks) throw std::out_of_range("block id out of range " + range_text(layout_.num_blocks));
}

void ReplicaMirror::put_slots(const std::vector<int64_t>& blocks, const std::vector<int64_t>& slots,
                              const uint8_t* payload, int64_t n) {
  const KVLayout& l = layout_;
  if (blocks.size() != slots.size()) throw std::invalid_argument("put_slots needs one slot per block id");
  check_blocks(blocks);
  for (int64_t s : slots)
    if (s < 0 || s >= l.block_size) throw std::out_of_range("slot out of range " + range_text(l.block_size));
  const int64_t k = static_cast<int64_t>(blocks.size()), tb = l.token_bytes();
  if (n != k * l.num_layers * 2 * tb)
    throw std::invalid_argument("a payload of " + std::to_string(n) + " bytes does not hold " + std::to_string(k) +
                                " token slots of " + std::to_string(l.num_layers * 2 * tb) + " bytes");
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < k; j += 3) {  // three slots at a time: three CRC chains
    const int64_t m = std::min<int64_t>(3, k - j);
    uint32_t c[3] = {0, 0, 0};
    for (int64_t layer = 0; layer < l.num_layers; ++layer)
      for (int64_t kv = 0; kv < 2; ++kv) {
        const uint8_t* rows[3] = {nullptr, nullptr, nullptr};
        for (int64_t i = 0; i < m; ++i) {
          rows[i] = payload + ((layer * k + j + i) * 2 + kv) * tb;
          std::memcpy(data_ + l.token_offset(layer, blocks[j + i], slots[j + i], kv), rows[i], static_cast<size_t>(tb));
        }
        if (m == 3) {
          crc32c_x3(rows, static_cast<size_t>(tb), c);
        } else {
          for (int64_t i = 0; i < m; ++i) c[i] = crc32c(rows[i], static_cast<size_t>(tb), c[i]);
        }
      }
    for (int64_t i = 0; i < m; ++i)
      chk_[blocks[j + i] * l.block_size + slots[j + i]] =
          key_.empty() ? c[i] : slot_mac(blocks[j + i], slots[j + i]);
  }
}

void ReplicaMirror::put_blocks(const std::vector<int64_t>& blocks, const uint8_t* payload, int64_t n) {
  const KVLayout& l = layout_;
  check_blocks(blocks);
  const int64_t k = static_cast<int64_t>(blocks.size()), cb = l.chunk_bytes(), tb = l.token_bytes();
  if (n != k * l.num_layers * cb)
    throw std::invalid_argument("a payload of " + std::to_string(n) + " bytes does not hold " + std::to_string(k) +
                                " blocks of " + std::to_string(l.num_layers * cb) + " bytes");
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t layer = 0; layer < l.num_layers; ++layer)
    for (int64_t j = 0; j < k; ++j)
      std::memcpy(data_ + l.chunk_offset(layer, blocks[j]), payload + (layer * k + j) * cb, static_cast<size_t>(cb));
  for (int64_t b : blocks)
    for (int64_t s = 0; s < l.block_size; ++s) {
      if (!key_.empty()) {
        chk_[b * l.block_size + s] = slot_mac(b, s);
        continue;
      }
      uint32_t c = 0;
      for (int64_t layer = 0; layer < l.num_layers; ++layer)
        for (int64_t kv = 0; kv < 2; ++kv) c = crc32c(data_ + l.token_offset(layer, b, s, kv), static_cast<size_t>(tb), c);
      chk_[b * l.block_size + s] = c;
    }
}

void ReplicaMirror::get_blocks(const std::vector<int64_t>& blocks, uint8_t* out, int64_t* chk_out) const {
  const KVLayout& l = layout_;
  check_blocks(blocks);
  const int64_t k = static_cast<int64_t>(blocks.size()), cb = l.chunk_bytes();
  std::vector<int64_t> rows;  // (source offset, destination offset, bytes) per layer and block
  rows.reserve(static_cast<size_t>(l.num_layers * k) * 3);
  for (int64_t layer = 0; layer < l.num_layers; ++layer)
    for (int64_t j = 0; j < k; ++j) rows.insert(rows.end(), {l.chunk_offset(layer, blocks[j]), (layer * k + j) * cb, cb});
  std::lock_guard<std::mutex> g(mu_);
  // A restore gathers a whole stage's cache while the replacement waits: as many threads as it takes
  // to reach the host's memory bandwidth.
  host_copy_rows(data_, out, rows.data(), rows.size() / 3, kGatherThreads);
  for (int64_t j = 0; j < k; ++j)
    std::memcpy(chk_out + j * l.block_size, chk_ + blocks[j] * l.block_size, static_cast<size_t>(l.block_size) * 8);
}

// ------------------------------------------------------------------------------ connection loop
void ReplicaFastPath::add(const std::string& src, std::shared_ptr<ReplicaMirror> m) {
  std::lock_guard<std::mutex> g(mu_);
  mirrors_[src] = std::move(m);
}

std::shared_ptr<ReplicaMirror> ReplicaFastPath::find(const std::string& src) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = mirrors_.find(src);
  return it == mirrors_.end() ? nullptr : it->second;
}

int64_t ReplicaFastPath::bytes_in() const {
  std::lock_guard<std::mutex> g(mu_);
  return bytes_in_;
}

int64_t ReplicaFastPath::refused() const {
  std::lock_guard<std::mutex> g(mu_);
  return refused_;
}

std::string ReplicaFastPath::serve(int fd) {
  std::vector<uint8_t> payload;
  std::string body;
  while (true) {
    if (!replica_wire::recv_header(fd, &body)) return "";
    std::map<std::string, mp::Value> h;
    try {
      h = mp::read_map(reinterpret_cast<const uint8_t*>(body.data()), body.size());
    } catch (const mp::DecodeError&) {
      return body;  // Python reports it
    }
    const std::string& t = h["t"].s;
    if (t != "put_slots" && t != "put_blocks") return body;
    auto mirror = find(h["src"].s);
    if (!mirror) return body;  // "no replica of ... here", from Python
    const int64_t n = h["n"].i;
    if (h["n"].kind != mp::Value::kInt || n < 0 || n > max_payload_) return body;
    payload.resize(static_cast<size_t>(n));
    try {
      if (n) net::recv_all(fd, payload.data(), static_cast<size_t>(n));
    } catch (const net::PeerGone& e) {
      throw TransportError("replica peer: " + e.why);
    }
    const int64_t crc = crc32c(payload.data(), static_cast<size_t>(n));
    if (h["crc"].kind != mp::Value::kInt || crc != h["crc"].i) {
      {
        std::lock_guard<std::mutex> g(mu_);
        ++refused_;
      }
      // Refused, never applied; the stream stays in sync.
      replica_wire::send_reply(fd, "replica payload failed its CRC-32C");
      continue;
    }
    std::string error;
    try {
      if (h["blocks"].kind != mp::Value::kInts) throw std::invalid_argument("'blocks' must be a list of integers");
      if (t == "put_slots") {
        if (h["slots"].kind != mp::Value::kInts) throw std::invalid_argument("'slots' must be a list of integers");
        mirror->put_slots(h["blocks"].ints, h["slots"].ints, payload.data(), n);
      } else {
        mirror->put_blocks(h["blocks"].ints, payload.data(), n);
      }
      std::lock_guard<std::mutex> g(mu_);
      bytes_in_ += n;
    } catch (const std::exception& e) {
      error = std::string("ReplicaError: ") + e.what();
    }
    replica_wire::send_reply(fd, error);
  }
}

}  // namespace dejavu
