#include "kvstream/host_pool.h"

#include <string>

namespace dejavu {

HostPool::HostPool(int64_t capacity, int64_t alignment) : capacity_(capacity), alignment_(alignment) {
  if (capacity <= 0) throw std::invalid_argument("host pool capacity must be > 0");
  if (alignment <= 0 || (alignment & (alignment - 1)))
    throw std::invalid_argument("host pool alignment must be a power of two");
  free_[0] = capacity;
}

int64_t HostPool::allocate(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("host pool: allocation size must be > 0, got " + std::to_string(bytes));
  const int64_t size = (bytes + alignment_ - 1) & ~(alignment_ - 1);
  std::lock_guard<std::mutex> g(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second >= size) {
      const int64_t off = it->first, rest = it->second - size;
      free_.erase(it);
      if (rest) free_[off + size] = rest;
      used_[off] = size;
      return off;
    }
  }
  int64_t used = 0, largest = 0;
  for (auto& [o, s] : used_) used += s;
  for (auto& [o, s] : free_) largest = std::max(largest, s);
  throw PoolFull("pinned host pool full: asked for " + std::to_string(bytes) + " bytes, " + std::to_string(used) +
                 " of " + std::to_string(capacity_) + " in use, largest free range " + std::to_string(largest) +
                 " (raise the pool size flag)");
}

void HostPool::free(int64_t offset) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = used_.find(offset);
  if (it == used_.end()) throw std::invalid_argument("host pool: offset " + std::to_string(offset) + " is not allocated");
  int64_t off = offset, size = it->second;
  used_.erase(it);
  auto next = free_.lower_bound(off);
  if (next != free_.end() && off + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += size;
      return;
    }
  }
  free_[off] = size;
}

int64_t HostPool::used() const {
  std::lock_guard<std::mutex> g(mu_);
  int64_t n = 0;
  for (auto& [o, s] : used_) n += s;
  return n;
}

int64_t HostPool::largest_free() const {
  std::lock_guard<std::mutex> g(mu_);
  int64_t n = 0;
  for (auto& [o, s] : free_) n = std::max(n, s);
  return n;
}

}  // namespace dejavu
