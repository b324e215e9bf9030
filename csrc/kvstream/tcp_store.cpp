#include "kvstream/tcp_store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "kvstream/host_copy.h"

namespace dejavu {

namespace {

using net::PeerGone;
using net::recv_all;
using net::send_all;
using net::set_timeouts;

// Header, key, payload (the pieces in order, e.g. a cache's spans: no gather copy first) and its
// checksum trailer. The payload goes in batches of kCrcPiece bytes, each checksummed just before it is
// sent, so the send reads it from cache; a small frame leaves in one system call.
void send_frame(int fd, FrameType t, const std::string& key, const iovec* pieces, size_t count) {
  uint64_t n = 0;
  for (size_t i = 0; i < count; ++i) n += pieces[i].iov_len;
  FrameHeader h = make_header(t, static_cast<uint32_t>(key.size()), n);
  uint32_t crc = 0;
  std::vector<iovec> batch{{&h, sizeof h}, {const_cast<char*>(key.data()), key.size()}};
  size_t filled = 0;
  for (size_t i = 0; i < count; ++i) {
    auto* p = static_cast<uint8_t*>(pieces[i].iov_base);
    for (size_t left = pieces[i].iov_len; left > 0;) {
      const size_t k = std::min(left, kCrcPiece - filled);
      crc = crc32c(p, k, crc);
      batch.push_back({p, k});
      p += k, left -= k, filled += k;
      if (filled == kCrcPiece) {
        net::send_pieces(fd, batch);
        batch.clear();
        filled = 0;
      }
    }
  }
  batch.push_back({&crc, sizeof crc});
  net::send_pieces(fd, batch);
}

void send_frame(int fd, FrameType t, const std::string& key, const uint8_t* payload, uint64_t n) {
  const iovec one{const_cast<uint8_t*>(payload), n};
  send_frame(fd, t, key, &one, n ? 1 : 0);
}

// Reads n payload bytes into dst and the checksum after them, each piece checksummed as soon as it
// arrived; false if they disagree.
bool recv_payload(int fd, uint8_t* dst, uint64_t n) {
  uint32_t crc = 0, sent = 0;
  for (uint64_t off = 0; off < n; off += kCrcPiece) {
    const size_t k = std::min<uint64_t>(kCrcPiece, n - off);
    recv_all(fd, dst + off, k);
    crc = crc32c(dst + off, k, crc);
  }
  recv_all(fd, &sent, sizeof sent);
  return crc == sent;
}

void send_text(int fd, FrameType t, const std::string& text) {
  send_frame(fd, t, "", reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

// Validates magic, version and header checksum; returns an empty string if fine.
std::string header_problem(const FrameHeader& h) {
  if (h.magic != kFrameMagic) return "bad frame magic";
  if (h.version != kFrameVersion) return "unsupported frame version " + std::to_string(h.version);
  if (crc32c(reinterpret_cast<const uint8_t*>(&h), 24) != h.header_crc) return "frame header checksum mismatch";
  if (h.key_len > kMaxKeyLen) return "frame key too long";
  return "";
}

struct AuthTimeout {};

bool constant_time_equal(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

FrameHeader make_header(FrameType type, uint32_t key_len, uint64_t payload_len) {
  FrameHeader h{};
  h.magic = kFrameMagic;
  h.version = kFrameVersion;
  h.type = static_cast<uint16_t>(type);
  h.key_len = key_len;
  h.payload_len = payload_len;
  h.header_crc = crc32c(reinterpret_cast<const uint8_t*>(&h), 24);
  return h;
}

// ------------------------------------------------------------------------------------ server
TcpStoreServer::TcpStoreServer(const std::string& host, int port, std::string token, int64_t max_bytes)
    : token_(std::move(token)), max_bytes_(max_bytes) {
  if (token_.empty()) throw std::invalid_argument("TcpStoreServer needs a non-empty cluster token");
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  const std::string port_s = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), port_s.c_str(), &hints, &res); rc != 0)
    throw TransportError("cannot resolve " + host + ": " + gai_strerror(rc));
  listen_fd_ = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (listen_fd_ < 0 || ::bind(listen_fd_, res->ai_addr, res->ai_addrlen) != 0 || ::listen(listen_fd_, 64) != 0) {
    std::string err = std::strerror(errno);
    ::freeaddrinfo(res);
    if (listen_fd_ >= 0) ::close(listen_fd_);
    throw TransportError("cannot listen on " + host + ":" + port_s + ": " + err);
  }
  ::freeaddrinfo(res);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&addr)->sin_port
                                          : reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

TcpStoreServer::~TcpStoreServer() { stop(); }

void TcpStoreServer::stop() {
  if (stop_.exchange(true)) return;
  if (acceptor_.joinable()) acceptor_.join();
  ::close(listen_fd_);
  std::map<int, std::thread> conns;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
    conns.swap(conns_);
  }
  for (auto& [id, t] : conns) t.join();
}

void TcpStoreServer::reap() {
  std::vector<std::thread> done;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (int id : finished_) {
      auto it = conns_.find(id);
      if (it == conns_.end()) continue;
      done.push_back(std::move(it->second));
      conns_.erase(it);
    }
    finished_.clear();
  }
  for (auto& t : done) t.join();  // each has only its return left
}

