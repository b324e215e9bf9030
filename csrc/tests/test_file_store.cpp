// Local-file chunk store: round trip, crash consistency (torn writes, corruption, leftovers).
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "kvstream/file_store.h"
#include "tests/check.h"

using namespace dejavu;

static std::string temp_dir() {
  char tmpl[] = "/tmp/dejavu_fs_XXXXXX";
  return std::string(::mkdtemp(tmpl));
}

static void truncate_file(const std::string& p, off_t len) { CHECK(::truncate(p.c_str(), len) == 0); }

int main() {
  const std::string dir = temp_dir();
  FileStore fs(dir + "/store", true);
  std::mt19937 rng(7);
  std::vector<uint8_t> data(300000);
  for (auto& b : data) b = static_cast<uint8_t>(rng());

  CHECK(fs.write("req-1.layer-0", data.data(), data.size()) == static_cast<int64_t>(data.size()));
  CHECK(fs.size("req-1.layer-0") == static_cast<int64_t>(data.size()));
  std::vector<uint8_t> back(data.size());
  CHECK(fs.read("req-1.layer-0", back.data(), back.size()) == static_cast<int64_t>(data.size()));
  CHECK(back == data);
  CHECK(fs.keys().size() == 1);

  // Overwrite is atomic: the new content replaces the old.
  std::vector<uint8_t> small(100, 9);
  fs.write("req-1.layer-0", small.data(), small.size());
  CHECK(fs.read("req-1.layer-0", back.data(), back.size()) == 100 && back[99] == 9);

  // Destination too small, missing key, bad keys.
  CHECK_THROWS(fs.read("req-1.layer-0", back.data(), 10));
  bool not_found = false;
  try {
    fs.read("nope", back.data(), back.size());
  } catch (const ChunkNotFound&) {
    not_found = true;
  }
  CHECK(not_found);
  CHECK_THROWS(fs.write("../escape", data.data(), 1));
  CHECK_THROWS(fs.write("a/b", data.data(), 1));
  CHECK_THROWS(fs.write(".hidden", data.data(), 1));

  // Torn write: the file was cut short (crash after a partial write without rename protection).
  fs.write("torn", data.data(), data.size());
  truncate_file(fs.path("torn"), FileStore::kHeaderBytes + 1000);
  bool corrupt = false;
  try {
    fs.read("torn", back.data(), back.size());
  } catch (const CorruptChunk& e) {
    corrupt = std::string(e.what()).find("truncated") != std::string::npos;
  }
  CHECK(corrupt);
  // Torn inside the header.
  truncate_file(fs.path("torn"), 10);
  CHECK_THROWS(fs.read("torn", back.data(), back.size()));

  // Flipped payload bit: checksum catches it.
  fs.write("flip", data.data(), data.size());
  {
    int fd = ::open(fs.path("flip").c_str(), O_RDWR);
    uint8_t b;
    ::pread(fd, &b, 1, FileStore::kHeaderBytes + 5000);
    b ^= 0x10;
    ::pwrite(fd, &b, 1, FileStore::kHeaderBytes + 5000);
    ::close(fd);
  }
  corrupt = false;
  try {
    fs.read("flip", back.data(), back.size());
  } catch (const CorruptChunk& e) {
    corrupt = std::string(e.what()).find("checksum") != std::string::npos;
  }
  CHECK(corrupt);

  // A leftover temporary file (crash before rename) is invisible.
  { std::ofstream(dir + "/store/.ghost.tmp.1.0") << "partial"; }
  auto keys = fs.keys();
  for (auto& k : keys) CHECK(k.find("ghost") == std::string::npos);
  CHECK(fs.size("ghost") == -1);

  CHECK(fs.remove("flip"));
  CHECK(fs.size("flip") == -1);
  std::system(("rm -rf " + dir).c_str());
  TEST_MAIN_END();
}
