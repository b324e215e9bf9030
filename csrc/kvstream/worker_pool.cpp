#include "kvstream/worker_pool.h"

#include <exception>
#include <stdexcept>

namespace dejavu {

WorkerPool::WorkerPool(int num_threads) {
  if (num_threads <= 0) throw std::invalid_argument("WorkerPool needs at least one thread");
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { loop(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  // Anything never started is failed, not silently dropped.
  for (auto& item : queue_) item.second->set_error("worker pool shut down before the task ran");
}

HandlePtr WorkerPool::submit(std::function<int64_t()> fn) {
  auto h = std::make_shared<Handle>();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) throw std::runtime_error("worker pool is shut down");
    queue_.emplace_back(std::move(fn), h);
  }
  cv_.notify_one();
  return h;
}

size_t WorkerPool::pending() const {
  std::lock_guard<std::mutex> g(mu_);
  return queue_.size() + running_;
}

void WorkerPool::loop() {
  for (;;) {
    std::pair<std::function<int64_t()>, HandlePtr> item;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) return;  // drain what was queued before stopping
      item = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    try {
      item.second->set_done(item.first());
    } catch (const std::exception& e) {
      item.second->set_error(e.what());
    } catch (...) {
      item.second->set_error("unknown exception in streaming task");
    }
    std::lock_guard<std::mutex> g(mu_);
    --running_;
  }
}

}  // namespace dejavu
