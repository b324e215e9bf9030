#include "kvstream/msgpack_lite.h"

namespace dejavu::mp {

void Writer::be(uint64_t v, int bytes) {
  for (int k = bytes - 1; k >= 0; --k) buf.push_back(static_cast<uint8_t>(v >> (8 * k)));
}

// A map's or an array's header: fix (n < 16), 16-bit or 32-bit count.
void Writer::container(uint32_t n, uint8_t fix, uint8_t tag16, uint8_t tag32) {
  if (n < 16) {
    buf.push_back(static_cast<uint8_t>(fix | n));
  } else if (n < 65536) {
    buf.push_back(tag16);
    be(n, 2);
  } else {
    buf.push_back(tag32);
    be(n, 4);
  }
}

void Writer::map(uint32_t n) { container(n, 0x80, 0xde, 0xdf); }

void Writer::array(uint32_t n) { container(n, 0x90, 0xdc, 0xdd); }

void Writer::str(const std::string& s) {
  const size_t n = s.size();
  if (n < 32) {
    buf.push_back(static_cast<uint8_t>(0xa0 | n));
  } else if (n < 256) {
    buf.push_back(0xd9);
    be(n, 1);
  } else if (n < 65536) {
    buf.push_back(0xda);
    be(n, 2);
  } else {
    buf.push_back(0xdb);
    be(n, 4);
  }
  buf.insert(buf.end(), s.begin(), s.end());
}

void Writer::integer(int64_t v) {
  if (v >= 0) {
    const uint64_t u = static_cast<uint64_t>(v);
    if (u < 128) {
      buf.push_back(static_cast<uint8_t>(u));
    } else if (u < 256) {
      buf.push_back(0xcc);
      be(u, 1);
    } else if (u < 65536) {
      buf.push_back(0xcd);
      be(u, 2);
    } else if (u < (uint64_t{1} << 32)) {
      buf.push_back(0xce);
      be(u, 4);
    } else {
      buf.push_back(0xcf);
      be(u, 8);
    }
  } else if (v >= -32) {
    buf.push_back(static_cast<uint8_t>(v));
  } else if (v >= -128) {
    buf.push_back(0xd0);
    be(static_cast<uint64_t>(v), 1);
  } else if (v >= -32768) {
    buf.push_back(0xd1);
    be(static_cast<uint64_t>(v), 2);
  } else if (v >= INT32_MIN) {
    buf.push_back(0xd2);
    be(static_cast<uint64_t>(v), 4);
  } else {
    buf.push_back(0xd3);
    be(static_cast<uint64_t>(v), 8);
  }
}

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, at = 0;

