"""`dejavu worker`: one process holding one pipeline stage (one tensor-parallel shard of it) and
its KV cache. Rank r is stage r // tp, TP rank r % tp.

It connects to the controller (HELLO with the cluster token), receives its configuration, loads
its layer range, joins the workers' torch.distributed group (gloo on CPU, NCCL across GPUs), says
READY (or ERROR with the reason) and then runs the steps the controller sends, in order: the
first stage embeds the step's tokens, every other stage receives hidden states from the stage
before it, the last stage computes logits, samples and returns the tokens. A worker exits when
the controller says so, when its control connection closes, or when its parent dies.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch

from ..engine.kv_cache import PagedKVCache
from ..engine.model_runner import build_metadata
from ..engine.sampler import sample
from ..models.loader import load_model, parse_dtype, resolve
from ..parallel.wire import Channel, connect
from ..sampling_params import SamplingParams


def _env_rank() -> int | None:
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK"):
        if os.environ.get(k) is not None:
            return int(os.environ[k])
    return None


def _watch_parent(parent: int) -> None:
    def loop():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


class StageWorker:
    def __init__(self, ch: Channel, cfg: dict, rank: int):
        import torch.distributed as dist

        self.ch, self.rank = ch, rank
        self.pp, self.tp = cfg["pp"], cfg["tp"]
        self.stage, self.tp_rank = divmod(rank, self.tp)
        start, end = cfg["layers"][self.stage]
        dev = cfg["device"]
        if dev == "cuda":
            dev = f"cuda:{rank % torch.cuda.device_count()}"
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = parse_dtype(cfg["dtype"], self.device)
        if self.device.type == "cpu":
            # Share the host's cores among the workers instead of oversubscribing them.
            threads = int(os.environ.get("DEJAVU_WORKER_THREADS", 0)) or max(1, (os.cpu_count() or 1) // cfg["world"])
            torch.set_num_threads(threads)
        src = resolve(cfg["model"])
        self.model = load_model(src, self.device, self.dtype, seed=cfg["seed"], layer_range=(start, end),
                                tp_rank=self.tp_rank, tp_size=self.tp)
        mc = self.model.cfg
        self.cache = PagedKVCache(end - start, cfg["num_blocks"], cfg["block_size"], mc.num_kv_heads, mc.head_dim,
                                  self.dtype, self.device)
        self.backend = cfg["backend"]
        self.hidden = mc.hidden_size
        self.dist = dist
        if cfg["world"] > 1:
            dist.init_process_group(self.backend, init_method=f"tcp://{cfg['master']}", rank=rank,
                                    world_size=cfg["world"], timeout=datetime.timedelta(seconds=cfg["timeout"]))
            if self.tp > 1:
                # Every rank creates every stage's TP group, in the same order (new_group is collective).
                groups = [dist.new_group(list(range(s * self.tp, (s + 1) * self.tp))) for s in range(self.pp)]
                self.model.set_tp_group(groups[self.stage])
        self.pending_sends = []
        self.wire_device = self.device if self.backend == "nccl" else torch.device("cpu")

    @torch.inference_mode()
    def step(self, msg: dict) -> None:
        items = [(s["ids"], s["start"], s["blocks"]) for s in msg["seqs"]]
        ids, pos, meta, last = build_metadata(items, self.cache.block_size, self.device)
        if self.stage == 0:
            x = ids
        else:
            buf = torch.empty((ids.numel(), self.hidden), dtype=self.dtype, device=self.wire_device)
            self.dist.recv(buf, src=self.rank - self.tp)  # same TP rank, previous stage
            x = buf.to(self.device)
        h = self.model(x, pos, meta, self.cache.tensor)
        if self.stage < self.pp - 1:
            out = h.to(self.wire_device).contiguous()
            self.pending_sends = [w for w in self.pending_sends if not w[0].is_completed()]
            self.pending_sends.append((self.dist.isend(out, dst=self.rank + self.tp), out))
            return
        if self.tp_rank != 0:
            return  # the LM head is replicated; TP rank 0 of the last stage samples and answers
        logits = self.model.compute_logits(h[last])
        seqs = msg["seqs"]
        params = [SamplingParams(max_tokens=1, temperature=s["temp"], top_k=s["top_k"], top_p=s["top_p"]) for s in seqs]
        tokens = sample(logits, params, [s["seed"] for s in seqs], [s["start"] + len(s["ids"]) for s in seqs],
                        [s["banned"] for s in seqs])
        self.ch.send({"t": "tokens", "mb": msg["mb"], "id": msg["id"], "tokens": tokens})

    def close(self):
        for w, _ in self.pending_sends:
            w.wait()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def run(controller: str, token: str, rank: int | None = None) -> int:
    host, _, port = controller.rpartition(":")
    rank = rank if rank is not None else _env_rank()
    if rank is None:
        print("dejavu worker: no rank (pass --rank or launch under mpirun)", file=sys.stderr)
        return 2
    if os.environ.get("DEJAVU_PARENT_PID"):
        _watch_parent(int(os.environ["DEJAVU_PARENT_PID"]))
    ch = connect(host or "127.0.0.1", int(port), token, {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()})
    cfg = ch.recv(timeout=600)
    if cfg.get("t") != "config":
        return 2
    try:
        worker = StageWorker(ch, cfg, rank)
    except Exception as e:  # noqa: BLE001 - reported to the controller, which stops everyone
        ch.send({"t": "error", "rank": rank, "msg": f"{type(e).__name__}: {e}"})
        return 1
    ch.send({"t": "ready", "rank": rank})
    try:
        while True:
            msg = ch.recv(None)
            if msg["t"] == "shutdown":
                break
            if msg["t"] == "step":
                worker.step(msg)
    except ConnectionError:
        return 4  # the controller is gone: nothing to serve
    except Exception as e:  # noqa: BLE001
        try:
            ch.send({"t": "error", "rank": rank, "msg": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        return 1
    finally:
        ch.close()
    worker.close()
    return 0
