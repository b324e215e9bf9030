// dejavu._C, DéjàVuLib's part: KV layouts and span arithmetic, host and device copies, the pinned
// pool, worker threads, file and TCP stores, the replica sender and holder.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "kvstream/blake2b.h"
#include "kvstream/cuda_copy.h"
#include "kvstream/ring_rows.h"
#include "kvstream/file_store.h"
#include "kvstream/handle.h"
#include "kvstream/host_copy.h"
#include "kvstream/host_pool.h"
#include "kvstream/layout.h"
#include "kvstream/replica_mirror.h"
#include "kvstream/replica_sender.h"
#include "kvstream/tcp_store.h"
#include "kvstream/worker_pool.h"

#include "bind.h"

namespace py = pybind11;
using namespace dejavu;
using dejavu::bind::as_ptr;

namespace {
std::vector<Span> to_spans(const std::vector<std::pair<int64_t, int64_t>>& v) {
  std::vector<Span> s;
  s.reserve(v.size());
  for (auto& [o, b] : v) {
    if (o < 0 || b < 0) throw std::invalid_argument("span with negative offset or size");
    s.push_back({o, b});
  }
  return s;
}
std::vector<std::pair<int64_t, int64_t>> from_spans(const std::vector<Span>& s) {
  std::vector<std::pair<int64_t, int64_t>> v;
  v.reserve(s.size());
  for (const Span& x : s) v.emplace_back(x.offset, x.bytes);
  return v;
}
}  // namespace

