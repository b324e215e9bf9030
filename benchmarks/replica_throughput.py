"""Throughput of token-level replication's host side: DéjàVuLib's ReplicaSender sending decode steps
from its step ring to a ReplicaServer on the same host, as fast as the holder takes them.

Each run pushes `--steps` steps of `--batch` new tokens (a cache shaped like `--model`'s, fp16, in
host memory, so no GPU is involved) and waits for every acknowledgement. The steps go either from
the step ring (sent in place, what decode steps do; a ring of 8 steps, so the holder sets the pace)
or through the gather (each step's slots copied out of the cache into the send buffer first, what
prefills and ring-full steps do), alternating in one command. A decode step writes one step's
bytes per step time, so steps/s here is the decode rate replication can keep up with on this host
(docs/BENCHMARKS.md).

    python3 benchmarks/replica_throughput.py --model opt-1.3b --batch 32 --steps 400 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dejavu import _C
from dejavu.engine.kv_cache import PagedKVCache
from dejavu.kvstream.replica import ReplicaServer
from dejavu.kvstream.transports import new_cluster_token

SHAPES = {"opt-125m": (12, 12, 64), "opt-1.3b": (24, 32, 64), "opt-6.7b": (32, 32, 128), "llama-8b": (32, 8, 128)}


def one_run(layers: int, heads: int, dim: int, batch: int, steps: int, path: str) -> dict:
    block = 16
    nblocks = -(-batch // block)
    cache = PagedKVCache(layers, nblocks, block, heads, dim, torch.float16, torch.device("cpu"))
    cache.tensor.normal_()
    token = new_cluster_token()
    server = ReplicaServer(token)
    sender = _C.ReplicaSender(cache.layout(), cache.tensor.data_ptr(), -1, "bench", token, "float16", 60.0)
    rows = 8 * batch
    ring = torch.randn(layers, rows, 2, heads, dim).half()
    sender.ring_attach(ring.data_ptr(), rows)
    sender.set_holder("127.0.0.1", server.port)
    blocks = np.arange(batch, dtype=np.int64) // block
    slots = np.arange(batch, dtype=np.int64) % block
    written = [(list(range(nblocks)), 0, batch)]
    full = 0
    try:
        t0 = time.perf_counter()
        for step in range(steps):
            if path == "gather":
                sender.push_slots(step, written, 0)
                continue
            while sender.ring_stage(blocks, slots) < 0:  # the ring is full: the holder sets the pace
                full += 1
                time.sleep(50e-6)
            sender.ring_commit(step, batch, 0)
        if not sender.drain(300):
            raise RuntimeError("the sender did not drain")
        seconds = time.perf_counter() - t0
        events = sender.wait_events(5.0, 0.0)
        if len(events) != steps or any(e.kind != "replicated" for e in events):
            raise RuntimeError(f"{len(events)} acknowledgements for {steps} steps")
        return {"bytes": sender.bytes(), "seconds": seconds, "GBps": sender.bytes() / seconds / 1e9,
                "steps_per_s": steps / seconds, "full_waits": full}
    finally:
        sender.close()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt-1.3b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=32, help="new tokens per step")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.batch < 1 or a.steps < 1 or a.repeat < 1:
        p.error("--batch, --steps and --repeat must be positive")
    layers, heads, dim = SHAPES[a.model]
    runs = {"gather": [], "ring": []}
    for _ in range(a.repeat):
        for path in runs:
            runs[path].append(one_run(layers, heads, dim, a.batch, a.steps, path))
    step_mb = 2 * layers * heads * dim * 2 * a.batch / 1e6
    print(f"{a.model} shape, {a.batch} tokens per step ({step_mb:.1f} MB), {a.steps} steps, {a.repeat} runs each")
    for mode, rs in runs.items():
        rates = ", ".join(f"{r['GBps']:.2f}" for r in rs)
        steps = ", ".join(f"{r['steps_per_s']:.0f}" for r in rs)
        print(f"  {mode:>6}: {rates} GB/s (steps/s {steps})")
    med = {m: sorted(r["GBps"] for r in rs)[len(rs) // 2] for m, rs in runs.items()}
    print(f"  ring / gather (medians): {med['ring'] / med['gather']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "steps": a.steps, "runs": runs, "median_GBps": med}, f,
                      indent=1)


if __name__ == "__main__":
    main()
