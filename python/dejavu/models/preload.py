"""Stage weights held ready by a standby worker (docs/fault-tolerance.md, "Standbys hold weights").

A standby loads, in the background, the weights of the stages the controller expects it to
replace: into (pinned, where CUDA exists) host memory, or into device memory. Taking a stage over
then costs a copy into a freshly allocated model (PCIe rates from pinned memory) or nothing at all
(device memory, same device), not a checkpoint read and conversion. What is held is bounded: at
most half the memory available where it is kept, counted before each stage is loaded.

The tensors are exactly what `load_model` would produce on the worker's device: random weights
are generated on that device (its generator differs from the CPU's), checkpoints are converted
on the host as `load_model` does.
"""
from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from .loader import load_model, parse_dtype, resolve, skeleton

log = logging.getLogger("dejavu.preload")

WHERE = ("off", "host", "device")
MEMORY_WAIT_S = 10.0  # how long a replacement retries device allocations while a dying worker frees memory


@dataclass
class Held:
    where: str                    # host or device
    cfg: object                   # the model's config (what a skeleton is built from)
    model: torch.nn.Module | None  # device: the model itself, on its device
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # host: parameter name -> pinned copy


def stage_key(spec: str, dtype: str, seed: int, layers, tp_rank: int, tp_size: int) -> tuple:
    return (spec, str(dtype).replace("torch.", ""), int(seed), tuple(int(x) for x in layers), tp_rank, tp_size)


def _available_host() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def budget(where: str, device: torch.device) -> int:
    """Bytes of weights a standby may hold there: half of what is free now."""
    if where == "device" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _available_host() // 2


def stage_bytes(cfg, dtype: torch.dtype, layers, tp_rank: int, tp_size: int) -> int:
    """A stage's weight bytes (counted on a meta skeleton of model config `cfg`: nothing allocated)."""
    m = skeleton(cfg, torch.device("meta"), dtype, tuple(layers), (tp_rank, tp_size))
    return sum(p.numel() * p.element_size() for p in m.parameters())