void dejavu::bind::bind_kvstream(py::module_& m) {
  py::class_<KVLayout>(m, "KVLayout")
      .def(py::init([](int64_t L, int64_t nb, int64_t bs, int64_t kvh, int64_t hd, int64_t es) {
             KVLayout k{L, nb, bs, kvh, hd, es};
             k.validate();
             return k;
           }),
           py::arg("num_layers"), py::arg("num_blocks"), py::arg("block_size"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("elem_size"))
      .def_readonly("num_layers", &KVLayout::num_layers)
      .def_readonly("num_blocks", &KVLayout::num_blocks)
      .def_readonly("block_size", &KVLayout::block_size)
      .def_readonly("num_kv_heads", &KVLayout::num_kv_heads)
      .def_readonly("head_dim", &KVLayout::head_dim)
      .def_readonly("elem_size", &KVLayout::elem_size)
      .def("token_bytes", &KVLayout::token_bytes)
      .def("chunk_bytes", &KVLayout::chunk_bytes)
      .def("total_bytes", &KVLayout::total_bytes)
      .def("chunk_offset", &KVLayout::chunk_offset)
      .def("token_offset", &KVLayout::token_offset);

  m.def("chunk_spans", [](const KVLayout& l, const std::vector<int64_t>& layers, const std::vector<int64_t>& blocks) {
    return from_spans(chunk_spans(l, layers, blocks));
  });
  m.def("token_spans", [](const KVLayout& l, const std::vector<int64_t>& layers, const std::vector<int64_t>& blocks,
                          const std::vector<int64_t>& slots) { return from_spans(token_spans(l, layers, blocks, slots)); });

  m.def("fill_copy_desc", [](const KVLayout& l, const std::vector<int64_t>& layers, const std::vector<int64_t>& blocks,
                             std::optional<std::vector<int64_t>> slots, bool out, int64_t piece_bytes,
                             uintptr_t desc, int64_t cap) {
    auto spans = slots ? token_spans(l, layers, blocks, *slots) : chunk_spans(l, layers, blocks);
    CopyDesc d = fill_copy_desc(spans, out, piece_bytes, as_ptr<int64_t>(desc), cap);
    return py::make_tuple(d.rows, d.bytes, d.piece_rows, d.piece_bytes);
  }, py::arg("layout"), py::arg("layers"), py::arg("blocks"), py::arg("slots"), py::arg("out"), py::arg("piece_bytes"),
     py::arg("desc"), py::arg("cap"),
     "Write (src, dst, bytes) copy rows for a region into the int64 buffer at desc (cap rows); "
     "returns (rows, bytes, piece_row_starts, piece_bytes).");
  m.def("copy_desc_rows_bound", [](const KVLayout& l, int64_t n_layers, int64_t n_entries, bool tokens, int64_t total,
                                   int64_t piece_bytes) {
    const int64_t spans = n_layers * n_entries * (tokens ? 2 : 1);
    return piece_bytes > 0 ? spans + total / piece_bytes + 1 : spans;
  });
  m.def("host_gather", [](uintptr_t base, const std::vector<std::pair<int64_t, int64_t>>& spans, uintptr_t dst, int threads) {
    auto s = to_spans(spans);
    py::gil_scoped_release nogil;
    return host_gather(as_ptr<const uint8_t>(base), s.data(), s.size(), as_ptr<uint8_t>(dst), threads);
  }, py::arg("base"), py::arg("spans"), py::arg("dst"), py::arg("threads") = 4,
     "Pack spans (offset, bytes) of the buffer at `base` into the buffer at `dst`; returns bytes copied.");
  m.def("host_scatter", [](uintptr_t base, const std::vector<std::pair<int64_t, int64_t>>& spans, uintptr_t src, int threads) {
    auto s = to_spans(spans);
    py::gil_scoped_release nogil;
    return host_scatter(as_ptr<uint8_t>(base), s.data(), s.size(), as_ptr<const uint8_t>(src), threads);
  }, py::arg("base"), py::arg("spans"), py::arg("src"), py::arg("threads") = 4,
     "Unpack the buffer at `src` into spans (offset, bytes) of the buffer at `base`; returns bytes copied.");
  m.def("crc32c", [](uintptr_t ptr, size_t n, uint32_t seed) {
    py::gil_scoped_release nogil;
    return crc32c(as_ptr<const uint8_t>(ptr), n, seed);
  }, py::arg("ptr"), py::arg("nbytes"), py::arg("seed") = 0);
  m.def("crc32c_items", [](uintptr_t base, uintptr_t item_offsets, int64_t n_items, uintptr_t piece_offsets,
                           int64_t n_pieces, int64_t piece_bytes, uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    crc32c_items(as_ptr<const uint8_t>(base), as_ptr<const int64_t>(item_offsets), n_items,
                 as_ptr<const int64_t>(piece_offsets), n_pieces, piece_bytes, as_ptr<int64_t>(out), threads);
  }, py::arg("base"), py::arg("item_offsets"), py::arg("n_items"), py::arg("piece_offsets"), py::arg("n_pieces"),
     py::arg("piece_bytes"), py::arg("out"), py::arg("threads") = 4,
     "One CRC-32C per item over its pieces, in place: item j covers piece_bytes at base + item_offsets[j] + "
     "piece_offsets[p] for each p in order (int64 arrays); results to the int64 array at out.");
  m.def("mac_items", [](py::bytes key, uintptr_t base, uintptr_t item_offsets, uintptr_t ids, int64_t n_items,
                        uintptr_t piece_offsets, int64_t n_pieces, int64_t piece_bytes, uintptr_t out) {
    std::string k = key;
    if (k.size() > 64) throw std::invalid_argument("a MAC key has at most 64 bytes");
    py::gil_scoped_release nogil;
    mac_items(k, as_ptr<const uint8_t>(base), as_ptr<const int64_t>(item_offsets), as_ptr<const int64_t>(ids), n_items,
              as_ptr<const int64_t>(piece_offsets), n_pieces, piece_bytes, as_ptr<int64_t>(out));
  }, py::arg("key"), py::arg("base"), py::arg("item_offsets"), py::arg("ids"), py::arg("n_items"),
     py::arg("piece_offsets"), py::arg("n_pieces"), py::arg("piece_bytes"), py::arg("out"),
     "As crc32c_items, but each item's keyed BLAKE2b-64 over le64(ids[2j]), le64(ids[2j+1]) and its pieces "
     "(the MAC of a replica slot on disk).");
  m.def("blake2b", [](py::bytes data, py::bytes key, int out_len) {
    std::string d = data, k = key;
    std::string out(static_cast<size_t>(out_len), '\0');
    Blake2b h(static_cast<size_t>(out_len), reinterpret_cast<const uint8_t*>(k.data()), k.size());
    h.update(reinterpret_cast<const uint8_t*>(d.data()), d.size());
    h.final(reinterpret_cast<uint8_t*>(out.data()));
    return py::bytes(out);
  }, py::arg("data"), py::arg("key") = py::bytes(""), py::arg("out_len") = 64, "Keyed BLAKE2b (RFC 7693), for tests.");

  // ---------------------------------------------------------------- errors
  auto base_err = py::register_exception<TransportError>(m, "TransportError", PyExc_ConnectionError);
  py::register_exception<PoolFull>(m, "PoolFull", PyExc_MemoryError);
  py::register_exception<CorruptChunk>(m, "CorruptChunk", PyExc_IOError);
  py::register_exception<ChunkNotFound>(m, "ChunkNotFound", PyExc_KeyError);
  (void)base_err;

  // ---------------------------------------------------------------- async engine
  py::class_<Handle, HandlePtr>(m, "Handle", "Completion of one asynchronous streaming operation")
      .def("test", &Handle::test, "True once finished (successfully or not)")
      .def("wait", [](const Handle& h, double timeout) {
        py::gil_scoped_release nogil;
        return h.wait(timeout);
      }, py::arg("timeout") = -1.0, "Wait up to timeout seconds (< 0: forever); True if finished")
      .def("failed", &Handle::failed)
      .def("error", &Handle::error)
      .def("bytes", &Handle::bytes);

  py::class_<WorkerPool>(m, "WorkerPool", "C++ worker threads that run host-side streaming work without the GIL")
      .def(py::init<int>(), py::arg("num_threads") = 2)
      .def_property_readonly("num_threads", &WorkerPool::num_threads)
      .def("pending", &WorkerPool::pending)
      .def("gather", [](WorkerPool& w, uintptr_t base, const std::vector<std::pair<int64_t, int64_t>>& spans,
                        uintptr_t dst, int threads) {
        auto s = to_spans(spans);
        return w.submit([s = std::move(s), base, dst, threads] {
          return host_gather(as_ptr<const uint8_t>(base), s.data(), s.size(), as_ptr<uint8_t>(dst), threads);
        });
      }, py::arg("base"), py::arg("spans"), py::arg("dst"), py::arg("threads") = 1)
      .def("scatter", [](WorkerPool& w, uintptr_t base, const std::vector<std::pair<int64_t, int64_t>>& spans,
                         uintptr_t src, int threads) {
        auto s = to_spans(spans);
        return w.submit([s = std::move(s), base, src, threads] {
          return host_scatter(as_ptr<uint8_t>(base), s.data(), s.size(), as_ptr<const uint8_t>(src), threads);
        });
      }, py::arg("base"), py::arg("spans"), py::arg("src"), py::arg("threads") = 1)
      .def("copy_rows", [](WorkerPool& w, uintptr_t src, uintptr_t dst, const std::vector<int64_t>& rows, int threads) {
        if (rows.size() % 3) throw std::invalid_argument("copy_rows: rows must be (src_offset, dst_offset, bytes) triples");
        return w.submit([rows, src, dst, threads] {
          return host_copy_rows(as_ptr<const uint8_t>(src), as_ptr<uint8_t>(dst), rows.data(), rows.size() / 3, threads);
        });
      }, py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("threads") = 1,
         "Copy rows (src_offset, dst_offset, bytes), flattened, from `src` to `dst` in one job")
      .def("file_write", [](WorkerPool& w, std::shared_ptr<FileStore> fs, const std::string& key, uintptr_t p, int64_t n) {
        check_key(key);
        return w.submit([fs, key, p, n] { return fs->write(key, as_ptr<const uint8_t>(p), n); });
      })
      .def("file_read", [](WorkerPool& w, std::shared_ptr<FileStore> fs, const std::string& key, uintptr_t p, int64_t cap) {
        check_key(key);
        return w.submit([fs, key, p, cap] { return fs->read(key, as_ptr<uint8_t>(p), cap); });
      })
      .def("tcp_put", [](WorkerPool& w, std::shared_ptr<TcpStoreClient> c, const std::string& key, uintptr_t p, int64_t n) {
        return w.submit([c, key, p, n] { return c->put(key, as_ptr<const uint8_t>(p), n); });
      })
      .def("tcp_put_spans", [](WorkerPool& w, std::shared_ptr<TcpStoreClient> c, const std::string& key, uintptr_t base,
                               const std::vector<std::pair<int64_t, int64_t>>& spans) {
        auto s = to_spans(spans);
        return w.submit([c, key, base, s = std::move(s)] { return c->put_spans(key, as_ptr<const uint8_t>(base), s.data(), s.size()); });
      }, py::arg("client"), py::arg("key"), py::arg("base"), py::arg("spans"),
         "Put the spans of base, in order, as one chunk (no gather copy); base must stay unchanged until done")
      .def("tcp_get", [](WorkerPool& w, std::shared_ptr<TcpStoreClient> c, const std::string& key, uintptr_t p, int64_t cap) {
        return w.submit([c, key, p, cap] { return c->get(key, as_ptr<uint8_t>(p), cap); });
      });

  py::class_<HostPool>(m, "HostPool", "Range allocator over one registered (pinned) host buffer")
      .def(py::init<int64_t, int64_t>(), py::arg("capacity"), py::arg("alignment") = 256)
      .def("allocate", &HostPool::allocate)
      .def("free", &HostPool::free)
      .def_property_readonly("capacity", &HostPool::capacity)
      .def_property_readonly("used", &HostPool::used)
      .def_property_readonly("largest_free", &HostPool::largest_free);

  // ---------------------------------------------------------------- destinations
  py::class_<FileStore, std::shared_ptr<FileStore>>(m, "FileStore", "Crash-consistent local-disk chunk store")
      .def(py::init<std::string, bool>(), py::arg("dir"), py::arg("durable") = false)
      .def_property_readonly("dir", &FileStore::dir)
      .def("write", [](const FileStore& fs, const std::string& key, uintptr_t p, int64_t n) {
        py::gil_scoped_release nogil;
        return fs.write(key, as_ptr<const uint8_t>(p), n);
      })
      .def("read", [](const FileStore& fs, const std::string& key, uintptr_t p, int64_t cap) {
        py::gil_scoped_release nogil;
        return fs.read(key, as_ptr<uint8_t>(p), cap);
      })
      .def("size", &FileStore::size)
      .def("remove", &FileStore::remove)
      .def("keys", &FileStore::keys)
      .def("path", &FileStore::path);

  py::class_<TcpStoreStats>(m, "TcpStoreStats")
      .def_readonly("connections", &TcpStoreStats::connections)
      .def_readonly("auth_failures", &TcpStoreStats::auth_failures)
      .def_readonly("refused_connections", &TcpStoreStats::refused_connections)
      .def_readonly("active", &TcpStoreStats::active)
      .def_readonly("bad_frames", &TcpStoreStats::bad_frames)
      .def_readonly("checksum_failures", &TcpStoreStats::checksum_failures)
      .def_readonly("truncated", &TcpStoreStats::truncated)
      .def_readonly("puts", &TcpStoreStats::puts)
      .def_readonly("gets", &TcpStoreStats::gets)
      .def_readonly("bytes_stored", &TcpStoreStats::bytes_stored);

  py::class_<TcpStoreServer, std::shared_ptr<TcpStoreServer>>(m, "TcpStoreServer",
                                                              "Chunks kept in this process's host memory, served over TCP")
      .def(py::init<const std::string&, int, std::string, int64_t>(), py::arg("host"), py::arg("port"),
           py::arg("token"), py::arg("max_bytes") = 0)
      .def_property_readonly("port", &TcpStoreServer::port)
      .def("stop", [](TcpStoreServer& s) {
        py::gil_scoped_release nogil;
        s.stop();
      })
      .def("contains", &TcpStoreServer::contains)
      .def("size", &TcpStoreServer::size)
      .def("get", [](const TcpStoreServer& s, const std::string& key, uintptr_t p, int64_t cap) {
        return s.get(key, as_ptr<uint8_t>(p), cap);
      })
      .def("erase", &TcpStoreServer::erase)
      .def("keys", &TcpStoreServer::keys)
      .def("stats", &TcpStoreServer::stats);

  py::class_<TcpStoreClient, std::shared_ptr<TcpStoreClient>>(m, "TcpStoreClient", "Connection to a TcpStoreServer")
      .def(py::init([](const std::string& host, int port, const std::string& token, double timeout) {
             py::gil_scoped_release nogil;
             return std::make_shared<TcpStoreClient>(host, port, token, timeout);
           }),
           py::arg("host"), py::arg("port"), py::arg("token"), py::arg("timeout") = 30.0)
      .def("put", [](TcpStoreClient& c, const std::string& key, uintptr_t p, int64_t n) {
        py::gil_scoped_release nogil;
        return c.put(key, as_ptr<const uint8_t>(p), n);
      })
      .def("get", [](TcpStoreClient& c, const std::string& key, uintptr_t p, int64_t cap) {
        py::gil_scoped_release nogil;
        return c.get(key, as_ptr<uint8_t>(p), cap);
      })
      .def("delete", &TcpStoreClient::del);

  py::class_<ReplicaEvent>(m, "ReplicaEvent")
      .def_readonly("kind", &ReplicaEvent::kind)
      .def_readonly("tag", &ReplicaEvent::tag)
      .def_readonly("bytes", &ReplicaEvent::bytes)
      .def_readonly("error", &ReplicaEvent::error);
  py::class_<ReplicaSender>(m, "ReplicaSender",
                            "Token-level KV replication to a ReplicaServer from a C++ thread (replica_sender.h)")
      .def(py::init<const KVLayout&, uintptr_t, int, std::string, std::string, std::string, double, int64_t>(),
           py::arg("layout"), py::arg("cache"), py::arg("device"), py::arg("src"), py::arg("token"), py::arg("dtype"),
           py::arg("timeout"), py::arg("frame_bytes") = int64_t{64} << 20)
      .def("set_holder", &ReplicaSender::set_holder, py::arg("host"), py::arg("port"))
      .def("push_slots", [](ReplicaSender& r, int64_t tag, const std::vector<Written>& written, uintptr_t stream) {
        py::gil_scoped_release nogil;
        r.push_slots(tag, written, as_ptr<void>(stream));
      }, py::arg("tag"), py::arg("written"), py::arg("stream") = 0,
         "Queue positions [start, end) of each (block table, start, end); stream: the cudaStream_t that wrote them")
      .def("push_blocks", [](ReplicaSender& r, int64_t tag, const std::vector<int64_t>& blocks, uintptr_t stream) {
        py::gil_scoped_release nogil;
        r.push_blocks(tag, blocks, as_ptr<void>(stream));
      }, py::arg("tag"), py::arg("blocks"), py::arg("stream") = 0)
      .def("ring_attach", &ReplicaSender::ring_attach, py::arg("ring"), py::arg("rows"),
           "Use `rows` rows at address `ring` ([layers][rows][K, V][token bytes]) as the step ring")
      .def("ring_stage", [](ReplicaSender& r, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& blocks,
                            const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& slots) {
        if (blocks.ndim() != 1 || slots.ndim() != 1 || blocks.shape(0) != slots.shape(0))
          throw std::invalid_argument("ring_stage takes two 1-D int64 arrays of the same length");
        return r.ring_stage(blocks.data(), slots.data(), blocks.shape(0));
      }, py::arg("blocks"), py::arg("slots"),
         "Reserve ring rows for a step's new tokens at (blocks[i], slots[i]): the first row, or -1")
      .def("ring_commit", [](ReplicaSender& r, int64_t tag, int64_t n, uintptr_t stream) {
        return r.ring_commit(tag, n, as_ptr<void>(stream));
      }, py::arg("tag"), py::arg("n"), py::arg("stream") = 0,
         "Queue the staged step of n tokens under tag; False when none (or another size) was staged")
      .def("ring_cancel", &ReplicaSender::ring_cancel, "Take back the uncommitted reservation, if any")
      .def("ring_misses", &ReplicaSender::ring_misses)
      .def("set_every", &ReplicaSender::set_every, py::arg("every"), py::arg("linger"))
      .def("set_skip", &ReplicaSender::set_skip, py::arg("gather"), py::arg("send"))
      .def("set_lag", &ReplicaSender::set_lag, py::arg("lag"))
      .def("wait_events", &ReplicaSender::wait_events, py::arg("timeout"), py::arg("linger") = 0.0,
           py::call_guard<py::gil_scoped_release>())
      .def("drain", &ReplicaSender::drain, py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("bytes", &ReplicaSender::bytes)
      .def("events_total", &ReplicaSender::events_total)
      .def("close", &ReplicaSender::close, py::call_guard<py::gil_scoped_release>());

  py::class_<ReplicaMirror, std::shared_ptr<ReplicaMirror>>(m, "ReplicaMirror",
                                                           "A replica holder's mirror of a paged cache (replica_mirror.h)")
      .def(py::init<const KVLayout&, uintptr_t, uintptr_t>(), py::arg("layout"), py::arg("data"), py::arg("chk"))
      .def("set_key", [](ReplicaMirror& m, py::bytes key) { m.set_key(std::string(key)); }, py::arg("key"))
      .def("put_slots", [](ReplicaMirror& m, const std::vector<int64_t>& blocks, const std::vector<int64_t>& slots,
                           uintptr_t payload, int64_t n) {
        py::gil_scoped_release nogil;
        m.put_slots(blocks, slots, as_ptr<const uint8_t>(payload), n);
      })
      .def("put_blocks", [](ReplicaMirror& m, const std::vector<int64_t>& blocks, uintptr_t payload, int64_t n) {
        py::gil_scoped_release nogil;
        m.put_blocks(blocks, as_ptr<const uint8_t>(payload), n);
      })
      .def("get_blocks", [](const ReplicaMirror& m, const std::vector<int64_t>& blocks, uintptr_t out, uintptr_t chk) {
        py::gil_scoped_release nogil;
        m.get_blocks(blocks, as_ptr<uint8_t>(out), as_ptr<int64_t>(chk));
      });
  py::class_<ReplicaFastPath>(m, "ReplicaFastPath")
      .def(py::init<int64_t>(), py::arg("max_payload") = int64_t{16} << 30)
      .def("add", &ReplicaFastPath::add, py::arg("src"), py::arg("mirror"))
      .def("serve", [](ReplicaFastPath& f, int fd) {
        std::string body;
        {
          py::gil_scoped_release nogil;
          body = f.serve(fd);
        }
        return py::bytes(body);
      }, py::arg("fd"), "Apply data frames until another frame (its header returned) or the peer closes (b'')")
      .def("bytes_in", &ReplicaFastPath::bytes_in)
      .def("refused", &ReplicaFastPath::refused);

  m.def("cuda_staged_copy", [](uintptr_t cache, uintptr_t host, uintptr_t desc, const std::vector<int64_t>& piece_rows,
                               const std::vector<int64_t>& piece_bytes, uintptr_t s0, uintptr_t s1, uintptr_t kstream,
                               uintptr_t dstream, bool out) {
    if (piece_rows.size() != piece_bytes.size() + 1) throw std::invalid_argument("piece_rows needs one more entry than piece_bytes");
    std::string err = cuda_staged_copy(as_ptr<void>(cache), as_ptr<void>(host), as_ptr<const int64_t>(desc), piece_rows,
                                       piece_bytes, as_ptr<void>(s0), as_ptr<void>(s1), as_ptr<void>(kstream),
                                       as_ptr<void>(dstream), out);
    if (!err.empty()) throw std::runtime_error(err);
  }, "Pipelined staged transfer between a device cache and a pinned host buffer (see cuda_copy.h)");
  m.def("block_runs", [](const std::vector<int64_t>& src, const std::vector<int64_t>& dst) {
    std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
    for (const BlockRun& r : block_runs(src, dst)) out.emplace_back(r.src, r.dst, r.count);
    return out;
  }, py::arg("src"), py::arg("dst"), "Block copies src[i] -> dst[i] grouped into (src, dst, count) runs of "
     "consecutive ids on both sides");
  m.def("cuda_dma_copy_blocks", [](uintptr_t src, uintptr_t dst, const std::vector<int64_t>& src_ids,
                                   const std::vector<int64_t>& dst_ids, int64_t num_layers, int64_t src_blocks,
                                   int64_t dst_blocks, int64_t chunk_bytes, uintptr_t stream) {
    const std::vector<BlockRun> runs = block_runs(src_ids, dst_ids);
    for (const BlockRun& r : runs)
      if (r.src + r.count > src_blocks || r.dst + r.count > dst_blocks)
        throw std::invalid_argument("cuda_dma_copy_blocks: a block id is past the end of its cache");
    std::string err;
    {
      py::gil_scoped_release nogil;  // a swap-in is enqueued from a worker's receiving thread
      err = cuda_dma_copy_blocks(as_ptr<const void>(src), as_ptr<void>(dst), runs, num_layers, src_blocks, dst_blocks,
                                 chunk_bytes, as_ptr<void>(stream));
    }
    if (!err.empty()) throw std::runtime_error(err);
    return runs.size();
  }, py::arg("src"), py::arg("dst"), py::arg("src_ids"), py::arg("dst_ids"), py::arg("num_layers"),
     py::arg("src_blocks"), py::arg("dst_blocks"), py::arg("chunk_bytes"), py::arg("stream") = 0,
     "Copy-engine copies of blocks src_ids[i] -> dst_ids[i] (every layer) between two [layers][blocks][chunk] "
     "caches, one 2-D copy per run of consecutive ids; returns the number of runs");
  m.def("cuda_compiled", &cuda_compiled);
  m.def("next_ring_row", &next_ring_row, "the first ring row ReplicaSender.ring_stage reserves for a step of n rows "
        "after one that took n rows from `first` (-1: none)", py::arg("first"), py::arg("n"), py::arg("size"));
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_copy_spans", [](uintptr_t src, uintptr_t dst, uintptr_t desc, int64_t n, uintptr_t stream,
                              int64_t max_bytes) {
    std::string err = cuda_copy_spans(as_ptr<const void>(src), as_ptr<void>(dst), as_ptr<const int64_t>(desc), n,
                                      as_ptr<void>(stream), max_bytes);
    if (!err.empty()) throw std::runtime_error(err);
  }, py::arg("src"), py::arg("dst"), py::arg("desc"), py::arg("n"), py::arg("stream") = 0, py::arg("max_bytes") = 0,
     "Copy n spans on a CUDA stream; desc is a device int64 array of (src_off, dst_off, bytes) triples. "
     "max_bytes (>= the largest span, 0: unknown) lets large spans spread over several thread blocks.");

}
