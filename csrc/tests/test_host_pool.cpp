// Pinned-pool range allocator and the worker pool's handles.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "kvstream/host_pool.h"
#include "kvstream/worker_pool.h"
#include "tests/check.h"

using namespace dejavu;

int main() {
  HostPool p(4096, 256);
  int64_t a = p.allocate(1000);  // rounds to 1024
  int64_t b = p.allocate(1024);
  int64_t c = p.allocate(2048);
  CHECK(a == 0 && b == 1024 && c == 2048);
  CHECK(p.used() == 4096);
  bool full = false;
  try {
    p.allocate(1);
  } catch (const PoolFull& e) {
    full = std::string(e.what()).find("pinned host pool full") != std::string::npos;
  }
  CHECK(full);
  p.free(b);
  CHECK(p.largest_free() == 1024);
  p.free(a);  // coalesces with b's range
  CHECK(p.largest_free() == 2048);
  CHECK(p.allocate(2000) == 0);
  CHECK_THROWS(p.free(12345));
  CHECK_THROWS(p.allocate(0));
  p.free(c);
  p.free(0);
  CHECK(p.used() == 0 && p.largest_free() == 4096);

  WorkerPool w(2);
  auto ok = w.submit([] { return int64_t{42}; });
  auto bad = w.submit([]() -> int64_t { throw std::runtime_error("disk on fire"); });
  CHECK(ok->wait(5.0) && !ok->failed() && ok->bytes() == 42);
  CHECK(bad->wait(5.0) && bad->failed() && bad->error() == "disk on fire");
  auto slow = w.submit([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return int64_t{1};
  });
  CHECK(!slow->wait(0.01));  // a timeout reports "not finished", it does not fail the task
  CHECK(!slow->test());
  CHECK(slow->wait(5.0) && !slow->failed());
  // Tasks queued before destruction still run (nothing is dropped).
  std::atomic<int> ran{0};
  {
    WorkerPool w2(1);
    for (int i = 0; i < 20; ++i) w2.submit([&] { ++ran; return int64_t{0}; });
  }
  CHECK(ran == 20);
  TEST_MAIN_END();
}
