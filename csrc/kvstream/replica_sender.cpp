#include "kvstream/replica_sender.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "kvstream/cuda_copy.h"
#include "kvstream/host_copy.h"
#include "kvstream/ring_rows.h"
#include "kvstream/msgpack_lite.h"
#include "kvstream/net.h"
#include "kvstream/replica_wire.h"

namespace dejavu {

namespace {
void check_cuda(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

std::chrono::steady_clock::duration secs(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}
}  // namespace

ReplicaSender::ReplicaSender(const KVLayout& layout, uintptr_t cache, int device, std::string src, std::string token,
                             std::string dtype, double timeout_s, int64_t frame_bytes)
    : layout_(layout),
      cache_(reinterpret_cast<uint8_t*>(cache)),
      device_(device),
      src_(std::move(src)),
      token_(std::move(token)),
      dtype_(std::move(dtype)),
      timeout_s_(timeout_s),
      frame_bytes_(frame_bytes) {
  layout_.validate();
  if (token_.empty()) throw std::invalid_argument("ReplicaSender needs the cluster token");
  if (frame_bytes_ <= 0) throw std::invalid_argument("frame_bytes must be positive");
  if (device_ >= 0 && !cuda_compiled()) throw std::runtime_error("ReplicaSender: this build has no CUDA");
  buf_.pinned = desc_.pinned = device_ >= 0;
  // CUDA state belongs to the sending thread (setting the device there leaves the caller's alone);
  // its errors surface here.
  std::mutex init_mu;
  std::condition_variable init_cv;
  bool ready = false;
  thread_ = std::thread([&] {
    if (device_ >= 0) {
      std::string err = cuda_set_device(device_);
      if (err.empty()) err = cuda_stream_new(&stream_);
      if (err.empty()) err = cuda_event_new(&done_, /*blocking=*/true);
      init_error_ = err;
    }
    {
      std::lock_guard<std::mutex> g(init_mu);  // notified under the lock: the waiter's locals outlive it
      ready = true;
      init_cv.notify_all();
    }
    if (init_error_.empty()) run();
  });
  std::unique_lock<std::mutex> g(init_mu);
  init_cv.wait(g, [&] { return ready; });
  if (!init_error_.empty()) {
    g.unlock();
    thread_.join();
    throw std::runtime_error("ReplicaSender: " + init_error_);
  }
}

ReplicaSender::~ReplicaSender() { close(); }

void ReplicaSender::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
  }
  cv_items_.notify_all();
  cv_events_.notify_all();
  cv_done_.notify_all();
  if (thread_.joinable()) thread_.join();
  disconnect();
  for (auto& it : items_)
    if (it.event) free_events_.push_back(it.event);
  items_.clear();
  for (void* e : free_events_) cuda_event_free(e);
  free_events_.clear();
  buf_.release();
  desc_.release();
  cuda_event_free(done_);
  cuda_stream_free(stream_);
  done_ = nullptr, stream_ = nullptr;
}

// ------------------------------------------------------------------------------ host buffers
void ReplicaSender::HostBuffer::reserve(int64_t bytes, int64_t limit) {
  if (bytes <= cap) return;
  const int64_t want = std::max(bytes, std::min(2 * cap, limit));  // doubling, up to limit unless more is needed
  release();
  if (pinned) {
    void *h = nullptr, *d = nullptr;
    check_cuda(cuda_host_alloc(static_cast<size_t>(want), &h, &d));
    host = static_cast<uint8_t*>(h), dev = d;
  } else {
    host = static_cast<uint8_t*>(std::malloc(static_cast<size_t>(want)));
    if (!host) throw std::bad_alloc();
    dev = host;
  }
  cap = want;
}

void ReplicaSender::HostBuffer::release() {
  if (pinned) {
    cuda_host_free(host);
  } else {
    std::free(host);
  }
  host = nullptr, dev = nullptr, cap = 0;
}

