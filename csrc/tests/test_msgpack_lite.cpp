// The msgpack subset of the replica protocol: the bytes the encoder writes for every size class
// (the forms msgpack-python writes, so the Python holder reads them) and the decoder's round trip,
// skipping and refusal of malformed input.
#include <string>
#include <vector>

#include "check.h"
#include "kvstream/msgpack_lite.h"

using dejavu::mp::DecodeError;
using dejavu::mp::read_map;
using dejavu::mp::Value;
using dejavu::mp::Writer;

static std::vector<uint8_t> enc_int(int64_t v) {
  Writer w;
  w.integer(v);
  return w.buf;
}

int main() {
  // Integers: the smallest form, big-endian.
  CHECK(enc_int(0) == std::vector<uint8_t>{0x00});
  CHECK(enc_int(127) == std::vector<uint8_t>{0x7f});
  CHECK(enc_int(128) == (std::vector<uint8_t>{0xcc, 0x80}));
  CHECK(enc_int(65535) == (std::vector<uint8_t>{0xcd, 0xff, 0xff}));
  CHECK(enc_int(65536) == (std::vector<uint8_t>{0xce, 0x00, 0x01, 0x00, 0x00}));
  CHECK(enc_int(int64_t{1} << 32) == (std::vector<uint8_t>{0xcf, 0, 0, 0, 1, 0, 0, 0, 0}));
  CHECK(enc_int(-1) == std::vector<uint8_t>{0xff});
  CHECK(enc_int(-32) == std::vector<uint8_t>{0xe0});
  CHECK(enc_int(-33) == (std::vector<uint8_t>{0xd0, 0xdf}));
  CHECK(enc_int(-40000) == (std::vector<uint8_t>{0xd2, 0xff, 0xff, 0x63, 0xc0}));

  // A header as the sender writes it, read back.
  Writer w;
  w.map(5);
  w.str("t"), w.str("put_slots");
  w.str("blocks"), w.ints(std::vector<int64_t>(20, 7));  // array16
  w.str("src"), w.str(std::string(40, 'w'));             // str8
  w.str("n"), w.integer(3 << 20);
  w.str("crc"), w.integer(0xdeadbeef);
  CHECK(w.buf[0] == 0x85);
  auto m = read_map(w.buf.data(), w.buf.size());
  CHECK(m.size() == 5);
  CHECK(m["t"].kind == Value::kStr && m["t"].s == "put_slots");
  CHECK(m["blocks"].kind == Value::kInts && m["blocks"].ints == std::vector<int64_t>(20, 7));
  CHECK(m["src"].s == std::string(40, 'w'));
  CHECK(m["n"].kind == Value::kInt && m["n"].i == (3 << 20));
  CHECK(m["crc"].i == 0xdeadbeef);

  // A reply as msgpack-python writes {"t": "err", "msg": "bad", "n": 0, "x": [1, {"k": b"\0"}], "f": 1.5}.
  const std::vector<uint8_t> reply = {0x85, 0xa1, 't', 0xa3, 'e', 'r', 'r', 0xa3, 'm', 's', 'g', 0xa3, 'b', 'a', 'd',
                                      0xa1, 'n', 0x00, 0xa1, 'x', 0x92, 0x01, 0x81, 0xa1, 'k', 0xc4, 0x01, 0x00,
                                      0xa1, 'f', 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0};
  auto r = read_map(reply.data(), reply.size());
  CHECK(r["t"].s == "err" && r["msg"].s == "bad" && r["n"].i == 0);
  CHECK(r["x"].kind == Value::kOther && r["x"].ints.empty() && r["f"].kind == Value::kOther);
  Writer e;
  e.map(1);
  e.str("blocks"), e.ints({});
  CHECK(read_map(e.buf.data(), e.buf.size())["blocks"].kind == Value::kInts);

  // Malformed input is refused, never read out of bounds.
  for (size_t cut = 0; cut < reply.size(); ++cut) CHECK_THROWS(read_map(reply.data(), cut));
  const std::vector<uint8_t> not_map = {0x92, 0x01, 0x02};
  CHECK_THROWS(read_map(not_map.data(), not_map.size()));
  const std::vector<uint8_t> trailing = {0x80, 0x00};
  CHECK_THROWS(read_map(trailing.data(), trailing.size()));
  const std::vector<uint8_t> bad_type = {0x81, 0xa1, 'x', 0xc1};
  CHECK_THROWS(read_map(bad_type.data(), bad_type.size()));
  std::vector<uint8_t> deep = {0x81, 0xa1, 'x'};
  deep.insert(deep.end(), 100, 0x91);
  deep.push_back(0x00);
  CHECK_THROWS(read_map(deep.data(), deep.size()));
  TEST_MAIN_END();
}
