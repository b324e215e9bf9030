// Local-disk chunk store. A chunk becomes visible only when complete: it is written to a temporary
// file and renamed into place, with a header carrying its length and CRC-32C. Reads verify both,
// so a torn or corrupted file is reported, never returned as data.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace dejavu {

class CorruptChunk : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class ChunkNotFound : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Keys are file names: [A-Za-z0-9._-], not starting with '.', at most 200 characters.
void check_key(const std::string& key);

class FileStore {
 public:
  // durable: fsync the file and directory before a write returns (crash-safe, slower).
  explicit FileStore(std::string dir, bool durable = false);
  const std::string& dir() const { return dir_; }
  // Writes atomically; returns bytes written (payload).
  int64_t write(const std::string& key, const uint8_t* data, int64_t n) const;
  // Reads into dst (capacity cap); returns payload bytes. Throws ChunkNotFound / CorruptChunk.
  int64_t read(const std::string& key, uint8_t* dst, int64_t cap) const;
  // Payload size without reading it (header checked); -1 if absent.
  int64_t size(const std::string& key) const;
  bool remove(const std::string& key) const;
  std::vector<std::string> keys() const;
  std::string path(const std::string& key) const;

  static constexpr int64_t kHeaderBytes = 32;

 private:
  std::string dir_;
  bool durable_;
};

}  // namespace dejavu