// ------------------------------------------------------------------------------ caller side
void ReplicaSender::enqueue(Item it, void* stream) {
  std::lock_guard<std::mutex> g(mu_);
  if (stop_) throw std::runtime_error("ReplicaSender is closed");
  if (device_ >= 0 && it.kind != Item::kHolder && it.kind != Item::kFail) {
    void* ev = nullptr;
    if (!free_events_.empty()) {
      ev = free_events_.back();
      free_events_.pop_back();
    } else {
      check_cuda(cuda_event_new(&ev, /*blocking=*/false));
    }
    if (std::string err = cuda_event_record(ev, stream); !err.empty()) {
      free_events_.push_back(ev);
      throw std::runtime_error(err);
    }
    it.event = ev;
  }
  items_.push_back(std::move(it));
  ++pushed_;
  cv_items_.notify_one();
}

void ReplicaSender::set_holder(const std::string& host, int port) {
  Item it;
  it.kind = Item::kHolder;
  it.host = host;
  it.port = port;
  enqueue(std::move(it), nullptr);
}

void ReplicaSender::push_slots(int64_t tag, const std::vector<Written>& written, void* stream) {
  Item it;
  it.tag = tag;
  const int64_t bs = layout_.block_size;
  for (const auto& [table, start, end] : written) {
    if (start < 0 || end < start || (end > 0 && (end - 1) / bs >= static_cast<int64_t>(table.size())))
      return push_fail(tag, "positions [" + std::to_string(start) + ", " + std::to_string(end) +
                                ") do not fit a block table of " + std::to_string(table.size()) + " blocks");
    for (int64_t p = start; p < end; ++p) {
      it.blocks.push_back(table[p / bs]);
      it.slots.push_back(p % bs);
    }
  }
  for (int64_t b : it.blocks)
    if (b < 0 || b >= layout_.num_blocks)
      return push_fail(tag, "block id " + std::to_string(b) + " outside the cache's [0, " +
                                std::to_string(layout_.num_blocks) + ")");
  enqueue(std::move(it), stream);
}

// A bad step is queued as a failure, in order: the steps before it are still sent and acknowledged.
void ReplicaSender::push_fail(int64_t tag, const std::string& why) {
  Item bad;
  bad.kind = Item::kFail;
  bad.tag = tag;
  bad.error = "step " + std::to_string(tag) + ": " + why;
  enqueue(std::move(bad), nullptr);
}

void ReplicaSender::push_blocks(int64_t tag, const std::vector<int64_t>& blocks, void* stream) {
  for (int64_t b : blocks)
    if (b < 0 || b >= layout_.num_blocks)
      throw std::out_of_range("block id " + std::to_string(b) + " outside the cache's [0, " +
                              std::to_string(layout_.num_blocks) + ")");
  Item it;
  it.kind = Item::kBlocks;
  it.tag = tag;
  it.blocks = blocks;
  enqueue(std::move(it), stream);
}

void ReplicaSender::set_every(int64_t every, double linger_s) {
  std::lock_guard<std::mutex> g(mu_);
  every_ = every < 1 ? 1 : every;
  linger_s_ = linger_s < 0 ? 0 : linger_s;
}

void ReplicaSender::set_skip(bool gather, bool send) {
  skip_gather_ = gather;
  skip_send_ = send;
}

// ------------------------------------------------------------------------------ the step ring
void ReplicaSender::ring_attach(uintptr_t ring, int64_t rows) {
  if (ring == 0 || rows <= 0) throw std::invalid_argument("ring_attach needs a ring and a positive row count");
  std::lock_guard<std::mutex> g(mu_);
  if (ring_ && ring_head_ != ring_tail_) throw std::runtime_error("ring_attach: the current ring still has rows in flight");
  ring_ = reinterpret_cast<uint8_t*>(ring);
  ring_rows_ = rows;
  ring_head_ = ring_tail_ = 0;
  staged_valid_ = false;
}