void TcpStoreServer::accept_loop() {
  int next_id = 0;
  while (!stop_) {
    reap();
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::lock_guard<std::mutex> g(mu_);
    ++stats_.connections;
    if (conns_.size() - finished_.size() >= kMaxConnections) {
      ++stats_.refused_connections;
      ::close(fd);
      continue;
    }
    open_fds_.push_back(fd);
    const int id = next_id++;
    conns_.emplace(id, std::thread([this, fd, id] { serve(fd, id); }));
  }
}

void TcpStoreServer::serve(int fd, int id) {
  set_timeouts(fd, kAuthDeadline);  // until HELLO: a peer silent mid-frame is dropped soon
  const auto opened = std::chrono::steady_clock::now();
  auto bump = [&](int64_t TcpStoreStats::*field) {
    std::lock_guard<std::mutex> g(mu_);
    ++(stats_.*field);
  };
  bool authed = false;
  try {
    for (;;) {
      // Idle connections wait here without a timeout, checking for shutdown; one that has not passed
      // HELLO within kAuthDeadline is dropped.
      for (;;) {
        if (stop_) throw PeerGone{"server stopping"};
        if (!authed && std::chrono::steady_clock::now() - opened > std::chrono::duration<double>(kAuthDeadline)) {
          bump(&TcpStoreStats::auth_failures);
          throw AuthTimeout{};
        }
        pollfd p{fd, POLLIN, 0};
        int r = ::poll(&p, 1, 200);
        if (r > 0) break;
      }
      FrameHeader h{};
      char probe;
      if (::recv(fd, &probe, 1, MSG_PEEK) == 0) break;  // clean close between frames
      recv_all(fd, &h, sizeof h);
      if (std::string why = header_problem(h); !why.empty()) {
        bump(&TcpStoreStats::bad_frames);
        send_text(fd, FrameType::kErr, why);
        break;
      }
      if (!authed && (static_cast<FrameType>(h.type) != FrameType::kHello || h.payload_len > 4096)) {
        bump(&TcpStoreStats::auth_failures);  // nothing is read or allocated before the token checks out
        send_text(fd, FrameType::kErr, "bad cluster token");
        break;
      }
      if (h.payload_len > kMaxPayload || (max_bytes_ > 0 && h.payload_len > static_cast<uint64_t>(max_bytes_))) {
        bump(&TcpStoreStats::bad_frames);
        send_text(fd, FrameType::kErr, "payload larger than the store");
        break;
      }
      std::string key(h.key_len, '\0');
      if (h.key_len) recv_all(fd, key.data(), h.key_len);
      Bytes payload = authed ? take_buffer(h.payload_len) : Bytes(h.payload_len);
      const bool intact = recv_payload(fd, payload.data(), h.payload_len);
      const auto type = static_cast<FrameType>(h.type);
      if (!intact) {
        bump(&TcpStoreStats::checksum_failures);
        send_text(fd, FrameType::kErr, "payload checksum mismatch for '" + key + "': not stored");
        if (!authed) break;
        recycle(std::move(payload));
        continue;
      }
      if (!authed) {
        const std::string tok(payload.begin(), payload.end());
        if (type != FrameType::kHello || !constant_time_equal(tok, token_)) {
          bump(&TcpStoreStats::auth_failures);
          send_text(fd, FrameType::kErr, "bad cluster token");
          break;
        }
        authed = true;
        set_timeouts(fd, 30.0);  // a member silent for 30 s mid-frame is dropped
        send_text(fd, FrameType::kOk, "");
        continue;
      }
      if (type == FrameType::kPut) {
        std::string err;
        {
          std::lock_guard<std::mutex> g(mu_);
          auto it = chunks_.find(key);
          const int64_t old = it == chunks_.end() ? 0 : static_cast<int64_t>(it->second.size());
          const int64_t after = stats_.bytes_stored - old + static_cast<int64_t>(payload.size());
          if (max_bytes_ > 0 && after > max_bytes_) {
            err = "store full: " + std::to_string(after) + " > " + std::to_string(max_bytes_) + " bytes";
          } else {
            stats_.bytes_stored = after;
            ++stats_.puts;
            std::swap(chunks_[key], payload);  // payload now holds the replaced chunk (or nothing)
          }
        }
        recycle(std::move(payload));
        if (err.empty()) send_text(fd, FrameType::kOk, "");
        else send_text(fd, FrameType::kErr, err);
      } else if (type == FrameType::kGet) {
        std::unique_lock<std::mutex> l(mu_);
        auto it = chunks_.find(key);
        if (it == chunks_.end()) {
          l.unlock();
          send_text(fd, FrameType::kErr, "no chunk '" + key + "'");
        } else {
          ++stats_.gets;
          Bytes copy = it->second;
          l.unlock();
          send_frame(fd, FrameType::kData, "", copy.data(), copy.size());
        }
      } else if (type == FrameType::kDel) {
        erase(key);
        send_text(fd, FrameType::kOk, "");
      } else {
        bump(&TcpStoreStats::bad_frames);
        send_text(fd, FrameType::kErr, "unexpected frame type " + std::to_string(h.type));
      }
    }
  } catch (const AuthTimeout&) {
  } catch (const PeerGone&) {
    if (!stop_) bump(&TcpStoreStats::truncated);
  } catch (const std::exception&) {
    bump(&TcpStoreStats::bad_frames);
  }
  std::lock_guard<std::mutex> g(mu_);
  ::close(fd);
  for (auto it = open_fds_.begin(); it != open_fds_.end(); ++it) {
    if (*it == fd) {
      open_fds_.erase(it);
      break;
    }
  }
  finished_.push_back(id);
}

