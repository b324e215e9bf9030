"""Microbatch swapping on one worker: the KV of every microbatch lives in (pinned) host memory; the
device cache holds only `resident` microbatches, one per region of `region_blocks` blocks.

Block ids in step messages are the controller's logical ids (host blocks). A microbatch's step
first needs its blocks resident. `prefetch(mb, live)` is called when the step message arrives
(steps run in arrival order); it queues the microbatch, and regions go to the queued microbatches
in that order: the microbatch's own region, or else the least recently used one that neither the
running step nor a microbatch ahead in the queue holds. Every live logical block is mapped to a
device block of the region and its KV copied in, overlapping the step running now. When a step
ends (`write_back`) its region becomes free and the next queued microbatch's swap-in starts at
once: with two resident regions one computes while the other fills (double buffering), and a
prefetched region is never taken by a microbatch queued behind it. `acquire` waits for the copy;
blocks that were already mapped are not copied again. After the step only the blocks its new
tokens touched are written back (`write_back`), so the host copy is always current and evicting a
region costs nothing.

On CUDA both directions are copy-engine (DMA) copies on the swap stream between the pinned host
copy and the device cache, one 2-D copy (every layer) per run of consecutive blocks (no host-side
gather, no pageable staging, no host synchronisation, and no SMs: decode kernels running beside a
swap-in keep the whole GPU). Regions hand out their free blocks in ascending order so that a
microbatch's consecutive logical blocks land in consecutive device blocks. A swap-in is ordered
after earlier write-backs by the stream, a write-back after the step's compute by an event, and a
step waits for its swap-in only if it has not landed yet. DEJAVU_SWAP_COPY=kernel uses DéjàVuLib's
span-copy kernel instead (SMs read the host copy over PCIe; the earlier path, kept for comparison).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import _C
from ..kvstream.region import dma_copy_blocks


def _os_thread_name(name: str) -> None:
    """Name the calling thread for the OS too (top -H, /proc/<pid>/task/<tid>/comm: bench serve --chaos
    finds the swap-in thread by it)."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


class SwapError(RuntimeError):
    pass


class _CudaCopy:
    """A span copy queued on the swap stream; result() waits for it (the host only)."""

    def __init__(self, event: torch.cuda.Event, keep):
        self.event, self.keep = event, keep

    def done(self) -> bool:
        return self.event.query()

    def result(self) -> None:
        self.event.synchronize()
        self.keep = None


class _Region:
    def __init__(self, index: int, blocks: range):
        self.index = index
        self.mb: int | None = None
        self.map: dict[int, int] = {}
        self.free = list(blocks)
        self.ready: Future | None = None
        self.used = 0.0


