// Blocking TCP helpers shared by the C++ transports (tcp_store, replica_sender).
#pragma once
#include <sys/uio.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace dejavu {

class TransportError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace net {

// Thrown when the peer closed or a read failed mid-frame (callers decide whether that is an error).
struct PeerGone {
  std::string why;
};

// Writes all n bytes (no SIGPIPE); throws TransportError.
void send_all(int fd, const void* buf, size_t n);
// Writes the pieces in order, as few system calls as the socket allows (sendmsg); throws TransportError.
// The vector is consumed (its entries advance over what was written).
void send_pieces(int fd, std::vector<iovec>& pieces);
// Reads exactly n bytes; throws PeerGone on EOF, timeout or error.
void recv_all(int fd, void* buf, size_t n);
// SO_RCVTIMEO and SO_SNDTIMEO of s seconds.
void set_timeouts(int fd, double s);
// A connected TCP socket (TCP_NODELAY, close-on-exec, timeouts of timeout_s); throws TransportError.
int connect_to(const std::string& host, int port, double timeout_s);

}  // namespace net
}  // namespace dejavu