class Preloader:
    """The weights one standby holds (keyed by stage_key), and the thread loading them."""

    def __init__(self):
        self.held: dict[tuple, Held] = {}
        self.thread: threading.Thread | None = None
        self.want: tuple | None = None  # the standby was given this stage: the only one still worth loading
        self.segment = None  # a restore segment kept ready (replica_local.RestoreSegment)
        self.pinned = None  # pinned host memory kept ready for the replication ring (serving/replication.py)
        self.warm_up = None  # callable(cfg, device, dtype, tp) run once on what was loaded (cluster/warmup.py)
        self._warm_with = None  # (cfg, device, dtype, (tp rank, tp size)) of the first stage loaded

    def start(self, msg, token: str) -> None:
        """Load msg.stages (messages.Preload, most likely first) in the background, while they fit;
        then make the restore segment (kvstream/replica_local.py) and the replication ring's pinned
        memory for the largest of their caches, then run `warm_up` on the first stage's model config."""
        if msg.where == "off" or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._prepare, args=(msg, token), daemon=True, name="preload")
        self.thread.start()

    def _prepare(self, msg, token: str) -> None:
        self._load_all(msg)
        self._make_segment(msg, token)
        self._make_pinned(msg)
        if self.warm_up is not None and self._warm_with is not None and self.want is None:
            try:
                self.warm_up(*self._warm_with)
            except Exception as e:  # noqa: BLE001 - a cold standby still takes over
                log.warning("standby: warm-up failed (%s: %s)", type(e).__name__, e)

    def _make_segment(self, msg, token: str) -> None:
        kv = max((st.kv_bytes for st in msg.stages), default=0)
        if not kv or self.want is not None or kv > budget("host", torch.device("cpu")):
            return
        from ..kvstream.replica_local import new_segment

        seg = new_segment(token, "standby", kv, "a standby's restore makes its segment then")
        if seg is None:
            return
        atexit.register(seg.close)  # never left in /dev/shm by a clean exit (cleanup_orphans: a killed one)
        seg.prefault()
        self.segment = seg

    def _make_pinned(self, msg) -> None:
        from ..serving.replication import ring_budget

        n = ring_budget(max((st.kv_bytes for st in msg.stages), default=0))
        if not n or self.want is not None or not msg.device.startswith("cuda") or not torch.cuda.is_available():
            return
        if n > budget("host", torch.device("cpu")):
            return
        self.pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def take_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """The pinned memory made ahead of time, as a tensor of `shape` (None: none held, or too small)."""
        n = math.prod(shape) * dtype.itemsize
        if self.pinned is None or self.pinned.numel() < n:
            self.drop_pinned()
            return None
        buf, self.pinned = self.pinned, None
        return buf[:n].view(dtype).view(shape)

    def drop_pinned(self) -> None:
        """Give pinned memory no ring took back to the system (torch's host cache would keep it)."""
        if self.pinned is None:
            return
        self.pinned = None
        empty = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
        if empty is not None and torch.cuda.is_available():
            empty()

    def take_segment(self, nbytes: int):
        """The restore segment made ahead of time, for a restore of `nbytes` (None: none fits)."""
        seg, self.segment = self.segment, None
        if seg is not None and seg.tensor.numel() < nbytes:
            seg.close()
            return None
        if seg is not None:
            seg.used = nbytes
        return seg

    def _load_all(self, msg) -> None:
        try:
            src = resolve(msg.model)
            for st in msg.stages:
                dev = torch.device(msg.device)
                if dev.type == "cuda":
                    dev = torch.device(f"cuda:{st.local_rank % torch.cuda.device_count()}")
                dtype = parse_dtype(msg.dtype, dev, src.dtype)
                key = stage_key(msg.model, dtype, msg.seed, st.layers, st.tp_rank, msg.tp)
                if self.want is not None and key != self.want:
                    continue
                n = stage_bytes(src.config, dtype, st.layers, st.tp_rank, msg.tp)
                # host copies of a checkpoint pass through an unpinned model first: twice the size
                # (what is held already is no longer available: the bound covers it)
                if n * (2 if msg.where == "host" else 1) > budget(msg.where, dev):
                    log.warning("standby: stage layers %s (%d MiB) do not fit the %s memory bound; not preloaded",
                                st.layers, n >> 20, msg.where)
                    continue
                t0 = time.perf_counter()
                self.held[key] = self._load(src, msg, st, dev, dtype)
                self._warm_with = self._warm_with or (self.held[key].cfg, dev, dtype, (st.tp_rank, msg.tp))
                log.info("standby: layers %s held in %s memory (%d MiB, %.2fs)", st.layers, msg.where, n >> 20,
                         time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a standby without preloaded weights still takes over
            log.warning("standby: preloading weights failed (%s: %s); a takeover loads them", type(e).__name__, e)

    @staticmethod
    def _load(src, msg, st, dev: torch.device, dtype: torch.dtype) -> Held:
        rng = (st.layers[0], st.layers[1])
        if msg.where == "device":
            model = load_model(src, dev, dtype, seed=msg.seed, layer_range=rng, tp_rank=st.tp_rank, tp_size=msg.tp)
            return Held("device", model.cfg, model)
        # host: generated where load_model would generate it (random weights), read on the host otherwise
        gen = dev if src.kind == "random" else torch.device("cpu")
        model = load_model(src, gen, dtype, seed=msg.seed, layer_range=rng, tp_rank=st.tp_rank, tp_size=msg.tp)
        if gen.type == "cpu" and not torch.cuda.is_available():
            return Held("host", model.cfg, model)  # a CPU-only host: the CPU model is the host copy
        tensors = {}
        for name, p in model.named_parameters():  # into pinned memory, which the copy engine reads at PCIe rates
            t = tensors[name] = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            t.copy_(p.detach())
        cfg = model.cfg
        del model
        if gen.type == "cuda":
            torch.cuda.empty_cache()
        return Held("host", cfg, None, tensors)

    def take(self, spec: str, device: torch.device, dtype: torch.dtype, seed: int, layers, tp_rank: int,
             tp_size: int, wait_s: float = MEMORY_WAIT_S):
        """The stage's model on `device` from what is held (None: not held); the rest is dropped.
        A preload still running finishes the stage it is loading, and then this one if it is on its list."""
        key = self.want = stage_key(spec, dtype, seed, layers, tp_rank, tp_size)
        if self.thread is not None:
            self.thread.join()
        held = self.held.pop(key, None)
        self.held.clear()
        if held is None:
            return None, None
        if held.model is not None and next(held.model.parameters()).device == device:
            return held.model, held.where  # already where it runs (device memory, or a CPU deployment's host)
        return while_memory_frees(lambda: copy_in(held, device, dtype, tuple(layers), (tp_rank, tp_size)),
                                  device, wait_s), held.where


def while_memory_frees(fn, device: torch.device, wait_s: float = MEMORY_WAIT_S):
    """fn(), tried again for up to wait_s while it runs out of device memory: a replacement starts
    while the failed worker's process, on the same GPU, may still be exiting and freeing its memory
    (the controller reaps it meanwhile, not before)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda" or time.monotonic() > deadline:
                raise
            torch.cuda.empty_cache()
            time.sleep(0.05)


def copy_in(held: Held, device: torch.device, dtype: torch.dtype, layers: tuple[int, int], tp: tuple[int, int]):
    """A new model on `device` filled from the held tensors (or held model): one copy per tensor,
    from pinned memory at PCIe rates."""
    src = held.model.named_parameters() if held.model is not None else held.tensors.items()
    model = skeleton(held.cfg, device, dtype, layers, tp)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in src:
            params[name].copy_(t, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model.eval()


PRELOADER = Preloader()  # this process's (a standby's) held weights