class SwapCache:
    def __init__(self, device_tensor: torch.Tensor, host_blocks: int, resident: int, copy: str | None = None):
        self.dev = device_tensor  # [L, resident * region_blocks, 2, bs, kvh, hd]
        self.copy = copy or os.environ.get("DEJAVU_SWAP_COPY", "dma")
        if self.copy not in ("dma", "kernel"):
            raise SwapError(f"unknown swap copy {self.copy!r} (DEJAVU_SWAP_COPY): use dma or kernel")
        self.copies = 0  # CUDA copy operations issued (DMA runs, or kernels)
        self.device = device_tensor.device
        total = device_tensor.shape[1]
        if resident <= 0 or total % resident:
            raise SwapError(f"{total} device blocks do not split into {resident} resident microbatches")
        self.region_blocks = total // resident
        shape = (device_tensor.shape[0], host_blocks) + tuple(device_tensor.shape[2:])
        self.host = torch.zeros(shape, dtype=device_tensor.dtype, pin_memory=self.device.type == "cuda")
        self.regions = [_Region(i, range(i * self.region_blocks, (i + 1) * self.region_blocks)) for i in range(resident)]
        self.lock = threading.Lock()
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="swap-in", initializer=_os_thread_name, initargs=("swap-in",))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.in_use: _Region | None = None
        self.queued: list[tuple[int, list[int]]] = []  # (mb, live) of steps arrived and not started, in order
        self.bytes_in = self.bytes_out = 0
        self.wait_s = 0.0             # steps waiting for their swap-in: the exposed part
        self.steps, self.step_s = 0, 0.0
        self.warned = False
        self.block_bytes = self.dev[:, 0].numel() * self.dev.element_size()
        self.chunk_bytes = self.dev[0, 0].numel() * self.dev.element_size()  # one block of one layer

    def _cuda_copy(self, src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> _CudaCopy:
        """Copy blocks src[:, src_ids] -> dst[:, dst_ids] (every layer) on the swap stream: one DMA copy
        per run of consecutive ids, or one span-copy kernel; one of the two tensors is the pinned host copy."""
        if self.copy == "dma":
            with torch.cuda.device(self.device):
                self.copies += dma_copy_blocks(src, dst, src_ids, dst_ids, self.stream)
                evt = self.stream.record_event()
            return _CudaCopy(evt, [src, dst])
        layers, c = self.dev.shape[0], self.chunk_bytes
        self.copies += 1
        layer = torch.arange(layers, dtype=torch.int64).view(-1, 1)
        so = (layer * src.shape[1] + torch.tensor(src_ids, dtype=torch.int64).view(1, -1)) * c
        do = (layer * dst.shape[1] + torch.tensor(dst_ids, dtype=torch.int64).view(1, -1)) * c
        host = torch.stack([so.flatten(), do.flatten(), torch.full((so.numel(),), c, dtype=torch.int64)], 1)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            desc = host.pin_memory().to(self.device, non_blocking=True)
            _C.cuda_copy_spans(src.data_ptr(), dst.data_ptr(), desc.data_ptr(), host.shape[0], self.stream.cuda_stream,
                               c)
            evt = self.stream.record_event()
        return _CudaCopy(evt, [desc, src, dst])

    # ------------------------------------------------------------------ swap in
    def prefetch(self, mb: int, live: list[int]) -> None:
        """A step of `mb` arrived (it runs after those that arrived before it)."""
        with self.lock:
            self.queued = [q for q in self.queued if q[0] != mb] + [(mb, live)]
            self._schedule()

    def _schedule(self) -> None:
        """Regions to the queued microbatches, in order, as long as there is one that neither the
        running step nor a microbatch ahead holds; their swap-ins start now."""
        taken = {id(self.in_use)} if self.in_use is not None else set()
        for mb, live in self.queued:
            region = self._region_for(mb, taken)
            if region is None:
                return  # every region busy: this one starts when a step ends (write_back)
            if self._fill(region, mb, live) is None:
                return  # blocks of finished requests still mapped there: acquire() sorts it out
            taken.add(id(region))

    def _fill(self, region: "_Region", mb: int, live: list[int]) -> "_Region | None":
        """Map every live block of `mb` into `region` and start copying in those not there yet."""
        live_set = set(live)
        if region is not self.in_use:  # (a step running now may still write its blocks back)
            for lb in [b for b in region.map if b not in live_set]:  # blocks the microbatch gave up
                region.free.append(region.map.pop(lb))
        new = sorted(b for b in live if b not in region.map)
        if len(new) > len(region.free):
            if region is self.in_use:
                return None
            raise SwapError(f"microbatch {mb} holds {len(live)} blocks but a resident region has "
                            f"{self.region_blocks}; the controller's per-microbatch budget was exceeded")
        region.free.sort(reverse=True)  # pop() from the end: ascending device blocks, so runs stay runs
        pairs = [(lb, region.free.pop()) for lb in new]
        region.map.update(pairs)
        region.used = time.monotonic()
        if pairs and self.stream is not None:
            # Ordered after earlier copies (write-backs included) by the stream itself.
            region.ready = self._cuda_copy(self.host, self.dev, [p[0] for p in pairs], [p[1] for p in pairs])
        elif pairs:
            region.ready = self.copier.submit(self._copy_in, pairs, region.ready)
        self.bytes_in += len(pairs) * self.block_bytes
        return region

    def _region_for(self, mb: int, taken: set[int]) -> "_Region | None":
        for r in self.regions:
            if r.mb == mb:
                return r
        free = [r for r in self.regions if id(r) not in taken]
        if not free:
            return None
        victim = min(free, key=lambda r: (r.mb is not None, r.used))
        if victim.ready is not None and self.stream is None:
            # CPU: never drop a region while its copy is still landing (on CUDA the swap stream
            # orders the next copy into it after that one).
            victim.ready.result()
        victim.free.extend(victim.map.values())
        victim.map.clear()
        victim.mb = mb
        return victim

    def _copy_in(self, pairs, before: Future | None) -> None:
        """CPU: copy on the background copier thread."""
        if before is not None:
            before.result()
        src = torch.tensor([p[0] for p in pairs])
        dst = torch.tensor([p[1] for p in pairs])
        self.dev.index_copy_(1, dst, self.host.index_select(1, src))

    def acquire(self, mb: int, live: list[int]) -> dict[int, int]:
        """The microbatch's mapping logical -> device block, its KV resident (waits for the copy)."""
        with self.lock:  # one critical section: an arriving message cannot take the region meanwhile
            if self.in_use is not None:
                raise SwapError("a step acquired the cache before the previous one wrote back")
            self.queued = [q for q in self.queued if q[0] != mb]
            # Its prefetched region; else one that no queued microbatch holds; else (resident = 1,
            # or every region prefetched for others) the one the last queued microbatch holds.
            held = [m for m, _ in self.queued]
            region = self._region_for(mb, {id(r) for r in self.regions if r.mb in held})
            if region is None:
                last = next(r for m in reversed(held) for r in self.regions if r.mb == m)
                region = self._region_for(mb, {id(r) for r in self.regions if r is not last})
            region = self._fill(region, mb, live)  # maps nothing new when the prefetch did it
            self.in_use = region
            ready = region.ready
        if ready is not None and not ready.done():
            t0 = time.perf_counter()
            ready.result()
            self.wait_s += time.perf_counter() - t0
        return region.map

    def host_write(self, blocks: list[int]) -> None:
        """The caller is about to write these logical blocks straight into the host copy (prompt KV
        admitted on a disaggregated token worker): earlier write-backs land first, and no region
        keeps a device copy of them from an earlier owner (they are copied in at their next step)."""
        if self.stream is not None:
            self.stream.synchronize()
        drop = set(blocks)
        with self.lock:
            for r in self.regions:
                for b in drop & r.map.keys():
                    r.free.append(r.map.pop(b))

    def busy(self) -> bool:
        """A swap-in is still landing in some region."""
        with self.lock:
            return any(r.ready is not None and not r.ready.done() for r in self.regions)

    # ------------------------------------------------------------------ swap out
    def write_back(self, mapping: dict[int, int], blocks: list[int]) -> None:
        """Copy the given logical blocks (those the step's new tokens touched) to the host."""
        if self.stream is not None:
            # After the step's compute (even with nothing to copy: a later swap-in into this region
            # must not overwrite blocks that compute still reads).
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            if blocks:
                self._cuda_copy(self.dev, self.host, [mapping[b] for b in blocks], blocks)
                self.bytes_out += len(blocks) * self.block_bytes
        elif blocks:
            src = torch.tensor([mapping[b] for b in blocks])
            self.host.index_copy_(1, torch.tensor(blocks), self.dev.index_select(1, src))
            self.bytes_out += len(blocks) * self.block_bytes
        with self.lock:
            self.in_use = None
            self._schedule()  # the next queued microbatch fills the region this step frees

    def close(self) -> None:
        self.copier.shutdown(wait=True)
