#include "kvstream/file_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "kvstream/host_copy.h"

namespace dejavu {

namespace {

constexpr char kMagic[8] = {'D', 'J', 'V', 'K', 'V', '0', '0', '1'};
constexpr const char* kSuffix = ".kv";

struct Header {
  char magic[8];
  uint64_t payload_bytes;
  uint32_t payload_crc;
  uint32_t header_crc;  // of the 20 bytes above
  uint64_t reserved;
};
static_assert(sizeof(Header) == FileStore::kHeaderBytes, "header layout");

std::string errno_text(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

void write_all(int fd, const uint8_t* p, int64_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(errno_text("write failed on", path));
    }
    p += w;
    n -= w;
  }
}

// Reads exactly n bytes; returns the count read before EOF.
int64_t read_all(int fd, uint8_t* p, int64_t n, const std::string& path) {
  int64_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, p + got, static_cast<size_t>(std::min<int64_t>(n - got, 1 << 30)));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(errno_text("read failed on", path));
    }
    if (r == 0) break;
    got += r;
  }
  return got;
}

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Header read_header(int fd, const std::string& path) {
  Header h{};
  if (read_all(fd, reinterpret_cast<uint8_t*>(&h), sizeof h, path) != sizeof h)
    throw CorruptChunk("chunk file " + path + " is truncated (incomplete header)");
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0)
    throw CorruptChunk("chunk file " + path + " has a bad magic number (not a DéjàVu chunk)");
  if (crc32c(reinterpret_cast<const uint8_t*>(&h), 20) != h.header_crc)
    throw CorruptChunk("chunk file " + path + " has a corrupted header (checksum mismatch)");
  return h;
}

}  // namespace

void check_key(const std::string& key) {
  if (key.empty() || key.size() > 200 || key[0] == '.')
    throw std::invalid_argument("bad chunk key '" + key + "': must be 1-200 characters, not starting with '.'");
  for (char c : key) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) throw std::invalid_argument("bad chunk key '" + key + "': only letters, digits, '.', '_' and '-'");
  }
}

FileStore::FileStore(std::string dir, bool durable) : dir_(std::move(dir)), durable_(durable) {
  if (dir_.empty()) throw std::invalid_argument("FileStore needs a directory");
  if (::mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error(errno_text("cannot create", dir_));
  struct stat st {};
  if (::stat(dir_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw std::runtime_error("FileStore path " + dir_ + " is not a directory");
}

std::string FileStore::path(const std::string& key) const {
  check_key(key);
  return dir_ + "/" + key + kSuffix;
}

int64_t FileStore::write(const std::string& key, const uint8_t* data, int64_t n) const {
  const std::string final_path = path(key);
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = dir_ + "/." + key + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.payload_bytes = static_cast<uint64_t>(n);
  h.payload_crc = crc32c(data, static_cast<size_t>(n));
  h.header_crc = crc32c(reinterpret_cast<const uint8_t*>(&h), 20);
  {
    Fd f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    if (f.fd < 0) throw std::runtime_error(errno_text("cannot create", tmp));
    try {
      write_all(f.fd, reinterpret_cast<const uint8_t*>(&h), sizeof h, tmp);
      write_all(f.fd, data, n, tmp);
      if (durable_ && ::fsync(f.fd) != 0) throw std::runtime_error(errno_text("fsync failed on", tmp));
    } catch (...) {
      ::unlink(tmp.c_str());
      throw;
    }
  }
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(errno_text("cannot rename into place", final_path));
  }
  if (durable_) {
    Fd d{::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (d.fd >= 0) ::fsync(d.fd);
  }
  return n;
}

int64_t FileStore::read(const std::string& key, uint8_t* dst, int64_t cap) const {
  const std::string p = path(key);
  Fd f{::open(p.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) {
    if (errno == ENOENT) throw ChunkNotFound("chunk '" + key + "' not found in " + dir_);
    throw std::runtime_error(errno_text("cannot open", p));
  }
  Header h = read_header(f.fd, p);
  const int64_t n = static_cast<int64_t>(h.payload_bytes);
  if (n > cap)
    throw std::length_error("chunk '" + key + "' holds " + std::to_string(n) + " bytes, destination only " +
                            std::to_string(cap));
  if (read_all(f.fd, dst, n, p) != n) throw CorruptChunk("chunk file " + p + " is truncated (torn write)");
  uint8_t extra;
  if (read_all(f.fd, &extra, 1, p) != 0) throw CorruptChunk("chunk file " + p + " is longer than its header says");
  if (crc32c(dst, static_cast<size_t>(n)) != h.payload_crc)
    throw CorruptChunk("chunk file " + p + " failed its checksum (corrupted data)");
  return n;
}

int64_t FileStore::size(const std::string& key) const {
  const std::string p = path(key);
  Fd f{::open(p.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) return -1;
  return static_cast<int64_t>(read_header(f.fd, p).payload_bytes);
}

bool FileStore::remove(const std::string& key) const { return ::unlink(path(key).c_str()) == 0; }

std::vector<std::string> FileStore::keys() const {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) throw std::runtime_error(errno_text("cannot list", dir_));
  const size_t sl = std::strlen(kSuffix);
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.size() > sl && name[0] != '.' && name.compare(name.size() - sl, sl, kSuffix) == 0)
      out.push_back(name.substr(0, name.size() - sl));
  }
  ::closedir(d);
  return out;
}

}  // namespace dejavu
