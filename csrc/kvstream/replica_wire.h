// Framing of the replica protocol (python/dejavu/kvstream/replica.py's _send / _recv), for the C++
// sender and holder: a 4-byte big-endian header length, a msgpack header, then the header's `n`
// payload bytes.
#pragma once
#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dejavu::replica_wire {

constexpr uint32_t kMaxHeader = 1 << 20;  // replica.py's MAX_HEADER

// One frame; `header` is the encoded msgpack map (it must carry "n" = n).
void send_frame(int fd, const std::vector<uint8_t>& header, const uint8_t* payload, int64_t n);
// One frame whose payload is the concatenation of `pieces` (their lengths add up to the header's n),
// written with scatter-gather sends (no copy into one buffer).
void send_frame_pieces(int fd, const std::vector<uint8_t>& header, std::vector<iovec> pieces);
// The holder's answer to a request: {"t": "ok", "n": 0}, or {"t": "err", "msg": error, "n": 0}.
void send_reply(int fd, const std::string& error);
// The next frame's header into *body; false when the peer closed before the frame began. Throws
// TransportError for a header above kMaxHeader or a connection lost inside the header.
bool recv_header(int fd, std::string* body);

}  // namespace dejavu::replica_wire
