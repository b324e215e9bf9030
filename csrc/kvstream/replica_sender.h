// The sending side of KV replication (`--replicate`), off the Python interpreter: a worker's step
// hands over the token slots it wrote (and, on a GPU, an event recorded after them) and returns; a
// thread of this class gathers those slots into pinned host memory (a copy kernel on its own CUDA
// stream, ordered after the event, or memcpy for a host cache), checksums them and sends them to
// the replica holder (python/dejavu/kvstream/replica.py's ReplicaServer, same msgpack protocol),
// then reports the acknowledgement as an event the worker forwards to its controller. Holding no
// interpreter lock, it never competes with the step loop for it.
//
// Order: items are processed first in, first out (a holder change takes effect between the items
// queued before and after it). Any failure (unreachable holder, refused frame, a step naming slots
// outside its block table) stops replication to that holder: later slots are dropped without
// acknowledgement until the next holder, so a request's replicated watermark is always a prefix.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <sys/uio.h>

#include "kvstream/layout.h"

namespace dejavu {

struct ReplicaEvent {
  std::string kind;   // "replicated" (a step's slots), "rereplicated" (whole blocks), "failed"
  int64_t tag = 0;
  int64_t bytes = 0;  // bytes sent to holders so far
  std::string error;  // "failed", or a re-seed that did not happen
};

// One sequence's new KV: positions [start, end) of its block table.
using Written = std::tuple<std::vector<int64_t>, int64_t, int64_t>;

class ReplicaSender {
 public:
  // cache: the paged cache's base (a device pointer when device >= 0, else host memory) laid out as
  // `layout`; src names the mirror at the holder; dtype is torch's name of the cache's dtype.
  // frame_bytes bounds one frame's payload (and the pinned buffer): larger items go as several frames.
  ReplicaSender(const KVLayout& layout, uintptr_t cache, int device, std::string src, std::string token,
                std::string dtype, double timeout_s, int64_t frame_bytes = int64_t{64} << 20);
  ~ReplicaSender();
  ReplicaSender(const ReplicaSender&) = delete;
  ReplicaSender& operator=(const ReplicaSender&) = delete;

  void set_holder(const std::string& host, int port);
  // stream: the cudaStream_t whose work so far wrote the slots (ignored for a host cache).
  void push_slots(int64_t tag, const std::vector<Written>& written, void* stream);
  void push_blocks(int64_t tag, const std::vector<int64_t>& blocks, void* stream);
  // Up to `every` consecutive steps share one gather and one frame, waiting at most linger_s for the next.
  void set_every(int64_t every, double linger_s);
  // A step's slots wait (at most lag_s) for the next step to be handed over before they are gathered
  // (0: gather at once). The watermark trails by that one step more.
  void set_lag(double lag_s);
  // Diagnostics (bench decode --replicate-skip): send zeros without touching the cache (gathered
  // items only: ring steps have no gather) / send nothing.
  void set_skip(bool gather, bool send);

  // The step ring: token-level replication without a copy of its own. A decode step's write-KV
  // kernel also writes each new token's K and V rows, over all layers, into `ring` (host memory laid
  // out [layers][rows][K, V][token bytes]; pinned, so a device kernel writes it over PCIe) at rows
  // that ring_stage reserved; ring_commit then queues the step like push_slots, and the sending thread
  // sends those rows as they are, once the step's event has completed, and frees them. There is no
  // gather, no second stream, and no CUDA call beyond one event per step.
  void ring_attach(uintptr_t ring, int64_t rows);
  // Reserves n consecutive rows for a step whose new tokens go to (blocks[i], slots[i]); returns the
  // first row, or -1 (no ring, ring full, bad slot): the step then goes through push_slots. Staging
  // again before a commit takes the uncommitted reservation back (its step was abandoned).
  int64_t ring_stage(const int64_t* blocks, const int64_t* slots, int64_t n);
  // Queues the staged step under `tag` (an event recorded on `stream` orders the send after its
  // kernels). False when nothing is staged or the staged step has other than n tokens (it is then
  // taken back): the caller uses push_slots instead.
  bool ring_commit(int64_t tag, int64_t n, void* stream);
  // Takes the uncommitted reservation back, if any (a step that will not be committed).
  void ring_cancel();
  // Steps that found the ring full (or a bad slot) and were staged nowhere.
  int64_t ring_misses() const;

