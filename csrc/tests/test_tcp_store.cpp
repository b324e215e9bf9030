// TCP chunk transport over loopback: round trip, pipelined requests from several threads, a lost
// connection, bad token, corrupted and truncated frames; the server survives every bad peer and
// keeps serving good ones.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvstream/host_copy.h"
#include "kvstream/tcp_store.h"
#include "tests/check.h"

using namespace dejavu;

static int raw_connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return -1;
  return fd;
}

static void send_raw(int fd, const void* p, size_t n) { CHECK(::send(fd, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n)); }

static void hello(int fd, const std::string& token) {
  FrameHeader h = make_header(FrameType::kHello, 0, token.size());
  const uint32_t crc = crc32c(reinterpret_cast<const uint8_t*>(token.data()), token.size());
  send_raw(fd, &h, sizeof h);
  send_raw(fd, token.data(), token.size());
  send_raw(fd, &crc, sizeof crc);
  FrameHeader r{};
  uint32_t ok_crc = 1;
  CHECK(::recv(fd, &r, sizeof r, MSG_WAITALL) == sizeof r);
  CHECK(r.type == static_cast<uint16_t>(FrameType::kOk) && r.payload_len == 0);
  CHECK(::recv(fd, &ok_crc, sizeof ok_crc, MSG_WAITALL) == sizeof ok_crc && ok_crc == 0);  // of no bytes
}

