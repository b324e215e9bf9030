"""Microbatch swapping on one worker: the KV of every microbatch lives in (pinned) host memory; the
device cache holds only `resident` microbatches, one per region of `region_blocks` blocks.

Block ids in step messages are the controller's logical ids (host blocks). A microbatch's step
first needs its blocks resident: `prefetch(mb, live)` (called when the step message arrives, so it
overlaps the step running now) picks the microbatch's region, or else the least recently used one
not in use, maps every live logical block to a device block of that region and copies its KV in
on a background copier; `acquire` waits for that copy, and blocks that were already mapped are not
copied again. After the step only the blocks its new tokens touched are written back
(`write_back`), so the host copy is always current and evicting a region costs nothing.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class SwapError(RuntimeError):
    pass


class _Region:
    def __init__(self, index: int, blocks: range):
        self.index = index
        self.mb: int | None = None
        self.map: dict[int, int] = {}
        self.free = list(blocks)
        self.ready: Future | None = None
        self.used = 0.0


class SwapCache:
    def __init__(self, device_tensor: torch.Tensor, host_blocks: int, resident: int):
        self.dev = device_tensor  # [L, resident * region_blocks, 2, bs, kvh, hd]
        self.device = device_tensor.device
        total = device_tensor.shape[1]
        if resident <= 0 or total % resident:
            raise SwapError(f"{total} device blocks do not split into {resident} resident microbatches")
        self.region_blocks = total // resident
        shape = (device_tensor.shape[0], host_blocks) + tuple(device_tensor.shape[2:])
        self.host = torch.zeros(shape, dtype=device_tensor.dtype, pin_memory=self.device.type == "cuda")
        self.regions = [_Region(i, range(i * self.region_blocks, (i + 1) * self.region_blocks)) for i in range(resident)]
        self.lock = threading.Lock()
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="swap-in")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.in_use: _Region | None = None
        self.bytes_in = self.bytes_out = 0
        self.wait_s = 0.0             # steps waiting for their swap-in: the exposed part
        self.steps, self.step_s = 0, 0.0
        self.warned = False
        self.block_bytes = self.dev[:, 0].numel() * self.dev.element_size()

    # ------------------------------------------------------------------ swap in
    def prefetch(self, mb: int, live: list[int]) -> None:
        with self.lock:
            self._prefetch(mb, live)

    def _prefetch(self, mb: int, live: list[int]) -> "_Region | None":
        region = self._region_for(mb)
        if region is None:
            return None  # every region busy (resident = 1): acquire() swaps it in when the step starts
        live_set = set(live)
        if region is not self.in_use:  # (a step running now may still write its blocks back)
            for lb in [b for b in region.map if b not in live_set]:  # blocks the microbatch gave up
                region.free.append(region.map.pop(lb))
        new = [b for b in live if b not in region.map]
        if len(new) > len(region.free):
            if region is self.in_use:
                return region  # blocks of finished requests still mapped: acquire() frees them first
            raise SwapError(f"microbatch {mb} holds {len(live)} blocks but a resident region has "
                            f"{self.region_blocks}; the controller's per-microbatch budget was exceeded")
        pairs = [(lb, region.free.pop()) for lb in new]
        region.map.update(pairs)
        region.used = time.monotonic()
        if pairs:
            region.ready = self.copier.submit(self._copy_in, pairs, region.ready)
        return region

    def _region_for(self, mb: int) -> _Region | None:
        for r in self.regions:
            if r.mb == mb:
                return r
        free = [r for r in self.regions if r is not self.in_use]
        if not free:
            return None
        victim = min(free, key=lambda r: (r.mb is not None, r.used))
        if victim.ready is not None:
            victim.ready.result()  # never drop a region while its copy is still landing
        victim.free.extend(victim.map.values())
        victim.map.clear()
        victim.mb = mb
        return victim

    def _copy_in(self, pairs, before: Future | None) -> None:
        if before is not None:
            before.result()
        src = torch.tensor([p[0] for p in pairs])
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        staged = self.host.index_select(1, src)
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.dev.index_copy_(1, dst, staged.to(self.device, non_blocking=False))
            self.stream.synchronize()
        else:
            self.dev.index_copy_(1, dst, staged)
        self.bytes_in += len(pairs) * self.block_bytes

    def acquire(self, mb: int, live: list[int]) -> dict[int, int]:
        """The microbatch's mapping logical -> device block, its KV resident (waits for the copy)."""
        with self.lock:  # one critical section: an arriving message cannot take the region meanwhile
            if self.in_use is not None:
                raise SwapError("a step acquired the cache before the previous one wrote back")
            region = self._prefetch(mb, live)  # maps nothing new when the arrival-time prefetch did it
            self.in_use = region
            ready = region.ready
        if ready is not None:
            t0 = time.perf_counter()
            ready.result()
            self.wait_s += time.perf_counter() - t0
        return region.map

    # ------------------------------------------------------------------ swap out
    def write_back(self, mapping: dict[int, int], blocks: list[int]) -> None:
        """Copy the given logical blocks (those the step's new tokens touched) to the host."""
        if blocks:
            src = torch.tensor([mapping[b] for b in blocks], device=self.device)
            self.host.index_copy_(1, torch.tensor(blocks), self.dev.index_select(1, src).to("cpu"))
            self.bytes_out += len(blocks) * self.block_bytes
        with self.lock:
            self.in_use = None

    def close(self) -> None:
        self.copier.shutdown(wait=True)
