"""`dejavu bench decode --replicate`: the decode step with token-level replication running beside it."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from ..engine.block_manager import blocks_for
from .decode_runs import _advanced_steps, time_batch, _paired, _replays_off_on


class _ReplicationStream:
    """Token-level replication as a `--replicate` token worker runs it (serving/replication.py's
    Replicator), into a ReplicaServer. Path "ring": the decode graphs also write each new token's K/V
    into the Replicator's pinned ring, and DéjàVuLib's C++ sending thread sends those rows; "gather":
    the step records an event and queues its slots, and the sending thread gathers them into pinned
    memory with the copy engine first. By default the server runs in this process
    and applies the slots to its host mirror as the ring neighbour's holder would, so this process
    pays for both directions of a ring, like a worker does; holder="process" runs it in a process of
    its own (the sending side's cost alone). Workers' GIL switch interval (0.5 ms) applies while it
    runs."""

    def __init__(self, llm, every: int = 1, holder: str = "thread", skip: str = "none"):
        from ..kvstream.replica import ReplicaServer
        from ..kvstream.transports import new_cluster_token
        from ..serving.replication import Replicator

        if holder not in ("thread", "process"):
            raise ValueError(f"replica holder must be thread or process, got {holder!r}")
        if skip not in ("none", "gather", "send"):
            raise ValueError(f"--replicate-skip must be none, gather or send, got {skip!r}")
        self.cache = llm.engine.runner.cache
        self.device = self.cache.device
        token = new_cluster_token()
        self.cfg = SimpleNamespace(timeout=60.0, kv_token=token)
        self.rank, self.ch, self.acks, self.step_id, self.recent = 0, self, 0, 0, []
        self.server = self.proc = None
        if holder == "thread":  # this process applies the slots too, as a worker holding its neighbour's
            self.server = ReplicaServer(token)
            port = self.server.port
        else:  # the holder in a process of its own: the sender's cost alone
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from dejavu.kvstream.replica import ReplicaServer; "
                 "s = ReplicaServer(sys.argv[1]); print(s.port, flush=True); sys.stdin.read()", token],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            port = int(self.proc.stdout.readline())
        self.replicator = Replicator(self, "bench")
        # diagnostics: 'gather' sends zeros without touching the GPU, 'send' gathers but sends nothing
        self.replicator.native.set_skip(skip == "gather", skip == "send")
        self.replicator.every = every  # steps per gather and send (Controller.set_replication(every=))
        self.port = port
        self.replicator.set_holder(("127.0.0.1", port))
        self._switch = sys.getswitchinterval()
        self.runner = llm.engine.runner
        self.path = "gather"

    def using(self, path: str) -> "_ReplicationStream":
        if path == "ring" and self.replicator.ring is None:
            raise ValueError("--replicate-path ring: this engine has no replication ring (DEJAVU_REPLICA_RING=0, "
                             "or no decode kernels for this cache)")
        self.path = path
        return self

    def __enter__(self):
        # The runner hands each decode step to after_step as it is queued (steps stay overlapped);
        # with the ring the first time captures the decode graphs again.
        self.runner.set_kv_tap(self.replicator if self.path == "ring" else None, self.after_step)
        sys.setswitchinterval(float(os.environ.get("DEJAVU_SWITCH_INTERVAL", "0.0005")))
        return self

    def __exit__(self, *exc):
        self.runner.set_kv_tap(None)
        self.replicator.drain()
        sys.setswitchinterval(self._switch)

    def send(self, msg) -> None:  # the Replicator's acknowledgements (a worker's controller channel)
        if msg.t == "replicated" and msg.error is None:
            self.acks += 1

    def after_step(self, written) -> None:
        self.step_id += 1
        self.recent = (self.recent + [[(list(t), a, b) for t, a, b in written]])[-4:]
        self.replicator.after_step(self.step_id, written)

    def close(self) -> None:
        self.replicator.close()
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(30)

    def mirror_matches(self) -> bool:
        """The holder's copy of the last steps' slots equals the device cache's (call after the run,
        before the blocks are reused: the stream carried the right KV)."""
        from ..kvstream.replica import ReplicaClient

        bs = self.cache.block_size
        slots = sorted({(table[p // bs], p % bs) for ws in self.recent for table, a, b in ws for p in range(a, b)})
        blocks = sorted({b for b, _ in slots})
        if self.server is not None:
            data = self.server.mirrors["bench"].data[:, blocks]
        else:
            client = ReplicaClient("127.0.0.1", self.port, self.cfg.kv_token)
            try:
                raw, _ = client.get_blocks("bench", blocks)
            finally:
                client.close()
            data = raw.view(self.cache.dtype).view((self.cache.num_layers, len(blocks)) + tuple(self.cache.tensor.shape[2:]))
        idx = {b: i for i, b in enumerate(blocks)}
        return all(torch.equal(data[:, idx[b], :, s].to(self.device), self.cache.tensor[:, b, :, s]) for b, s in slots)


# The ways bench decode replicates, in its default order: the gather first, the cheaper one for this
# engine, whose steps are queued ahead (the ring is pipeline workers'; docs/fault-tolerance.md).
REPLICATE_PATHS = ("gather", "ring")


def _ring_gpu_ms(llm, batch: int, start: int, pairs: int, n: int = 40) -> dict:
    """GPU time of the batch's decode graph (captured with a replication ring) replayed n times,
    each timed by events and waited for, with its ring rows set (the kernels also store each new
    token's K/V into the ring, across PCIe) and unset, alternating `pairs` times: the device's
    share of the ring's cost. Rows are at position `start` of free blocks; nothing reads what the
    replays write, and no step is committed, so nothing is sent. {} without a ring's graphs."""
    graphs = llm.engine.runner.graphs
    if graphs is None or graphs.ring is None or batch > graphs.ring.tensor.shape[1]:
        return {}
    per = blocks_for(start + 1, graphs.block_size)
    if batch * per > llm.engine.runner.cache.num_blocks:
        return {}
    items = [([1], start, list(range(i * per, (i + 1) * per))) for i in range(batch)]
    g = graphs.graph(batch)  # (its inputs come from pinned buffer 0)

    def setup(ring: bool) -> None:
        graphs.stage_inputs(items, batch, 0 if ring else -1)
        g.replay()  # (untimed)

    off, on = _replays_off_on(g, pairs, n, setup)
    return {"ring_gpu_off_ms": off, "ring_gpu_on_ms": on, "ring_gpu_ratio": on / off}


def _with_replication(llm, batch: list[list[int]], max_tokens: int, pairs: int, every: int = 1,
                      holder: str = "thread", skip: str = "none", paths: tuple[str, ...] = REPLICATE_PATHS) -> dict:
    """The batch decoded `pairs` times without replication and with it through each of `paths`,
    alternating (off, path 1, path 2, off, ...), the same engine throughout. The replicate_* keys
    are the first path's; replicate_by_path has every path's."""
    bad = [p for p in paths if p not in REPLICATE_PATHS]
    if bad or not paths:
        raise ValueError(f"--replicate-path takes {', '.join(REPLICATE_PATHS)}, got {', '.join(paths) or 'nothing'}")
    off, on, exact = [], {p: [] for p in paths}, []
    stream = _ReplicationStream(llm, every, holder, skip)
    chained = 0  # steps of the replicated runs queued before the tokens of the step before were read
    advanced = {p: 0 for p in paths}  # replicated steps that ran from the inputs the step before left on the device
    try:
        for p in paths:
            stream.using(p)  # a path this engine cannot run fails before any run
        for _ in range(pairs):
            off.append(time_batch(llm, batch, max_tokens)[1])
            for p in paths:
                with stream.using(p):
                    c0, a0 = llm.engine.num_chained, _advanced_steps(llm)
                    on[p].append(time_batch(llm, batch, max_tokens)[1])
                    chained += llm.engine.num_chained - c0
                    advanced[p] += _advanced_steps(llm) - a0
                exact.append(stream.mirror_matches())  # each run's last steps, before the next run reuses the blocks
        # (after the runs, with no request running: the ring's graphs are the engine's now)
        gpu = _ring_gpu_ms(llm, len(batch), len(batch[0]) + max_tokens // 2, pairs) if "ring" in paths else {}
    finally:
        stream.close()
    by_path = {}
    for p in paths:
        off_ms, on_ms, ratio, pair_ratios = _paired(off, on[p])
        by_path[p] = {"ms_per_step": on_ms, "ratio": ratio, "pair_ratios": pair_ratios, "advanced_steps": advanced[p]}
    first = by_path[paths[0]]
    return {"replicate_off_ms_per_step": off_ms, "replicate_ms_per_step": first["ms_per_step"],
            "replicate_ratio": first["ratio"], "replicate_pair_ratios": first["pair_ratios"],
            "replicate_by_path": by_path, "replicate_acked": f"{stream.acks}/{stream.step_id}",
            "replica_exact": all(exact), "replicate_bytes": stream.replicator.bytes,
            "replicate_ring_misses": stream.replicator.ring_misses,
            "replicate_chained_steps": chained, **gpu}
