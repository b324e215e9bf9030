"""Prompt-token disaggregation as a placement policy: prompt workers prefill, token workers decode.

`--prompt-stages Dp --token-stages Dt` (x `--tp` each). The prompt pipeline only prefills: as each
layer of a prompt batch is computed, that layer's KV leaves for the token worker (and TP rank)
that holds the layer (kvstream routing: Dp and Dt may differ), over DéjàVuLib's TCP transport into
the token worker's receive store, while the next layer computes. The prompt side samples the first
token. A request enters the token pipeline only after every token worker has admitted its KV into
its cache (acknowledged); the token side only decodes, in Dt microbatch slots as in the FT pipeline.

Flow control: at most `receive_slots` requests are between "prefill started" and "joined a token
microbatch" (a token microbatch holds at most `microbatch_size` sequences); a
prompt waits for a slot (and for token-side blocks for its KV) before its prefill starts, so nothing
is dropped or overwritten. A request preempted on the token side (out of blocks) goes back to the
prompt queue and is prefilled again from all its tokens.

Microbatch swapping on the token side (`swap`, `resident_microbatches` k, token_stages >= 2): as in
the FT pipeline, each token microbatch slot has a region's worth of logical blocks of its own and
the token workers keep only k regions on the device. A request's token slot is chosen when its
prefill starts (its token-side blocks come from that slot's range), and the token workers write
its prompt KV straight into their pinned host copy, from where it is swapped in for the slot's
steps. So the KV travels by shared memory or TCP, never CUDA IPC (which writes device memory).
"""
from __future__ import annotations

import dataclasses
import os
from collections import deque

from ...engine.block_manager import BlockAllocator, blocks_for
from ...engine.llm_engine import RequestError
from ...engine.sequence import Sequence, Status
from ...kvstream.routing import WorkerLayout, plan, split_layers
from ...kvstream.shm import cleanup, cleanup_orphans, owner_prefix
from ...parallel.auth import cluster_tag
from ..adopt import FRONTEND_PID_ENV
from ..errors import WorkerError
from ..messages import Admit, AdmitSeq, Peers, Prefill, TokenWorker, unpack_tokens
from . import PlacementPolicy, check_split
from .disagg_prefix import DisaggPrefix
from .token_slots import TokenSlots