  uint64_t take(int bytes) {
    need(bytes);
    uint64_t v = 0;
    for (int k = 0; k < bytes; ++k) v = (v << 8) | p[at++];
    return v;
  }
  void need(size_t k) const {
    if (n - at < k) throw DecodeError("truncated msgpack document");
  }
  std::string bytes(size_t k) {
    need(k);
    std::string s(reinterpret_cast<const char*>(p + at), k);
    at += k;
    return s;
  }
  // One value; containers and non-scalars are skipped (depth-limited) and reported as kOther.
  Value value(int depth = 0) {
    if (depth > 32) throw DecodeError("msgpack nesting too deep");
    const uint8_t b = static_cast<uint8_t>(take(1));
    Value v;
    auto skip_items = [&](uint64_t items) {
      for (uint64_t k = 0; k < items; ++k) value(depth + 1);
      v.kind = Value::kOther;
    };
    auto array = [&](uint64_t items) {  // kept when every item is an integer
      bool ints = true;
      for (uint64_t k = 0; k < items; ++k) {
        Value x = value(depth + 1);
        if (x.kind != Value::kInt) ints = false;
        if (ints) v.ints.push_back(x.i);
      }
      v.kind = ints ? Value::kInts : Value::kOther;
      if (!ints) v.ints.clear();
    };
    if (b < 0x80) {
      v.kind = Value::kInt, v.i = b;
    } else if (b >= 0xe0) {
      v.kind = Value::kInt, v.i = static_cast<int8_t>(b);
    } else if ((b & 0xf0) == 0x80) {
      skip_items(2 * uint64_t(b & 0x0f));
    } else if ((b & 0xf0) == 0x90) {
      array(b & 0x0f);
    } else if ((b & 0xe0) == 0xa0) {
      v.kind = Value::kStr, v.s = bytes(b & 0x1f);
    } else {
      switch (b) {
        case 0xc0: v.kind = Value::kNil; break;
        case 0xc2: case 0xc3: v.kind = Value::kBool, v.i = b == 0xc3; break;
        case 0xc4: case 0xc5: case 0xc6: bytes(take(b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4)), v.kind = Value::kOther; break;
        case 0xca: take(4), v.kind = Value::kOther; break;
        case 0xcb: take(8), v.kind = Value::kOther; break;
        case 0xcc: v.kind = Value::kInt, v.i = static_cast<int64_t>(take(1)); break;
        case 0xcd: v.kind = Value::kInt, v.i = static_cast<int64_t>(take(2)); break;
        case 0xce: v.kind = Value::kInt, v.i = static_cast<int64_t>(take(4)); break;
        case 0xcf: v.kind = Value::kInt, v.i = static_cast<int64_t>(take(8)); break;
        case 0xd0: v.kind = Value::kInt, v.i = static_cast<int8_t>(take(1)); break;
        case 0xd1: v.kind = Value::kInt, v.i = static_cast<int16_t>(take(2)); break;
        case 0xd2: v.kind = Value::kInt, v.i = static_cast<int32_t>(take(4)); break;
        case 0xd3: v.kind = Value::kInt, v.i = static_cast<int64_t>(take(8)); break;
        case 0xd4: take(2), v.kind = Value::kOther; break;   // fixext 1
        case 0xd5: take(3), v.kind = Value::kOther; break;   // fixext 2
        case 0xd6: take(5), v.kind = Value::kOther; break;   // fixext 4
        case 0xd7: take(9), v.kind = Value::kOther; break;   // fixext 8
        case 0xd8: take(1), bytes(16), v.kind = Value::kOther; break;  // fixext 16
        case 0xc7: case 0xc8: case 0xc9: {
          const uint64_t len = take(b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4);
          take(1), bytes(len), v.kind = Value::kOther;
          break;
        }
        case 0xd9: v.kind = Value::kStr, v.s = bytes(take(1)); break;
        case 0xda: v.kind = Value::kStr, v.s = bytes(take(2)); break;
        case 0xdb: v.kind = Value::kStr, v.s = bytes(take(4)); break;
        case 0xdc: array(take(2)); break;
        case 0xdd: array(take(4)); break;
        case 0xde: skip_items(2 * take(2)); break;
        case 0xdf: skip_items(2 * take(4)); break;
        default: throw DecodeError("invalid msgpack type byte");
      }
    }
    return v;
  }
};

}  // namespace

std::map<std::string, Value> read_map(const uint8_t* p, size_t n) {
  Reader r{p, n};
  const uint8_t b = static_cast<uint8_t>(r.take(1));
  uint64_t items;
  if ((b & 0xf0) == 0x80) {
    items = b & 0x0f;
  } else if (b == 0xde) {
    items = r.take(2);
  } else if (b == 0xdf) {
    items = r.take(4);
  } else {
    throw DecodeError("msgpack document is not a map");
  }
  std::map<std::string, Value> out;
  for (uint64_t k = 0; k < items; ++k) {
    Value key = r.value(1);
    Value val = r.value(1);
    if (key.kind == Value::kStr) out[key.s] = std::move(val);
  }
  if (r.at != n) throw DecodeError("trailing bytes after the msgpack map");
  return out;
}

}  // namespace dejavu::mp
