// Completion handle of one asynchronous operation: wait (with timeout), test, error.
// An operation is reported done only after all of its bytes moved; a failure carries its context.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace dejavu {

class Handle {
 public:
  void set_done(int64_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    bytes_ = bytes;
    state_ = State::kDone;
    cv_.notify_all();
  }
  void set_error(std::string msg) {
    std::lock_guard<std::mutex> g(mu_);
    error_ = std::move(msg);
    state_ = State::kFailed;
    cv_.notify_all();
  }
  // True once finished (successfully or not).
  bool test() const {
    std::lock_guard<std::mutex> g(mu_);
    return state_ != State::kPending;
  }
  // Waits up to timeout_s (< 0: forever). Returns true if finished.
  bool wait(double timeout_s) const {
    std::unique_lock<std::mutex> l(mu_);
    auto finished = [&] { return state_ != State::kPending; };
    if (timeout_s < 0) {
      cv_.wait(l, finished);
      return true;
    }
    return cv_.wait_for(l, std::chrono::duration<double>(timeout_s), finished);
  }
  bool failed() const {
    std::lock_guard<std::mutex> g(mu_);
    return state_ == State::kFailed;
  }
  std::string error() const {
    std::lock_guard<std::mutex> g(mu_);
    return error_;
  }
  int64_t bytes() const {
    std::lock_guard<std::mutex> g(mu_);
    return bytes_;
  }

 private:
  enum class State { kPending, kDone, kFailed };
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  State state_ = State::kPending;
  std::string error_;
  int64_t bytes_ = 0;
};

using HandlePtr = std::shared_ptr<Handle>;

}  // namespace dejavu