class DisaggPolicy(PlacementPolicy):
    exports = ("prompt_alloc", "token_first", "token_waiting", "prompt_inflight", "admitting", "ready",
               "in_transfer", "kv_bytes", "transfer_stats", "transports_used", "num_prompt_blocks", "shm_prefix")
    prefills_in_slots = False

    def __init__(self, prompt_stages: int, token_stages: int, microbatch_size: int = 0, receive_slots: int = 8,
                 kv_transport: str = "auto"):
        self.kv_transport = kv_transport
        self.transports_used: set[str] = set()
        self.dp, self.dt = prompt_stages, token_stages
        self.microbatch_size, self.receive_slots = microbatch_size, receive_slots
        cleanup_orphans()  # segments of earlier deployments that died with no one to clean up

    # ------------------------------------------------------------------ layout
    def plan(self, c) -> None:
        self.c = c
        cfg, dp, dt, tp = c.model_config, self.dp, self.dt, c.tp
        self.prompt_layers = split_layers(cfg.num_layers, dp)
        token_layers = split_layers(cfg.num_layers, dt)
        check_split(token_layers, dt, cfg.num_layers)
        c.world, self.token_first = (dp + dt) * tp, dp * tp
        self.num_prompt_blocks = c.blocks_for(self.prompt_layers)
        self.prompt_alloc = BlockAllocator(self.num_prompt_blocks)
        self.token_waiting: deque[Sequence] = deque()   # preempted on the token side
        self.mb = self.microbatch_size or c.config.max_num_seqs
        c.decode_pipeline(token_layers, self.mb, self.token_waiting)
        self.token_slots = TokenSlots(c, self.mb)
        self.prefix = DisaggPrefix(c.slots[0].names if c.prefix_salt else None, c.block_size, self.prompt_alloc,
                                   self.plan_tiers(self.prompt_alloc.stats, self.prompt_layers))
        self.prompt_inflight: list[dict | None] = [None] * dp
        self.admitting: dict[int, dict] = {}
        self.ready: deque[Sequence] = deque()           # admitted, waiting for room in a token microbatch
        self.in_transfer = 0
        senders = [WorkerLayout(f"p{s}.{r}", a, b, r, tp) for s, (a, b) in enumerate(self.prompt_layers)
                   for r in range(tp)]
        receivers = [WorkerLayout(f"t{s}.{r}", a, b, r, tp) for s, (a, b) in enumerate(token_layers)
                     for r in range(tp)]
        self.transfers = plan(senders, receivers, cfg.num_kv_heads)
        self.kv_bytes = 0
        self.transfer_stats: list[dict] = []  # per prefill: compute, exposed transfer, bytes

    def rank_config(self, rank: int) -> dict:
        common = {"kv_transport": self.kv_transport, "shm_prefix": self.shm_prefix()}
        return {**common, **self._role_config(rank)}

    def _role_config(self, rank: int) -> dict:
        c = self.c
        if rank < self.token_first:
            name = f"p{rank // c.tp}.{rank % c.tp}"
            return {"role": "prompt", "pp": self.dp, "layers": [list(x) for x in self.prompt_layers],
                    "first_rank": 0, "num_blocks": self.num_prompt_blocks, "worker_name": name,
                    "kv_offload": self.offload_config and self.offload_config(name)}
        stage = (rank - self.token_first) // c.tp
        return c.regions.config({"role": "token", "pp": self.dt, "layers": [list(x) for x in c.layers],
                              "first_rank": self.token_first, "num_blocks": c.num_blocks,
                              "worker_name": f"t{stage}.{rank % c.tp}"})

    def step_ranks(self):
        return range(self.token_first, self.c.world)

    def after_ready(self, only: set[int] | None = None) -> None:
        c = self.c
        token_workers = [TokenWorker(worker=i["worker"], host=i["addr"], hostname=i["host_id"], kv_port=i["kv_port"],
                                     ipc=c._ipc.get(r), num_blocks=c.num_blocks)
                         for r, i in sorted(c.worker_info.items()) if i["role"] == "token"]
        msg = Peers(token_workers=token_workers, transfers=[dataclasses.asdict(t) for t in self.transfers])
        for r in range(self.token_first):
            if only is None or r in only:
                c.channels[r].send(msg)

    def after_recovery(self, dead: set[int]) -> None:
        """New token workers have new KV endpoints: every prompt worker hears about them; a new
        prompt worker hears about all token workers."""
        if any(r >= self.token_first for r in dead):
            self.after_ready()
        else:
            self.after_ready(only={r for r in dead if r < self.token_first})

    # ------------------------------------------------------------------ requests
    def check_request(self, seq: Sequence) -> None:
        need = blocks_for(len(seq), self.c.block_size)
        if need > self.num_prompt_blocks:
            raise RequestError(f"prompt of {len(seq)} tokens needs {need} KV blocks but the prompt side holds only "
                               f"{self.num_prompt_blocks}")

    def has_unfinished(self) -> bool:
        return any(self.prompt_inflight) or bool(self.admitting) or bool(self.token_waiting) or bool(self.ready)

    def finish(self, seq: Sequence, reason: str) -> bool:
        """Between prefill and a token microbatch: its token-side blocks are held here."""
        c = self.c
        if seq in c.waiting:
            c.waiting.remove(seq)
        if seq in self.ready:
            self.ready.remove(seq)
            self.in_transfer -= 1
        self.token_slots.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        return True

    # ------------------------------------------------------------------ the loop
    def feed(self) -> None:
        c = self.c
        while self.token_waiting:  # preempted on the token side: prefill again (a slot chosen again), first in line
            c.waiting.appendleft(self.token_waiting.pop())
        for i in range(self.dp):
            if self.prompt_inflight[i] is None:
                batch = self._take_prefill_batch()
                if batch:
                    self._launch_prefill(i, batch)
        self._place_ready()

    def in_flight(self) -> bool:
        return any(self.prompt_inflight) or bool(self.admitting)

    def stalled(self) -> bool:
        c = self.c
        return bool(c.waiting) and not self.token_waiting and not any(s.running for s in c.slots)

    def on_message(self, msg) -> list[Sequence]:
        if msg.t == "pushed":
            return self._on_pushed(msg)
        if msg.t == "admitted":
            self._on_admitted(msg)
        return []

    def _take_prefill_batch(self) -> list[Sequence]:
        c = self.c
        batch, tokens = [], 0
        while c.waiting and len(batch) < self.mb and self.in_transfer + len(batch) < self.receive_slots:
            seq = c.waiting[0]
            ph, _, lower = self.prefix.hits(seq, c.allocator)
            n = len(seq) - (len(ph) + len(lower)) * c.block_size  # tokens to compute
            need = blocks_for(len(seq), c.block_size)
            if batch and tokens + n > c.config.max_num_batched_tokens:
                break
            if c.swap and not self.token_slots.choose(seq, need, self._on_way() + batch):
                break
            if not self.prefix.take(seq, self.token_slots.alloc(seq)):  # both sides' blocks (hits shared)
                break
            c.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += n
        return batch

    def _on_way(self) -> list[Sequence]:
        """Requests between the start of their prefill and a token microbatch."""
        on_way = [s for st in self.prompt_inflight if st for s in st["seqs"]]
        return on_way + [s for st in self.admitting.values() for s in st["seqs"]] + list(self.ready)

    def _launch_prefill(self, slot: int, seqs: list[Sequence]) -> None:
        dispatch, prompt_blocks = self.c.dispatch, self.prefix.prompt_blocks
        step_id = dispatch.next_id()
        tiers = self.prefix.ops(seqs)  # (restores move num_cached, where each prefill starts)
        items = []
        for s in seqs:
            items.append(dispatch.step_item(s, s.num_cached, prompt_blocks[s.seq_id], key=f"e{self.c._epoch}.r{s.seq_id}.{step_id}",
                                            dst_blocks=self.prefix.sent(s)))
            dispatch.busy.add(s.seq_id)
        msg = Prefill(mb=slot, id=step_id, seqs=items, tiers=tiers)
        self.in_transfer += len(seqs)
        self.prompt_inflight[slot] = {"id": step_id, "seqs": seqs, "keys": [it.key for it in items],
                                      "pending": set(range(self.token_first)), "tokens": None, "stats": []}
        dispatch.send_to(range(self.token_first), msg)

    def _on_pushed(self, msg) -> list[Sequence]:
        c, slot = self.c, msg.mb
        st = self.prompt_inflight[slot] if 0 <= slot < len(self.prompt_inflight) else None
        if (st is None or st["id"] != msg.id) and c.dispatch.stale(msg.id):
            return []  # a prefill from before a recovery: done again already
        if st is None or st["id"] != msg.id:
            raise WorkerError(f"prompt microbatch {slot}: unexpected step {msg.id}")
        st["pending"].discard(msg.rank)
        st["stats"].append(msg)
        self.transports_used.update(msg.transports)
        st.setdefault("delivered", set()).update(msg.delivered)
        if msg.tokens is not None:
            st["tokens"] = unpack_tokens(msg.tokens, msg.logprobs)
        if st["pending"] or st["tokens"] is None:
            return []
        self.prompt_inflight[slot] = None
        seqs = st["seqs"]
        sent = sum(m.bytes for m in st["stats"])
        self.kv_bytes += sent
        self.transfer_stats.append({"bytes": sent, "compute_s": max(m.compute_s for m in st["stats"]),
                                    "exposed_s": max(m.exposed_s for m in st["stats"]),
                                    "raw_s": max(m.raw_s for m in st["stats"])})
        for s in seqs:
            self.prefix.release_prompt(s, len(s))
            s.num_cached = len(s)  # the prompt's KV now exists (on its way to the token side)
        c._append_tokens(seqs, st["tokens"])
        live = []
        for s, key in zip(seqs, st["keys"]):
            if s.finished:  # EOS or max_tokens=1: done without the token side
                self.in_transfer -= 1
                c.dispatch.busy.discard(s.seq_id)
            else:
                live.append((s, key))
        if live:
            self._admit(live, sorted(st.get("delivered", ())))
        return seqs

    def _admit(self, live: list[tuple[Sequence, str]], delivered: list) -> None:
        """Tell the token workers to take the prefilled requests' KV into their caches."""
        c, token_ranks = self.c, range(self.token_first, self.c.world)
        step_id = c.dispatch.next_id()
        admit = Admit(id=step_id, delivered=delivered,
                      seqs=[AdmitSeq(key=k, blocks=self.prefix.sent(s),
                                      ntok=len(s) - 1 - s.num_named * c.block_size) for s, k in live])
        c.replication.expect(step_id, token_ranks, [(s, len(s) - 1) for s, _ in live])
        self.admitting[step_id] = {"seqs": [s for s, _ in live], "pending": set(token_ranks)}
        c.dispatch.send_to(token_ranks, admit)

    def _on_admitted(self, msg) -> None:
        dispatch = self.c.dispatch
        st = self.admitting.get(msg.id)
        if st is None and dispatch.stale(msg.id):
            return  # an admission from before a recovery: that request is prefilled again
        if st is None:
            raise WorkerError(f"unexpected admission {msg.id} from worker {msg.rank}")
        st["pending"].discard(msg.rank)
        if st["pending"]:
            return
        del self.admitting[msg.id]
        live = dispatch.returned(st["seqs"])  # deferred aborts end here
        self.in_transfer -= len(st["seqs"]) - len(live)
        for s in live:
            s.num_cached = len(s) - 1  # the first sampled token's KV is written by the first decode step
        self.ready.extend(live)
        self._place_ready()

    def _place_ready(self) -> None:
        """Admitted requests join token microbatches (token_slots.py); until then they keep their
        receive slot (their KV already sits in the token cache)."""
        self.in_transfer -= self.token_slots.place(self.ready)

    # ------------------------------------------------------------------ fault tolerance, stopping
    def admitted(self) -> list[Sequence]:
        return list(self.ready)

    def abandon(self) -> list[str]:
        """Prefills in progress and admissions not yet acknowledged are redone from the start (only
        requests that had not reached the token side); returns the KV keys workers drop."""
        c = self.c
        drop, again = [], []
        for i, st in enumerate(self.prompt_inflight):
            if st is not None:
                self.prompt_inflight[i] = None
                drop += st["keys"]
                again += st["seqs"]
        for st in self.admitting.values():
            again += st["seqs"]
        self.admitting.clear()
        for s in reversed(again):
            c.dispatch.busy.discard(s.seq_id)
            self.in_transfer -= 1
            self._release(s)
            if s.seq_id in c.dispatch.abort_later:
                c.dispatch.abort_later.discard(s.seq_id)
                s.status, s.finish_reason = Status.FINISHED, "abort"
            elif not s.finished:
                s.num_cached = 0
                s.status = Status.WAITING
                c.waiting.appendleft(s)
        return drop

    def _release(self, s: Sequence) -> None:
        self.prefix.drop_prompt(s)
        self.token_slots.free(s)

    def stop(self) -> list[Sequence]:
        self.c.waiting.extend(self.token_waiting)
        self.token_waiting.clear()
        held = list(self.ready)
        self.ready.clear()
        self.in_transfer = 0
        return held

    def named_allocators(self) -> list[BlockAllocator]:
        return [self.prompt_alloc]

    def stats_allocators(self) -> list[BlockAllocator]:
        """The prompt side's counters: prompt tokens whose prefill was skipped (the token side's
        hits, blocks not sent, are in the controller's allocator.stats)."""
        return [self.prompt_alloc]

    def shm_prefix(self) -> str:
        """This deployment's /dev/shm segments: named after the process the deployment lives as long
        as: the front-end of a split `dejavu serve` (its workers outlive a controller), else this one."""
        return owner_prefix(cluster_tag(self.c.token), int(os.environ.get(FRONTEND_PID_ENV) or os.getpid()))

    def close(self) -> None:
        cleanup(self.shm_prefix())  # whatever a crash left in /dev/shm