bool TcpStoreServer::contains(const std::string& key) const {
  std::lock_guard<std::mutex> g(mu_);
  return chunks_.count(key) > 0;
}

int64_t TcpStoreServer::size(const std::string& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = chunks_.find(key);
  return it == chunks_.end() ? -1 : static_cast<int64_t>(it->second.size());
}

int64_t TcpStoreServer::get(const std::string& key, uint8_t* dst, int64_t cap) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = chunks_.find(key);
  if (it == chunks_.end()) throw std::out_of_range("no chunk '" + key + "' in the store");
  const int64_t n = static_cast<int64_t>(it->second.size());
  if (n > cap) throw std::length_error("chunk '" + key + "' is " + std::to_string(n) + " bytes, buffer " + std::to_string(cap));
  std::memcpy(dst, it->second.data(), static_cast<size_t>(n));
  return n;
}

bool TcpStoreServer::erase(const std::string& key) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = chunks_.find(key);
  if (it == chunks_.end()) return false;
  stats_.bytes_stored -= static_cast<int64_t>(it->second.size());
  Bytes gone = std::move(it->second);
  chunks_.erase(it);
  recycle_locked(std::move(gone));
  return true;
}

Bytes TcpStoreServer::take_buffer(uint64_t n) {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = recycled_.lower_bound(n);
    if (it != recycled_.end() && it->first <= 2 * n) {
      Bytes b = std::move(it->second);
      recycled_.erase(it);
      b.resize(n);
      return b;
    }
  }
  return Bytes(n);
}

void TcpStoreServer::recycle(Bytes&& b) {
  std::lock_guard<std::mutex> g(mu_);
  recycle_locked(std::move(b));
}

void TcpStoreServer::recycle_locked(Bytes&& b) {
  if (b.capacity() == 0) return;
  recycled_.emplace(b.capacity(), std::move(b));
  if (recycled_.size() > kRecycled) recycled_.erase(recycled_.begin());  // the smallest goes
}

std::vector<std::string> TcpStoreServer::keys() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::string> out;
  for (auto& [k, v] : chunks_) out.push_back(k);
  return out;
}

TcpStoreStats TcpStoreServer::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  TcpStoreStats s = stats_;
  s.active = static_cast<int64_t>(conns_.size());  // threads held: running, or finished and not yet joined
  return s;
}

