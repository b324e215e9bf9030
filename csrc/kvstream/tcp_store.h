// Host-to-host chunk transport over TCP: a server that keeps chunks in its host memory (a remote
// replica store) and a client that puts and gets them.
//
// Wire format (little-endian), every message one frame:
//   header (32 bytes): magic 'DJVT' u32, version u16, type u16, key_len u32, flags u32 (0),
//                      payload_len u64, header_crc u32 (CRC-32C of the 24 bytes before), reserved u32
//   key (key_len bytes), payload (payload_len bytes), payload_crc u32 (CRC-32C of the payload)
// The payload's checksum trails it so that each side checksums a piece while it is in cache, right
// before sending it or right after receiving it, rather than in a pass of its own over the payload.
// A connection opens with HELLO carrying the shared cluster token; the server answers OK or ERR and
// closes on a bad token. PUT/GET/DEL are answered with OK, DATA or ERR (text payload). A frame with
// a bad magic, version or header checksum closes the connection; a payload whose checksum fails is
// answered with ERR and never stored. The server outlives every bad peer.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kvstream/layout.h"
#include "kvstream/net.h"

namespace dejavu {

enum class FrameType : uint16_t { kHello = 1, kPut = 2, kGet = 3, kDel = 4, kOk = 16, kData = 17, kErr = 18 };

struct FrameHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t key_len;
  uint32_t flags;
  uint64_t payload_len;
  uint32_t header_crc;
  uint32_t reserved;
};
static_assert(sizeof(FrameHeader) == 32, "frame header layout");

constexpr uint32_t kFrameMagic = 0x54564A44;  // "DJVT"
constexpr uint16_t kFrameVersion = 2;
constexpr uint32_t kMaxKeyLen = 4096;
constexpr uint64_t kMaxPayload = uint64_t{16} << 30;  // one frame carries at most 16 GiB
constexpr size_t kMaxConnections = 256;  // more at once are closed as they arrive
constexpr double kAuthDeadline = 10.0;   // seconds a new connection has to pass HELLO

constexpr size_t kCrcPiece = 256 << 10;  // payload bytes checksummed per step (stays in L2)

// A header with magic, version and header checksum filled in.
FrameHeader make_header(FrameType type, uint32_t key_len, uint64_t payload_len);

struct TcpStoreStats {
  // active: connection threads held (not yet joined); refused_connections: closed over the cap.
  int64_t connections = 0, refused_connections = 0, active = 0, auth_failures = 0, bad_frames = 0, checksum_failures = 0, truncated = 0, puts = 0,
          gets = 0, bytes_stored = 0;
};

// Bytes that resize() leaves uninitialised: a payload buffer is written by recv before it is read.
struct UninitAlloc : std::allocator<uint8_t> {
  template <class U>
  struct rebind {
    using other = UninitAlloc;
  };
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
};
using Bytes = std::vector<uint8_t, UninitAlloc>;

class TcpStoreServer {
 public:
  // port 0 picks a free port. max_bytes caps the memory held (0: no cap).
  TcpStoreServer(const std::string& host, int port, std::string token, int64_t max_bytes = 0);
  ~TcpStoreServer();
  int port() const { return port_; }
  void stop();

  // Local access by the process that hosts the store (e.g. to restore a replica).
  bool contains(const std::string& key) const;
  int64_t size(const std::string& key) const;  // -1 if absent
  int64_t get(const std::string& key, uint8_t* dst, int64_t cap) const;
  bool erase(const std::string& key);
  std::vector<std::string> keys() const;
  TcpStoreStats stats() const;

 private:
  void accept_loop();
  void reap();  // joins the threads of connections that ended
  void serve(int fd, int id);
  // A buffer for an n-byte payload: a recycled one of capacity n..2n when there is one (its pages
  // are mapped already: no page faults, no zeroing by the kernel), else a new one.
  Bytes take_buffer(uint64_t n);
  void recycle(Bytes&& b);  // keeps at most kRecycled buffers, the largest
  void recycle_locked(Bytes&& b);
  std::string token_;
  int64_t max_bytes_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, Bytes> chunks_;
  static constexpr size_t kRecycled = 4;
  std::multimap<size_t, Bytes> recycled_;  // by capacity
  std::map<int, std::thread> conns_;
  std::vector<int> finished_;  // ids in conns_ whose thread is done
  std::vector<int> open_fds_;
  TcpStoreStats stats_;
};

// Requests from several threads are pipelined on the one connection: a request is sent as soon as
// the one before it has left (not once it is answered), and the server answers in order, so each
// thread takes its reply when its turn comes. A lost connection fails every request in flight.
class TcpStoreClient {
 public:
  TcpStoreClient(const std::string& host, int port, const std::string& token, double timeout_s = 30.0);
  ~TcpStoreClient();
  TcpStoreClient(const TcpStoreClient&) = delete;
  TcpStoreClient& operator=(const TcpStoreClient&) = delete;
  // Returns once the server acknowledged the chunk (stored, checksum verified).
  int64_t put(const std::string& key, const uint8_t* data, int64_t n);
  // One chunk made of the spans of base, in order (a cache's region, sent without a gather copy);
  // returns its bytes once acknowledged. The spans must not change until then.
  int64_t put_spans(const std::string& key, const uint8_t* base, const Span* spans, size_t count);
  // Fetches into dst; returns payload bytes. Throws if absent, too large or corrupted.
  int64_t get(const std::string& key, uint8_t* dst, int64_t cap);
  bool del(const std::string& key);

 private:
  // Sends the request, then waits for its turn and reads the reply: into *reply, or (a DATA reply to
  // a GET) straight into dst of cap bytes. Returns the reply's payload length.
  uint64_t request(FrameType t, const std::string& key, const iovec* pieces, size_t count,
                   std::vector<uint8_t>* reply, uint8_t* dst = nullptr, int64_t cap = 0);
  void fail(const std::string& why);  // marks the connection broken and wakes every waiter
  int fd_ = -1;
  std::mutex send_mu_;  // one request's frame at a time
  std::mutex recv_mu_;  // guards the tickets and broken_
  std::condition_variable turn_;
  uint64_t sent_ = 0, answered_ = 0;  // tickets: requests sent, replies read
  std::string broken_;  // why the connection is unusable ("" while it is fine)
  std::string peer_;
};

}  // namespace dejavu
