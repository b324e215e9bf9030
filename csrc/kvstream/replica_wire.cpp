#include "kvstream/replica_wire.h"

#include <arpa/inet.h>

#include <cstring>

#include "kvstream/msgpack_lite.h"
#include "kvstream/net.h"

namespace dejavu::replica_wire {

void send_frame(int fd, const std::vector<uint8_t>& header, const uint8_t* payload, int64_t n) {
  const uint32_t len = htonl(static_cast<uint32_t>(header.size()));
  std::vector<uint8_t> head(sizeof len + header.size());  // one send for length and header
  std::memcpy(head.data(), &len, sizeof len);
  std::memcpy(head.data() + sizeof len, header.data(), header.size());
  net::send_all(fd, head.data(), head.size());
  if (n > 0) net::send_all(fd, payload, static_cast<size_t>(n));
}

void send_frame_pieces(int fd, const std::vector<uint8_t>& header, std::vector<iovec> pieces) {
  const uint32_t len = htonl(static_cast<uint32_t>(header.size()));
  pieces.insert(pieces.begin(), {iovec{const_cast<uint32_t*>(&len), sizeof len},
                                 iovec{const_cast<uint8_t*>(header.data()), header.size()}});
  net::send_pieces(fd, pieces);
}

void send_reply(int fd, const std::string& error) {
  mp::Writer w;
  if (error.empty()) {
    w.map(2);
    w.str("t"), w.str("ok");
  } else {
    w.map(3);
    w.str("t"), w.str("err");
    w.str("msg"), w.str(error);
  }
  w.str("n"), w.integer(0);
  send_frame(fd, w.buf, nullptr, 0);
}

bool recv_header(int fd, std::string* body) {
  uint32_t len = 0;
  try {
    net::recv_all(fd, &len, sizeof len);
  } catch (const net::PeerGone&) {
    return false;  // closed between frames
  }
  len = ntohl(len);
  if (len > kMaxHeader)
    throw TransportError("replica header of " + std::to_string(len) + " bytes exceeds " + std::to_string(kMaxHeader));
  body->assign(len, '\0');
  try {
    net::recv_all(fd, body->data(), len);
  } catch (const net::PeerGone& e) {
    throw TransportError("replica peer: " + e.why);
  }
  return true;
}

}  // namespace dejavu::replica_wire