static void wait_for(const TcpStoreServer& s, int64_t TcpStoreStats::*f, int64_t v) {
  for (int i = 0; i < 200 && s.stats().*f < v; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

int main() {
  TcpStoreServer server("127.0.0.1", 0, "secret-token");
  CHECK(server.port() > 0);
  std::mt19937 rng(3);
  std::vector<uint8_t> data(1 << 20);
  for (auto& b : data) b = static_cast<uint8_t>(rng());

  {
    TcpStoreClient c("127.0.0.1", server.port(), "secret-token");
    CHECK(c.put("r7.t12", data.data(), data.size()) == static_cast<int64_t>(data.size()));
    CHECK(server.contains("r7.t12"));
    std::vector<uint8_t> back(data.size());
    CHECK(c.get("r7.t12", back.data(), back.size()) == static_cast<int64_t>(data.size()));
    CHECK(back == data);
    std::vector<uint8_t> local(data.size());
    CHECK(server.get("r7.t12", local.data(), local.size()) == static_cast<int64_t>(data.size()) && local == data);
    CHECK_THROWS(c.get("missing", back.data(), back.size()));
    CHECK_THROWS(c.get("r7.t12", back.data(), 16));  // buffer too small
    // A chunk put from spans of a buffer (no gather first) holds them in order; a span may cross
    // checksum pieces and a piece may hold many spans.
    std::vector<Span> spans{{600000, 300000}, {5, 7}, {0, 3}, {200000, 70000}, {900000, 0}, {1000, 4096}};
    std::vector<uint8_t> want;
    for (auto& sp : spans) want.insert(want.end(), data.begin() + sp.offset, data.begin() + sp.offset + sp.bytes);
    CHECK(c.put_spans("spans", data.data(), spans.data(), spans.size()) == static_cast<int64_t>(want.size()));
    std::vector<uint8_t> got(want.size());
    CHECK(c.get("spans", got.data(), got.size()) == static_cast<int64_t>(want.size()) && got == want);
    // The connection still works after refused requests.
    CHECK(c.put("small", data.data(), 10) == 10);
    CHECK(c.del("small"));
    CHECK(!server.contains("small"));
  }

  // Requests from several threads share one connection, pipelined: every reply reaches the request
  // it answers (sizes differ; a refused GET among them disturbs none of the others).
  {
    TcpStoreClient c("127.0.0.1", server.port(), "secret-token");
    std::vector<std::thread> ts;
    std::vector<int> ok(8, 0);
    for (int t = 0; t < 8; ++t) {
      ts.emplace_back([&, t] {
        const size_t n = 1000 + static_cast<size_t>(t) * 130000;  // up to ~0.9 MiB: several pieces
        const std::string key = "p" + std::to_string(t);
        std::vector<uint8_t> back(n);
        for (int round = 0; round < 5; ++round) {
          const uint8_t* src = data.data() + (t * 7 + round) % 64;
          c.put(key, src, static_cast<int64_t>(n));
          if (c.get(key, back.data(), static_cast<int64_t>(n)) != static_cast<int64_t>(n)) return;
          if (std::memcmp(back.data(), src, n) != 0) return;
          bool refused = false;
          try {
            c.get("absent" + key, back.data(), 16);
          } catch (const TransportError&) {
            refused = true;
          }
          if (!refused) return;
        }
        ok[t] = 1;
      });
    }
    for (auto& t : ts) t.join();
    for (int t = 0; t < 8; ++t) CHECK(ok[t] == 1);
  }

  // A connection lost with requests in flight fails each of them, and every later one, at once.
  {
    TcpStoreServer doomed("127.0.0.1", 0, "t");
    TcpStoreClient c("127.0.0.1", doomed.port(), "t");
    CHECK(c.put("x", data.data(), 100) == 100);
    std::vector<std::thread> ts;
    std::vector<int> failed(4, 0);
    for (int t = 0; t < 4; ++t) {
      ts.emplace_back([&, t] {
        try {
          for (;;) c.put("k" + std::to_string(t), data.data(), static_cast<int64_t>(data.size()));
        } catch (const TransportError&) {
          failed[t] = 1;
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    doomed.stop();
    for (auto& t : ts) t.join();
    for (int t = 0; t < 4; ++t) CHECK(failed[t] == 1);
    CHECK_THROWS(c.put("y", data.data(), 10));
  }

  // Bad token: refused, counted, and nothing stored.
  CHECK_THROWS(TcpStoreClient("127.0.0.1", server.port(), "wrong-token"));
  wait_for(server, &TcpStoreStats::auth_failures, 1);
  CHECK(server.stats().auth_failures == 1);

  // A PUT before HELLO is an auth failure too (no payload is read).
  {
    int fd = raw_connect(server.port());
    FrameHeader h = make_header(FrameType::kPut, 1, 1000);
    send_raw(fd, &h, sizeof h);
    FrameHeader r{};
    CHECK(::recv(fd, &r, sizeof r, MSG_WAITALL) == sizeof r);
    CHECK(r.type == static_cast<uint16_t>(FrameType::kErr));
    ::close(fd);
    wait_for(server, &TcpStoreStats::auth_failures, 2);
    CHECK(server.stats().auth_failures == 2);
  }

  // Corrupted payload: answered with ERR, not stored, connection usable.
  {
    int fd = raw_connect(server.port());
    hello(fd, "secret-token");
    const std::string key = "bad";
    FrameHeader h = make_header(FrameType::kPut, key.size(), 600000);  // several checksummed pieces
    std::vector<uint8_t> payload(data.begin(), data.begin() + 600000);
    const uint32_t crc = crc32c(payload.data(), payload.size());
    payload[550000] ^= 1;  // flipped in flight, in the last piece
    send_raw(fd, &h, sizeof h);
    send_raw(fd, key.data(), key.size());
    send_raw(fd, payload.data(), payload.size());
    send_raw(fd, &crc, sizeof crc);
    FrameHeader r{};
    CHECK(::recv(fd, &r, sizeof r, MSG_WAITALL) == sizeof r);
    CHECK(r.type == static_cast<uint16_t>(FrameType::kErr));
    std::vector<char> msg(r.payload_len);
    ::recv(fd, msg.data(), msg.size(), MSG_WAITALL);
    CHECK(std::string(msg.begin(), msg.end()).find("checksum") != std::string::npos);
    CHECK(!server.contains("bad"));
    CHECK(server.stats().checksum_failures == 1);
    ::close(fd);
  }

  // Corrupted header: ERR and the connection is closed.
  {
    int fd = raw_connect(server.port());
    hello(fd, "secret-token");
    FrameHeader h = make_header(FrameType::kPut, 1, 8);
    h.payload_len = 9;  // header checksum no longer matches
    send_raw(fd, &h, sizeof h);
    FrameHeader r{};
    CHECK(::recv(fd, &r, sizeof r, MSG_WAITALL) == sizeof r);
    CHECK(r.type == static_cast<uint16_t>(FrameType::kErr));
    ::close(fd);
    wait_for(server, &TcpStoreStats::bad_frames, 1);
    CHECK(server.stats().bad_frames >= 1);
  }

  // Truncated frame: the peer dies mid-payload; nothing stored, server fine.
  {
    int fd = raw_connect(server.port());
    hello(fd, "secret-token");
    const std::string key = "torn";
    FrameHeader h = make_header(FrameType::kPut, key.size(), 100000);
    send_raw(fd, &h, sizeof h);
    send_raw(fd, key.data(), key.size());
    send_raw(fd, data.data(), 5000);
    ::close(fd);
    wait_for(server, &TcpStoreStats::truncated, 1);
    CHECK(server.stats().truncated >= 1);
    CHECK(!server.contains("torn"));
  }

  // After all of that, a good client is served.
  {
    TcpStoreClient c("127.0.0.1", server.port(), "secret-token");
    CHECK(c.put("after", data.data(), 777) == 777);
    CHECK(server.size("after") == 777);
  }

  // Memory cap.
  TcpStoreServer capped("127.0.0.1", 0, "t", 1000);
  TcpStoreClient cc("127.0.0.1", capped.port(), "t");
  CHECK(cc.put("a", data.data(), 600) == 600);
  CHECK_THROWS(cc.put("b", data.data(), 600));
  CHECK(cc.put("a", data.data(), 900) == 900);  // replacing counts the old size out
  server.stop();
  CHECK_THROWS(TcpStoreClient("127.0.0.1", server.port(), "secret-token"));
  TEST_MAIN_END();
}