  // Events so far, waiting up to timeout_s for the first and then linger_s for more; empty on timeout
  // or once closed.
  std::vector<ReplicaEvent> wait_events(double timeout_s, double linger_s);
  // True once every item pushed so far was processed (its events are then queued).
  bool drain(double timeout_s);
  int64_t bytes() const;
  int64_t events_total() const;
  void close();

 private:
  struct Item {
    enum Kind { kHolder, kSlots, kBlocks, kFail, kRing } kind = kSlots;
    int64_t tag = 0;
    int64_t ring_row = 0, ring_end = 0;  // kRing: first row, and the ring counter after its rows
    std::vector<int64_t> blocks, slots;
    std::string host, error;
    int port = 0;
    void* event = nullptr;
  };
  // Host memory of the sending thread: pinned and device-mapped (dev) for a device cache.
  struct HostBuffer {
    bool pinned = false;
    uint8_t* host = nullptr;
    void* dev = nullptr;
    int64_t cap = 0;
    void reserve(int64_t bytes, int64_t limit = INT64_MAX);  // contents are not kept
    void release();
  };
  void enqueue(Item it, void* stream);
  void push_fail(int64_t tag, const std::string& why);
  void run();
  void process(std::vector<Item>& batch);
  void connect(const std::string& host, int port);
  void disconnect();
  int64_t send_ring(const std::vector<Item>& batch);  // frames sent (each awaits its reply)
  std::vector<uint8_t> data_header(bool slots, const std::vector<int64_t>& blocks,
                                   const std::vector<int64_t>& slot_ids, int64_t nbytes, uint32_t crc) const;
  void release_ring(int64_t end);
  void settle(size_t keep);
  void fail_in_flight(int64_t tag, const std::string& why);
  void done(int64_t items);
  void send_frames(bool slots, const std::vector<int64_t>& blocks, const std::vector<int64_t>& slot_ids,
                   void* after);
  void gather(bool slots, const std::vector<int64_t>& blocks, const std::vector<int64_t>& slot_ids, int64_t nbytes,
              void* after);
  void wait_for_device();
  static constexpr int64_t kMaxDmaEntries = 256;  // more: the copy kernel (one launch)
  void request(const std::vector<uint8_t>& header, const uint8_t* payload, int64_t n);
  void request(const std::vector<uint8_t>& header, std::vector<iovec> pieces);
  void send_request(const std::vector<uint8_t>& header, std::vector<iovec> pieces);
  void expect_ok();
  void emit(const std::string& kind, int64_t tag, const std::string& error = "");

  const KVLayout layout_;
  uint8_t* const cache_;
  const int device_;
  const std::string src_, token_, dtype_;
  const double timeout_s_;
  const int64_t frame_bytes_;

  mutable std::mutex mu_;
  std::condition_variable cv_items_, cv_done_, cv_events_;
  std::deque<Item> items_;
  std::deque<ReplicaEvent> events_;
  std::vector<void*> free_events_;
  int64_t pushed_ = 0, processed_ = 0, events_total_ = 0, bytes_ = 0, every_ = 1;
  double linger_s_ = 0.05, lag_s_ = 0.002;
  int flush_ = 0;  // callers inside drain()
  bool stop_ = false;
  std::atomic<bool> skip_gather_{false}, skip_send_{false};
  // The ring (under mu_): rows are handed out at counter head_ and freed up to tail_ (both count
  // rows ever reserved, wasted ends included); staged_ is the reservation awaiting its commit.
  uint8_t* ring_ = nullptr;
  int64_t ring_rows_ = 0, ring_head_ = 0, ring_tail_ = 0, ring_misses_ = 0;
  bool staged_valid_ = false;
  Item staged_;
  int64_t staged_from_ = 0;  // head_ before the staged reservation (to take it back)

  // Owned by the sending thread.
  int fd_ = -1;
  std::string peer_;
  void* stream_ = nullptr;
  void* done_ = nullptr;
  HostBuffer buf_;   // one frame's payload
  HostBuffer desc_;  // copy rows for the copy kernel (device caches only)
  // Ring batches sent and not yet answered, oldest first: while the thread is behind, it sends the
  // next batch before the holder has answered the last (up to kMaxInFlight), so its checksumming
  // and sending overlap the holder's receiving and applying. Acknowledgements still go in order.
  struct InFlight {
    std::vector<int64_t> tags;
    int64_t ring_end = 0, replies = 0;
  };
  static constexpr size_t kMaxInFlight = 3;
  std::deque<InFlight> in_flight_;
  std::string init_error_;
  std::thread thread_;
};

}  // namespace dejavu