int64_t ReplicaSender::ring_stage(const int64_t* blocks, const int64_t* slots, int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  if (staged_valid_) {  // never committed: its step was abandoned, and nothing was reserved after it
    ring_head_ = staged_from_;
    staged_valid_ = false;
  }
  if (!ring_ || n <= 0 || n > ring_rows_ || stop_) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (blocks[i] < 0 || blocks[i] >= layout_.num_blocks || slots[i] < 0 || slots[i] >= layout_.block_size) {
      ++ring_misses_;  // push_slots then names the problem
      return -1;
    }
  const int64_t at = ring_head_ % ring_rows_;
  const int64_t row = ring_rows_from(at, n, ring_rows_);
  const int64_t start = row == at ? ring_head_ : ring_head_ + (ring_rows_ - at);  // the ring counter at `row`
  if (start + n - ring_tail_ > ring_rows_) {
    ++ring_misses_;  // the sending thread is behind by a whole ring
    return -1;
  }
  staged_from_ = ring_head_;
  ring_head_ = start + n;
  staged_ = Item();
  staged_.kind = Item::kRing;
  staged_.blocks.assign(blocks, blocks + n);
  staged_.slots.assign(slots, slots + n);
  staged_.ring_row = start % ring_rows_;
  staged_.ring_end = ring_head_;
  staged_valid_ = true;
  return staged_.ring_row;
}

bool ReplicaSender::ring_commit(int64_t tag, int64_t n, void* stream) {
  Item it;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!staged_valid_) return false;
    staged_valid_ = false;
    if (static_cast<int64_t>(staged_.blocks.size()) != n) {
      ring_head_ = staged_from_;
      return false;
    }
    it = std::move(staged_);
  }
  it.tag = tag;
  enqueue(std::move(it), stream);
  return true;
}

void ReplicaSender::ring_cancel() {
  std::lock_guard<std::mutex> g(mu_);
  if (staged_valid_) ring_head_ = staged_from_;
  staged_valid_ = false;
}

int64_t ReplicaSender::ring_misses() const {
  std::lock_guard<std::mutex> g(mu_);
  return ring_misses_;
}

