// The part of MessagePack the replica protocol (python/dejavu/kvstream/replica.py) speaks from C++:
// headers are maps with string keys whose values are integers, strings and arrays of integers.
// Encoding always picks the smallest form, as msgpack-python does; decoding reads any well-formed
// document and keeps the scalar values and integer arrays of a top-level map (others are skipped,
// bounds-checked).
#pragma once
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace dejavu::mp {

class Writer {
 public:
  void map(uint32_t n);
  void array(uint32_t n);
  void str(const std::string& s);
  void integer(int64_t v);
  void ints(const std::vector<int64_t>& v) {
    array(static_cast<uint32_t>(v.size()));
    for (int64_t x : v) integer(x);
  }
  std::vector<uint8_t> buf;

 private:
  void be(uint64_t v, int bytes);
  void container(uint32_t n, uint8_t fix, uint8_t tag16, uint8_t tag32);
};

struct Value {
  enum Kind { kNil, kBool, kInt, kStr, kInts, kOther } kind = kNil;  // kInts: an array of integers only
  int64_t i = 0;
  std::string s;
  std::vector<int64_t> ints;
};

class DecodeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The top-level map of a document (it must be one map, and nothing after it).
std::map<std::string, Value> read_map(const uint8_t* p, size_t n);

}  // namespace dejavu::mp
