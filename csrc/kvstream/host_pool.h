// Range allocator over one host buffer (the pinned pool): registered once, carved up and reused.
// First fit over a sorted free list; freed ranges coalesce with their neighbours.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>

namespace dejavu {

class PoolFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class HostPool {
 public:
  HostPool(int64_t capacity, int64_t alignment = 256);
  // Offset of a new range of `bytes` (rounded up to the alignment); throws PoolFull with sizes.
  int64_t allocate(int64_t bytes);
  void free(int64_t offset);
  int64_t capacity() const { return capacity_; }
  int64_t used() const;
  int64_t largest_free() const;

 private:
  int64_t capacity_, alignment_;
  mutable std::mutex mu_;
  std::map<int64_t, int64_t> free_;  // offset -> size
  std::map<int64_t, int64_t> used_;  // offset -> size
};

}  // namespace dejavu
