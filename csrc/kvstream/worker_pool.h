// Worker threads for host-side streaming work (gathers, file writes, socket sends), run without
// the Python GIL. Tasks return the bytes they moved; an exception fails the task's handle.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kvstream/handle.h"

namespace dejavu {

class WorkerPool {
 public:
  explicit WorkerPool(int num_threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Runs fn on a worker; the handle completes with fn's return value (bytes) or its exception text.
  HandlePtr submit(std::function<int64_t()> fn);
  int num_threads() const { return static_cast<int>(threads_.size()); }
  // Tasks queued or running.
  size_t pending() const;

 private:
  void loop();
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<int64_t()>, HandlePtr>> queue_;
  std::vector<std::thread> threads_;
  size_t running_ = 0;
  bool stop_ = false;
};

}  // namespace dejavu