std::vector<ReplicaEvent> ReplicaSender::wait_events(double timeout_s, double linger_s) {
  std::unique_lock<std::mutex> g(mu_);
  if (!cv_events_.wait_for(g, secs(timeout_s), [&] { return stop_ || !events_.empty(); }) || stop_) return {};
  if (linger_s > 0) cv_events_.wait_for(g, secs(linger_s), [&] { return stop_; });
  std::vector<ReplicaEvent> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

bool ReplicaSender::drain(double timeout_s) {
  std::unique_lock<std::mutex> g(mu_);
  ++flush_;  // no lag while someone waits
  cv_items_.notify_all();
  const bool done =
      cv_done_.wait_for(g, secs(timeout_s), [&] { return stop_ || processed_ == pushed_; }) && processed_ == pushed_;
  --flush_;
  return done;
}

void ReplicaSender::set_lag(double lag_s) {
  std::lock_guard<std::mutex> g(mu_);
  lag_s_ = lag_s < 0 ? 0 : lag_s;
}

int64_t ReplicaSender::bytes() const {
  std::lock_guard<std::mutex> g(mu_);
  return bytes_;
}

int64_t ReplicaSender::events_total() const {
  std::lock_guard<std::mutex> g(mu_);
  return events_total_;
}

// ------------------------------------------------------------------------------ sending thread
void ReplicaSender::emit(const std::string& kind, int64_t tag, const std::string& error) {
  {
    std::lock_guard<std::mutex> g(mu_);
    events_.push_back({kind, tag, bytes_, error});
    ++events_total_;
  }
  cv_events_.notify_all();
}

void ReplicaSender::run() {
  std::unique_lock<std::mutex> g(mu_);
  while (true) {
    cv_items_.wait(g, [&] { return stop_ || !items_.empty(); });
    if (stop_) return;
    std::vector<Item> batch;
    batch.push_back(std::move(items_.front()));
    items_.pop_front();
    const Item::Kind kind = batch[0].kind;
    if (kind == Item::kSlots || kind == Item::kRing) {
      // every > 1: later steps join this one's gather and frame (fewer wake-ups and messages; the
      // watermark trails by up to every - 1 steps more).
      const auto until = std::chrono::steady_clock::now() + secs(linger_s_);
      while (static_cast<int64_t>(batch.size()) < every_) {
        // drain() does not wait out the linger: what is queued goes now
        if (!cv_items_.wait_until(g, until, [&] { return stop_ || flush_ || !items_.empty(); }) || stop_) break;
        if (items_.empty()) break;
        if (items_.front().kind != kind) break;
        batch.push_back(std::move(items_.front()));
        items_.pop_front();
      }
    }
    if (kind == Item::kRing) {
      // Behind (steps queued meanwhile): they go in the same frames, one round trip to the holder
      // instead of one each. Nothing waits for them; they were already there.
      int64_t rows = 0;
      for (const Item& it : batch) rows += static_cast<int64_t>(it.blocks.size());
      while (!items_.empty() && items_.front().kind == Item::kRing && rows < ring_rows_ / 4) {
        rows += static_cast<int64_t>(items_.front().blocks.size());
        batch.push_back(std::move(items_.front()));
        items_.pop_front();
      }
    }
    if (kind == Item::kSlots && lag_s_ > 0) {
      // Hold the gather until the next step was handed over (or lag_s passed, or drain()): the copy
      // then overlaps that step's compute instead of racing the step boundary, where the worker
      // reads its sampled tokens back over the same copy engines.
      cv_items_.wait_for(g, secs(lag_s_), [&] { return stop_ || flush_ || !items_.empty(); });
      if (stop_) return;
    }
    g.unlock();
    if (kind != Item::kRing) settle(0);  // acknowledgements stay in order
    process(batch);
    g.lock();
    for (auto& it : batch)
      if (it.event) free_events_.push_back(it.event);  // (a ring batch's events completed before it was sent)
    if (!in_flight_.empty() && items_.empty() && !stop_) {  // caught up: collect the holder's answers now
      g.unlock();
      settle(0);
      g.lock();
    }
  }
}

void ReplicaSender::done(int64_t items) {
  {
    std::lock_guard<std::mutex> g(mu_);
    processed_ += items;
  }
  cv_done_.notify_all();
}

void ReplicaSender::process(std::vector<Item>& batch) {
  Item& first = batch.front();
  const auto n = static_cast<int64_t>(batch.size());
  if (first.kind == Item::kRing) {
    if (fd_ < 0 && !skip_send_) {  // without a holder: dropped unacknowledged, like push_slots
      release_ring(batch.back().ring_end);
      return done(n);
    }
    InFlight f;
    try {
      f.replies = send_ring(batch);
    } catch (const std::exception& e) {
      fail_in_flight(first.tag, e.what());
      release_ring(batch.back().ring_end);
      return done(n);
    }
    for (const Item& it : batch) f.tags.push_back(it.tag);
    f.ring_end = batch.back().ring_end;
    in_flight_.push_back(std::move(f));
    return settle(kMaxInFlight);
  }
  struct Done {  // every other kind is processed once this returns
    ReplicaSender* s;
    int64_t n;
    ~Done() { s->done(n); }
  } mark{this, n};
  if (first.kind == Item::kHolder) {
    try {
      connect(first.host, first.port);
    } catch (const std::exception& e) {
      disconnect();
      emit("failed", 0, e.what());
    }
    return;
  }
  if (first.kind == Item::kFail) {
    disconnect();
    emit("failed", first.tag, first.error);
    return;
  }
  const bool slots = first.kind == Item::kSlots;
  const char* ack = slots ? "replicated" : "rereplicated";
  if (fd_ < 0 && !skip_send_) {
    if (!slots) emit(ack, first.tag, "no replica holder");
    return;  // a step's slots without a holder: not acknowledged
  }
  try {
    if (slots && batch.size() > 1) {
      std::vector<int64_t> blocks, ids;
      for (const Item& it : batch) {
        blocks.insert(blocks.end(), it.blocks.begin(), it.blocks.end());
        ids.insert(ids.end(), it.slots.begin(), it.slots.end());
      }
      send_frames(true, blocks, ids, batch.back().event);  // the last event implies the others
    } else {
      send_frames(slots, first.blocks, first.slots, first.event);
    }
  } catch (const std::exception& e) {
    disconnect();
    emit("failed", first.tag, e.what());
    if (!slots) emit(ack, first.tag, e.what());
    return;
  }
  for (const Item& it : batch) emit(ack, it.tag);
}

void ReplicaSender::disconnect() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void ReplicaSender::connect(const std::string& host, int port) {
  disconnect();
  fd_ = net::connect_to(host, port, timeout_s_);
  peer_ = host + ":" + std::to_string(port);
  mp::Writer hello;
  hello.map(3);
  hello.str("t"), hello.str("hello");
  hello.str("token"), hello.str(token_);
  hello.str("n"), hello.integer(0);
  request(hello.buf, nullptr, 0);
  const KVLayout& l = layout_;
  mp::Writer open;
  open.map(5);
  open.str("t"), open.str("open");
  open.str("src"), open.str(src_);
  open.str("shape"), open.ints({l.num_layers, l.num_blocks, 2, l.block_size, l.num_kv_heads, l.head_dim});
  open.str("dtype"), open.str(dtype_);
  open.str("n"), open.integer(0);
  request(open.buf, nullptr, 0);
}

void ReplicaSender::request(const std::vector<uint8_t>& header, const uint8_t* payload, int64_t n) {
  std::vector<iovec> pieces;
  if (n > 0) pieces.push_back({const_cast<uint8_t*>(payload), static_cast<size_t>(n)});
  request(header, std::move(pieces));
}

void ReplicaSender::request(const std::vector<uint8_t>& header, std::vector<iovec> pieces) {
  send_request(header, std::move(pieces));
  expect_ok();
}

void ReplicaSender::send_request(const std::vector<uint8_t>& header, std::vector<iovec> pieces) {
  try {
    replica_wire::send_frame_pieces(fd_, header, std::move(pieces));
  } catch (const TransportError& e) {
    throw TransportError("replica holder " + peer_ + ": " + e.what());
  }
}

void ReplicaSender::expect_ok() {
  try {
    std::string body;
    if (!replica_wire::recv_header(fd_, &body)) throw TransportError("closed the connection");
    auto reply = mp::read_map(reinterpret_cast<const uint8_t*>(body.data()), body.size());
    if (reply["n"].i != 0) throw TransportError("answered with an unexpected payload");
    if (reply["t"].s == "err") throw TransportError(reply["msg"].s);
    if (reply["t"].s != "ok") throw TransportError("answered '" + reply["t"].s + "'");
  } catch (const TransportError& e) {
    throw TransportError("replica holder " + peer_ + ": " + e.what());
  } catch (const mp::DecodeError& e) {
    throw TransportError("replica holder " + peer_ + " sent an undecodable header: " + e.what());
  }
}

// The header of a put_slots (slots) or put_blocks frame carrying nbytes with CRC-32C crc.
std::vector<uint8_t> ReplicaSender::data_header(bool slots, const std::vector<int64_t>& blocks,
                                                const std::vector<int64_t>& slot_ids, int64_t nbytes,
                                                uint32_t crc) const {
  mp::Writer h;
  h.map(slots ? 6 : 5);
  h.str("t"), h.str(slots ? "put_slots" : "put_blocks");
  h.str("src"), h.str(src_);
  h.str("blocks"), h.ints(blocks);
  if (slots) h.str("slots"), h.ints(slot_ids);
  h.str("n"), h.integer(nbytes);
  h.str("crc"), h.integer(crc);
  return std::move(h.buf);
}

// Packs one frame's entries into buf_ as the holder's Mirror reads them: [layers][slots][K, V]
// (slots) or [layers][blocks].
void ReplicaSender::gather(bool slots, const std::vector<int64_t>& blocks, const std::vector<int64_t>& slot_ids,
                           int64_t nbytes, void* after) {
  if (skip_gather_) {
    std::memset(buf_.host, 0, static_cast<size_t>(nbytes));
    return;
  }
  const KVLayout& l = layout_;
  const int64_t k = static_cast<int64_t>(blocks.size());
  if (device_ >= 0) {
    if (after) check_cuda(cuda_stream_wait_event(stream_, after));
    if (k <= kMaxDmaEntries) {
      // The copy engine: no SMs taken from the decode step running beside it.
      check_cuda(slots ? cuda_dma_gather_slots(cache_, buf_.host, blocks.data(), slot_ids.data(), k, l.num_layers,
                                               l.num_blocks, l.block_size, l.token_bytes(), stream_)
                       : cuda_dma_gather_blocks(cache_, buf_.host, blocks.data(), k, l.num_layers, l.num_blocks,
                                                l.chunk_bytes(), stream_));
      return wait_for_device();
    }
  }
  std::vector<int64_t> layers(static_cast<size_t>(l.num_layers));
  std::iota(layers.begin(), layers.end(), 0);
  const std::vector<Span> spans = slots ? token_spans(l, layers, blocks, slot_ids) : chunk_spans(l, layers, blocks);
  if (device_ < 0) {
    host_gather(cache_, spans.data(), spans.size(), buf_.host);
    return;
  }
  // Many entries (a whole prompt at admission): one copy-kernel launch instead of thousands of
  // copies; it writes the pinned buffer through its mapped address.
  const int64_t rows = copy_desc_rows_bound(spans, 0);
  desc_.reserve(rows * 3 * static_cast<int64_t>(sizeof(int64_t)));
  const CopyDesc d = fill_copy_desc(spans, /*out=*/true, 0, reinterpret_cast<int64_t*>(desc_.host), rows);
  check_cuda(cuda_copy_spans(cache_, buf_.dev, static_cast<const int64_t*>(desc_.dev), d.rows, stream_, 0));
  wait_for_device();
}

void ReplicaSender::wait_for_device() {
  check_cuda(cuda_event_record(done_, stream_));
  // A blocking-sync event: this thread sleeps (polling it measured no better on the H200).
  check_cuda(cuda_event_wait(done_));
}

void ReplicaSender::send_frames(bool slots, const std::vector<int64_t>& blocks, const std::vector<int64_t>& slot_ids,
                                void* after) {
  const KVLayout& l = layout_;
  // One entry: a token slot's K and V rows over all layers, or a whole block over all layers.
  const int64_t piece = slots ? l.token_bytes() : l.chunk_bytes();
  const int64_t entry = (slots ? 2 : 1) * piece * l.num_layers;
  const int64_t per_frame = std::max<int64_t>(1, frame_bytes_ / entry);
  const int64_t total = static_cast<int64_t>(blocks.size());
  const bool skip_send = skip_send_;
  for (int64_t first = 0; first < total; first += per_frame) {
    const int64_t k = std::min(per_frame, total - first);
    const int64_t nbytes = k * entry;
    const std::vector<int64_t> fb(blocks.begin() + first, blocks.begin() + first + k);
    const std::vector<int64_t> fs = slots ? std::vector<int64_t>(slot_ids.begin() + first, slot_ids.begin() + first + k)
                                          : std::vector<int64_t>();
    buf_.reserve(nbytes, frame_bytes_);
    gather(slots, fb, fs, nbytes, first == 0 ? after : nullptr);
    if (!skip_send)
      request(data_header(slots, fb, fs, nbytes, crc32c(buf_.host, static_cast<size_t>(nbytes))), buf_.host, nbytes);
    std::lock_guard<std::mutex> g(mu_);
    bytes_ += nbytes;
  }
}

// A batch of committed ring steps, once the last one's kernels are done: the rows go out as they lie
// in the ring, in the put_slots payload order ([layers][slots][K, V]): per frame and layer, one
// piece per run of consecutive rows.
int64_t ReplicaSender::send_ring(const std::vector<Item>& batch) {
  if (device_ >= 0 && batch.back().event) {
    check_cuda(cuda_event_wait(batch.back().event));  // the ring's rows are then visible here
  }
  const KVLayout& l = layout_;
  const int64_t entry = 2 * l.token_bytes();       // one slot of one layer
  const int64_t layer_stride = ring_rows_ * entry;  // ring_ and ring_rows_ do not change while rows are in flight
  const int64_t per_frame = std::max<int64_t>(1, frame_bytes_ / (entry * l.num_layers));
  struct Run {
    int64_t row, count;
  };
  std::vector<int64_t> blocks, slots;
  std::vector<Run> runs;
  int64_t frames = 0;
  auto flush = [&] {
    if (blocks.empty()) return;
    const int64_t k = static_cast<int64_t>(blocks.size());
    const int64_t nbytes = k * entry * l.num_layers;
    if (!skip_send_) {
      std::vector<iovec> pieces;
      pieces.reserve(static_cast<size_t>(l.num_layers) * runs.size());
      uint32_t crc = 0;
      for (int64_t layer = 0; layer < l.num_layers; ++layer)
        for (const Run& r : runs) {
          uint8_t* p = ring_ + layer * layer_stride + r.row * entry;
          const auto len = static_cast<size_t>(r.count * entry);
          crc = crc32c(p, len, crc);
          pieces.push_back({p, len});
        }
      send_request(data_header(true, blocks, slots, nbytes, crc), std::move(pieces));  // answered later (settle)
      ++frames;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      bytes_ += nbytes;
    }
    blocks.clear(), slots.clear(), runs.clear();
  };
  for (const Item& it : batch) {
    const int64_t n = static_cast<int64_t>(it.blocks.size());
    for (int64_t i = 0; i < n;) {
      const int64_t take = std::min(n - i, per_frame - static_cast<int64_t>(blocks.size()));
      const int64_t row = it.ring_row + i;
      if (!runs.empty() && runs.back().row + runs.back().count == row) {
        runs.back().count += take;
      } else {
        runs.push_back({row, take});
      }
      blocks.insert(blocks.end(), it.blocks.begin() + i, it.blocks.begin() + i + take);
      slots.insert(slots.end(), it.slots.begin() + i, it.slots.begin() + i + take);
      i += take;
      if (static_cast<int64_t>(blocks.size()) == per_frame) flush();
    }
  }
  flush();
  return frames;
}

void ReplicaSender::release_ring(int64_t end) {
  std::lock_guard<std::mutex> g(mu_);
  ring_tail_ = std::max(ring_tail_, end);
}

// Collects the holder's answers to the oldest ring batches until at most `keep` are in flight:
// each batch's steps are acknowledged and its rows freed once all its frames were answered.
void ReplicaSender::settle(size_t keep) {
  while (in_flight_.size() > keep) {
    InFlight& f = in_flight_.front();
    try {
      for (; f.replies > 0; --f.replies) expect_ok();
    } catch (const std::exception& e) {
      return fail_in_flight(f.tags.front(), e.what());
    }
    for (int64_t tag : f.tags) emit("replicated", tag);
    release_ring(f.ring_end);
    const auto n = static_cast<int64_t>(f.tags.size());
    in_flight_.pop_front();
    done(n);
  }
}

// A failure while ring batches are in flight: none of them is acknowledged (the watermark stays a
// prefix), their rows are freed, and replication to this holder stops until the next one.
void ReplicaSender::fail_in_flight(int64_t tag, const std::string& why) {
  disconnect();
  emit("failed", in_flight_.empty() ? tag : in_flight_.front().tags.front(), why);
  for (const InFlight& f : in_flight_) {
    release_ring(f.ring_end);
    done(static_cast<int64_t>(f.tags.size()));
  }
  in_flight_.clear();
}

}  // namespace dejavu