// ------------------------------------------------------------------------------------ client
TcpStoreClient::TcpStoreClient(const std::string& host, int port, const std::string& token, double timeout_s)
    : peer_(host + ":" + std::to_string(port)) {
  fd_ = net::connect_to(host, port, timeout_s);
  std::vector<uint8_t> reply;
  try {
    const iovec tok{const_cast<char*>(token.data()), token.size()};
    request(FrameType::kHello, "", &tok, 1, &reply);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

TcpStoreClient::~TcpStoreClient() {
  if (fd_ >= 0) ::close(fd_);
}

void TcpStoreClient::fail(const std::string& why) {
  std::lock_guard<std::mutex> g(recv_mu_);
  if (broken_.empty()) broken_ = why;
  ::shutdown(fd_, SHUT_RDWR);  // a thread blocked on the socket returns at once
  turn_.notify_all();
}

uint64_t TcpStoreClient::request(FrameType t, const std::string& key, const iovec* pieces, size_t count,
                                 std::vector<uint8_t>* reply, uint8_t* dst, int64_t cap) {
  auto lost = [&](const std::string& why) {
    fail(why);
    return TransportError("connection to " + peer_ + " lost: " + why);
  };
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> s(send_mu_);
    {
      std::lock_guard<std::mutex> g(recv_mu_);
      if (!broken_.empty()) throw TransportError("connection to " + peer_ + " is unusable: " + broken_);
      ticket = sent_++;
    }
    try {
      send_frame(fd_, t, key, pieces, count);
    } catch (const TransportError& e) {
      throw lost(e.what());  // a frame cut short leaves the stream unusable
    }
  }
  {
    std::unique_lock<std::mutex> l(recv_mu_);
    turn_.wait(l, [&] { return answered_ == ticket || !broken_.empty(); });
    if (!broken_.empty()) throw TransportError("connection to " + peer_ + " lost: " + broken_);
  }
  // Only this thread reads until it moves answered_ on.
  FrameHeader h{};
  bool intact = false;
  uint64_t len = 0;
  try {
    recv_all(fd_, &h, sizeof h);
    if (std::string why = header_problem(h); !why.empty()) throw lost(peer_ + " sent a bad frame: " + why);
    std::string rkey(h.key_len, '\0');
    if (h.key_len) recv_all(fd_, rkey.data(), h.key_len);
    len = h.payload_len;
    const bool direct = dst != nullptr && static_cast<FrameType>(h.type) == FrameType::kData && len <= static_cast<uint64_t>(cap);
    if (!direct) reply->resize(len);
    intact = recv_payload(fd_, direct ? dst : reply->data(), len);
  } catch (const PeerGone& e) {
    throw lost(e.why);
  }
  {
    std::lock_guard<std::mutex> g(recv_mu_);
    ++answered_;
    turn_.notify_all();
  }
  if (!intact) throw TransportError("reply from " + peer_ + " failed its checksum");
  if (static_cast<FrameType>(h.type) == FrameType::kErr)
    throw TransportError(peer_ + " refused: " + std::string(reply->begin(), reply->end()));
  return len;
}

int64_t TcpStoreClient::put(const std::string& key, const uint8_t* data, int64_t n) {
  const iovec one{const_cast<uint8_t*>(data), static_cast<size_t>(n)};
  std::vector<uint8_t> reply;
  request(FrameType::kPut, key, &one, n ? 1 : 0, &reply);
  return n;
}

int64_t TcpStoreClient::put_spans(const std::string& key, const uint8_t* base, const Span* spans, size_t count) {
  std::vector<iovec> pieces(count);
  int64_t n = 0;
  for (size_t i = 0; i < count; ++i) {
    pieces[i] = {const_cast<uint8_t*>(base + spans[i].offset), static_cast<size_t>(spans[i].bytes)};
    n += spans[i].bytes;
  }
  std::vector<uint8_t> reply;
  request(FrameType::kPut, key, pieces.data(), count, &reply);
  return n;
}

int64_t TcpStoreClient::get(const std::string& key, uint8_t* dst, int64_t cap) {
  std::vector<uint8_t> reply;
  const auto n = static_cast<int64_t>(request(FrameType::kGet, key, nullptr, 0, &reply, dst, cap));
  if (n > cap) throw std::length_error("chunk '" + key + "' is " + std::to_string(n) + " bytes, buffer " + std::to_string(cap));
  return n;
}

bool TcpStoreClient::del(const std::string& key) {
  std::vector<uint8_t> reply;
  request(FrameType::kDel, key, nullptr, 0, &reply);
  return true;
}

}  // namespace dejavu
