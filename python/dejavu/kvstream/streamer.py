"""KVStreamer: gather / scatter / flush / fetch / stream_out / stream_in over one paged KV cache.

Levels (the paper's ablation, selectable at run time):
  0 naive           one copy per span (per block and layer, or per token row)
  1 buffered        spans packed into few large transfers: on CUDA one copy kernel that reads or
                    writes the pinned host buffer itself over PCIe (mode "direct", the default), or
                    a gather kernel into device staging pipelined with the DMA engine (mode
                    "staged"); on CPU C++ worker threads without the GIL
  2 layer-by-layer  + stream_out sends each layer as soon as its compute event fires
  3 token-level     + asynchronous incremental (per-token) streaming; the default
GPU copies run on dedicated CUDA streams, ordered after the producing compute by events.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import _C
from .futures import Future, gather_futures
from .peer_stream import in_peer, out_peer
from .pool import PinnedPool
from .region import Region
from .transports import Destination, default_workers

LEVELS = {0: "naive", 1: "buffered", 2: "layer-by-layer", 3: "token-level"}
DEFAULT_LEVEL = 3
CUDA_MODES = ("auto", "staged", "direct")
# auto: staged for transfers larger than two staging pieces (0.94-0.96x of a contiguous copy on the
# H100 for 16-token blocks), direct below that (token-level: 280 us vs 330 us); docs/BENCHMARKS.md.
DEFAULT_CUDA_MODE = "auto"
# GPU -> remote GPU over NCCL: each piece is one send, and each send costs NCCL ~60 us beyond its
# bytes (2x H200 traces): 128 MiB pieces reached 0.58-0.66 of a raw send, 32 MiB ones 0.45-0.57.
DEFAULT_PEER_PIECE = 128 << 20


class PagedCache(Protocol):
    """What DéjàVuLib needs of a paged KV cache (the engine's PagedKVCache is one): the tensor
    [layers, blocks, 2, block_size, kv_heads, head_dim] and its layout for the C++ core."""
    tensor: torch.Tensor
    num_kv_heads: int

    def layout(self) -> "_C.KVLayout": ...


class _Direction:
    """One direction's streams and double-buffered staging on the device."""

    def __init__(self, device, piece_bytes):
        self.kernel = torch.cuda.Stream(device)
        self.dma = torch.cuda.Stream(device)
        self.staging = [torch.empty(piece_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.peer_bufs, self.peer_last = None, [None, None]  # GPU -> GPU over NCCL (allocated on first use)
        self.comm = torch.cuda.Stream(device)  # NCCL calls are issued from here, beside the copy kernels


class KVStreamer:
    def __init__(self, cache: PagedCache, level: int = DEFAULT_LEVEL, pool_bytes: int = 256 << 20,
                 piece_bytes: int = 8 << 20, cuda_mode: str = DEFAULT_CUDA_MODE, workers=None, threads: int = 4,
                 peer_piece_bytes: int = DEFAULT_PEER_PIECE):
        if level not in LEVELS:
            raise ValueError(f"streaming level must be one of {sorted(LEVELS)}, got {level!r}")
        if cuda_mode not in CUDA_MODES:
            raise ValueError(f"cuda_mode must be one of {CUDA_MODES}, got {cuda_mode!r}")
        if not cache.tensor.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous")
        self.cache, self.level, self.cuda_mode, self.threads = cache, level, cuda_mode, threads
        self.layout = cache.layout()
        self.flat = cache.tensor.view(-1).view(torch.uint8)
        self.device = cache.tensor.device
        self.is_cuda = self.device.type == "cuda"
        self.pool = PinnedPool(pool_bytes, pin=self.is_cuda or None)
        self.workers = workers or default_workers()
        self.piece_bytes = piece_bytes
        self.peer_piece_bytes = peer_piece_bytes  # GPU -> GPU over NCCL: bytes per pipelined send
        if self.is_cuda:
            if not _C.cuda_compiled():
                raise RuntimeError("a CUDA KV cache needs dejavu built with CUDA (DEJAVU_CUDA=on)")
            self._out = _Direction(self.device, piece_bytes)
            self._in = _Direction(self.device, piece_bytes)

    # ------------------------------------------------------------------ gather / scatter
    def gather(self, region: Region, dst: torch.Tensor, after=None) -> Future:
        """Pack `region` of the cache into the uint8 tensor `dst` (host or device)."""
        return self._move(region, dst, out=True, after=after, what=f"gather of {region.describe()}")

    def scatter(self, region: Region, src: torch.Tensor, after=None) -> Future:
        """Unpack the uint8 tensor `src` (as gather packs it) into `region` of the cache."""
        return self._move(region, src, out=False, after=after, what=f"scatter of {region.describe()}")

    def _move(self, region: Region, buf: torch.Tensor, out: bool, after, what: str) -> Future:
        nbytes = region.nbytes(self.layout)
        if buf.dtype != torch.uint8 or not buf.is_contiguous() or buf.numel() < nbytes:
            raise ValueError(f"{what}: needs a contiguous uint8 buffer of >= {nbytes} bytes")
        if not self.is_cuda:
            if buf.device.type != "cpu":
                raise ValueError(f"{what}: a CPU cache streams to CPU buffers")
            spans = region.spans(self.layout)
            if self.level == 0:
                packed = 0
                for off, n in spans:
                    if out:
                        buf[packed:packed + n].copy_(self.flat[off:off + n])
                    else:
                        self.flat[off:off + n].copy_(buf[packed:packed + n])
                    packed += n
                return Future.completed(what, nbytes)
            fn = self.workers.gather if out else self.workers.scatter
            h = fn(self.flat.data_ptr(), spans, buf.data_ptr(), self.threads)
            return Future(what, parts=[h], keep=[buf, self.cache.tensor], nbytes=nbytes)
        return self._move_cuda(region, buf, out, after, what, nbytes)

    def copy_blocks(self, blocks, host: torch.Tensor, offsets, out: bool, layers=None, after=None) -> Future:
        """Many whole blocks between the cache and scattered ranges of one host buffer, in one copy
        call: block i's chunks of `layers` (default all), packed as gather packs a one-block region,
        at host[offsets[i]:]. out: cache -> host (an offload), else host -> cache (a restore)."""
        layers = tuple(range(self.layout.num_layers)) if layers is None else tuple(layers)
        per = Region.chunks(layers, [0]).nbytes(self.layout)
        what = f"{'gather' if out else 'scatter'} of {len(layers)} layers x {len(blocks)} blocks (batched)"
        if len(blocks) != len(offsets):
            raise ValueError(f"{what}: {len(blocks)} blocks but {len(offsets)} offsets")
        if host.dtype != torch.uint8 or not host.is_contiguous() or host.device.type != "cpu":
            raise ValueError(f"{what}: needs a contiguous uint8 host buffer")
        if any(o < 0 or o + per > host.numel() for o in offsets):
            raise ValueError(f"{what}: a range of {per} bytes lies outside the {host.numel()}-byte host buffer")
        rows = []
        for b, o in zip(blocks, offsets):
            for off, n in Region.chunks(layers, [b]).spans(self.layout):
                rows += (off, o, n) if out else (o, off, n)
                o += n
        nbytes = per * len(blocks)
        src, dst = (self.flat, host) if out else (host, self.flat)
        if not rows:
            return Future.completed(what)
        if not self.is_cuda:
            h = self.workers.copy_rows(src.data_ptr(), dst.data_ptr(), rows, self.threads)
            return Future(what, parts=[h], keep=[host, self.cache.tensor], nbytes=nbytes)
        if not host.is_pinned():
            raise ValueError(f"{what}: host buffers for a CUDA cache must be pinned (use the pool)")
        with torch.cuda.device(self.device):
            d = self._out if out else self._in
            d.kernel.wait_event(after if after is not None else torch.cuda.current_stream(self.device).record_event())
            table = torch.tensor(rows, dtype=torch.int64).view(-1, 3).pin_memory()
            with torch.cuda.stream(d.kernel):
                desc = table.to(self.device, non_blocking=True)
            # One kernel reads (or writes) the pinned host ranges over PCIe itself.
            _C.cuda_copy_spans(src.data_ptr(), dst.data_ptr(), desc.data_ptr(), desc.shape[0], d.kernel.cuda_stream,
                               max(rows[2::3]))
            evt = d.kernel.record_event()
        return Future(what, parts=[evt], keep=[host, self.cache.tensor, desc, table], nbytes=nbytes, event=evt)

    def _host_desc(self, region: Region, out: bool, piece_bytes: int):
        """Copy rows built in C++ into a pinned buffer: (tensor, rows, piece_row_starts, piece_bytes,
        largest row bytes)."""
        tokens = region.slots is not None
        cap = _C.copy_desc_rows_bound(self.layout, len(region.layers), len(region.blocks), tokens,
                                      region.nbytes(self.layout), piece_bytes)
        host = torch.empty((max(cap, 1), 3), dtype=torch.int64, pin_memory=True)
        rows, _, prow, pbytes = _C.fill_copy_desc(self.layout, region.layers, region.blocks, region.slots, out,
                                                  piece_bytes, host.data_ptr(), cap)
        biggest = int(host[:rows, 2].max()) if rows else 0  # lets the copy kernel split large spans
        return host, rows, prow, pbytes, biggest

    def descriptors(self, region: Region, out: bool = True) -> tuple[torch.Tensor, int]:
        """`region`'s copy descriptor rows (one span each) as gather (out) or scatter builds them, in
        pinned memory, and how many there are (benchmarks/profile_kvstream.py times this apart)."""
        host, rows, _, _, _ = self._host_desc(region, out, 0)
        return host, rows

    def _device_desc(self, region: Region, out: bool, piece_bytes: int, stream, host_rows=None):
        """The copy rows on the device (copied on `stream`): (desc, piece_row_starts, piece_bytes,
        largest row bytes). `host_rows`: what _host_desc already built for these arguments."""
        host, rows, prow, pbytes, biggest = host_rows or self._host_desc(region, out, piece_bytes)
        with torch.cuda.stream(stream):
            desc = host[:rows].to(self.device, non_blocking=True)
        return desc, prow, pbytes, biggest

    def _move_cuda(self, region, buf, out, after, what, nbytes) -> Future:
        with torch.cuda.device(self.device):  # may run on the progress thread
            return self._move_cuda_on_device(region, buf, out, after, what, nbytes)

    def _move_cuda_on_device(self, region, buf, out, after, what, nbytes) -> Future:
        d = self._out if out else self._in
        if after is None:
            after = torch.cuda.current_stream(self.device).record_event()
        keep = [buf, self.cache.tensor]
        on_device = buf.device.type == "cuda"
        if not on_device and not buf.is_pinned():
            raise ValueError(f"{what}: host buffers for a CUDA cache must be pinned (use the pool)")
        d.kernel.wait_event(after)
        d.dma.wait_event(after)
        if self.level == 0:
            with torch.cuda.stream(d.dma):
                packed = 0
                for off, n in region.spans(self.layout):
                    if out:
                        buf[packed:packed + n].copy_(self.flat[off:off + n], non_blocking=True)
                    else:
                        self.flat[off:off + n].copy_(buf[packed:packed + n], non_blocking=True)
                    packed += n
            evt = d.dma.record_event()
            return Future(what, parts=[evt], keep=keep, nbytes=nbytes, event=evt)
        mode = self.cuda_mode
        if mode == "auto":
            mode = "staged" if nbytes > 2 * self.piece_bytes else "direct"
        staged = not on_device and mode == "staged"
        desc, prow, pbytes, biggest = self._device_desc(region, out, self.piece_bytes if staged else 0, d.kernel)
        keep.append(desc)
        if not staged:
            # One kernel; with a pinned host buffer it reads or writes host memory over PCIe itself.
            src, dst = (self.flat, buf) if out else (buf, self.flat)
            _C.cuda_copy_spans(src.data_ptr(), dst.data_ptr(), desc.data_ptr(), desc.shape[0], d.kernel.cuda_stream,
                               biggest)
            evt = d.kernel.record_event()
            return Future(what, parts=[evt], keep=keep, nbytes=nbytes, event=evt)
        # Staged: piece i+1's gather kernel overlaps piece i's DMA (one C++ call enqueues it all).
        _C.cuda_staged_copy(self.flat.data_ptr(), buf.data_ptr(), desc.data_ptr(), prow, pbytes,
                            d.staging[0].data_ptr(), d.staging[1].data_ptr(), d.kernel.cuda_stream, d.dma.cuda_stream,
                            out)
        evt = (d.dma if out else d.kernel).record_event()
        return Future(what, parts=[evt], keep=keep, nbytes=nbytes, event=evt)

    # ------------------------------------------------------------------ flush / fetch
    def flush(self, buf: torch.Tensor, dest: Destination, key: str) -> Future:
        """One contiguous host buffer to a destination."""
        return dest.put(key, buf)

    def fetch(self, dest: Destination, key: str, buf: torch.Tensor) -> Future:
        """One contiguous chunk from a destination into a host buffer."""
        return dest.get(key, buf)

    # ------------------------------------------------------------------ stream_out / stream_in
    def stream_out(self, region: Region, dest: Destination, key: str, layer_events=None, after=None) -> Future:
        """Gather `region` into pooled pinned memory and flush it to `dest` under `key`, after the
        CUDA event `after` (default: the work queued so far on the current stream).
        With level >= 2 and one CUDA event per layer, each layer leaves as soon as its event fires,
        under key f"{key}.l{i}" (stream_in(per_layer=True) reads them back)."""
        if self.is_cuda and getattr(dest, "device_direct", False):
            if layer_events is not None:
                after = layer_events[-1]
            return out_peer(self, region, dest, key, after)
        if layer_events is not None and self.level >= 2:
            if len(layer_events) != len(region.layers):
                raise ValueError(f"{len(region.layers)} layers but {len(layer_events)} layer events")
            parts = [self._out_one(region.layer(i), dest, f"{key}.l{i}", ev) for i, ev in enumerate(layer_events)]
            return gather_futures(f"stream_out {key!r} layer by layer", parts)
        return self._out_one(region, dest, key, after)

    def _out_one(self, region, dest, key, after) -> Future:
        if not self.is_cuda and self.level > 0 and hasattr(dest, "put_spans"):
            # A host cache goes to a socket straight from its spans: the send is the only copy.
            return dest.put_spans(key, self.flat, region.spans(self.layout))
        n = region.nbytes(self.layout)
        buf = self.pool.alloc(n)
        g = self.gather(region, buf.tensor, after=after)
        return Future(f"stream_out {key!r}", parts=[g], then=lambda: dest.put(key, buf.tensor),
                      cleanup=buf.free, nbytes=n).drive()

    def stream_in(self, dest: Destination, key: str, region: Region, per_layer: bool = False) -> Future:
        """Fetch `key` from `dest` into pooled pinned memory and scatter it into `region`."""
        if self.is_cuda and getattr(dest, "device_direct", False):
            return in_peer(self, dest, key, region)
        if per_layer:
            parts = [self.stream_in(dest, f"{key}.l{i}", region.layer(i)) for i in range(len(region.layers))]
            return gather_futures(f"stream_in {key!r} layer by layer", parts)
        n = region.nbytes(self.layout)
        buf = self.pool.alloc(n)
        f = dest.get(key, buf.tensor)
        return Future(f"stream_in {key!r}", parts=[f], then=lambda: self.scatter(region, buf.tensor),
                      cleanup=buf.free, nbytes=n).drive()
