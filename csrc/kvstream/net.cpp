#include "kvstream/net.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

namespace dejavu::net {

namespace {
// A blocked send or receive returns EAGAIN once SO_SNDTIMEO / SO_RCVTIMEO pass: name that plainly.
std::string io_error(const char* what) {
  const int e = errno;
  if (e == EAGAIN || e == EWOULDBLOCK)
    return std::string(what) + " timed out: the peer made no progress within the socket timeout "
           "(link down, peer stalled or unreachable)";
  return std::string(what) + " failed: " + std::strerror(e);
}
}  // namespace

void send_all(int fd, const void* buf, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw TransportError(io_error("send"));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void send_pieces(int fd, std::vector<iovec>& pieces) {
  size_t at = 0;
  while (at < pieces.size()) {
    if (pieces[at].iov_len == 0) {
      ++at;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = pieces.data() + at;
    msg.msg_iovlen = std::min<size_t>(pieces.size() - at, IOV_MAX);
    ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw TransportError(io_error("send"));
    }
    auto left = static_cast<size_t>(w);
    while (left > 0) {  // advance over what went out
      iovec& v = pieces[at];
      const size_t take = std::min(left, v.iov_len);
      v.iov_base = static_cast<uint8_t*>(v.iov_base) + take;
      v.iov_len -= take;
      left -= take;
      if (v.iov_len == 0) ++at;
    }
  }
}

void recv_all(int fd, void* buf, size_t n) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw PeerGone{io_error("receive")};
    if (r == 0) throw PeerGone{"peer closed the connection mid-frame"};
    p += r;
    n -= static_cast<size_t>(r);
  }
}

void set_timeouts(int fd, double s) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(s);
  tv.tv_usec = static_cast<suseconds_t>((s - static_cast<double>(tv.tv_sec)) * 1e6);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

int connect_to(const std::string& host, int port, double timeout_s) {
  const std::string peer = host + ":" + std::to_string(port);
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0)
    throw TransportError("cannot resolve " + peer + ": " + gai_strerror(rc));
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) set_timeouts(fd, timeout_s);
  if (fd < 0 || ::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    std::string err = std::strerror(errno);
    ::freeaddrinfo(res);
    if (fd >= 0) ::close(fd);
    throw TransportError("cannot connect to " + peer + ": " + err);
  }
  ::freeaddrinfo(res);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

}  // namespace dejavu::net
