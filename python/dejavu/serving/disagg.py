"""Prompt-token disaggregation: prompt workers prefill, token workers decode.

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
import time
from collections import deque

from ..cluster.errors import WorkerError
from ..cluster.messages import Admit, AdmitSeq, Peers, Prefill, TokenWorker, unpack_tokens
from ..engine.block_manager import BlockAllocator, blocks_for
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence, Status
from ..kvstream.routing import WorkerLayout, plan, split_layers
from ..parallel.auth import cluster_tag
from .disagg_prefix import DisaggPrefix
from .pipeline import PipelineEngine, check_split


class DisaggEngine(PipelineEngine):
    def __init__(self, source, tokenizer, config, device, dtype, seed, prompt_stages: int, token_stages: int,
                 tp: int = 1, microbatch_size: int = 0, launcher: str = "local", timeout: float = 300.0,
                 log_dir: str | None = None, receive_slots: int = 8, kv_transport: str = "auto", swap: bool = False,
                 resident_microbatches: int = 2, **fault_tolerance):
        self.kv_transport = kv_transport
        self.transports_used: set[str] = set()
        self._dp, self._dt = prompt_stages, token_stages
        self.receive_slots = receive_slots
        from ..kvstream.shm import cleanup_orphans

        cleanup_orphans()  # segments of earlier deployments that died with no one to clean up
        super().__init__(source, tokenizer, config, device, dtype, seed, pp=token_stages, tp=tp,
                         microbatch_size=microbatch_size, launcher=launcher, timeout=timeout, log_dir=log_dir,
                         swap=swap, resident_microbatches=resident_microbatches, **fault_tolerance)

    # ------------------------------------------------------------------ layout
    def _plan(self, cfg, pp, layer_split, microbatch_size) -> None:
        dp, dt, tp = self._dp, self._dt, self.tp
        self.prompt_layers = split_layers(cfg.num_layers, dp)
        self.layers = self.token_layers = split_layers(cfg.num_layers, dt)
        check_split(self.token_layers, dt, cfg.num_layers)
        self.pp, self.world, self.token_first = dt, (dp + dt) * tp, dp * tp
        self.num_prompt_blocks = self._blocks_for(cfg, self.prompt_layers, self.config.num_blocks,
                                                  self.config.kv_cache_memory)
        self.num_blocks = self._blocks_for(cfg, self.token_layers, self.config.num_blocks, self.config.kv_cache_memory)
        self.prompt_alloc = BlockAllocator(self.num_prompt_blocks)
        self.allocator = BlockAllocator(self.num_blocks)
        self.waiting: deque[Sequence] = deque()         # waiting for a prefill
        self.token_waiting: deque[Sequence] = deque()   # preempted on the token side
        self.mb = microbatch_size or self.config.max_num_seqs
        self.slots = [Scheduler(a, self.block_size, self.mb, self.config.max_num_batched_tokens,
                                self.token_waiting, prefix_salt=self.prefix_salt) for a in self._slot_allocators(dt)]
        self.scheduler = self.slots[0]
        self.prefix = DisaggPrefix(self.scheduler.names if self.prefix_salt else None, self.block_size,
                                   self.prompt_alloc)
        self.prompt_inflight: list[dict | None] = [None] * dp
        self.admitting: dict[int, dict] = {}
        self.ready: deque[Sequence] = deque()           # admitted, waiting for room in a token microbatch
        self.in_transfer = 0
        senders = [WorkerLayout(f"p{s}.{r}", a, b, r, tp) for s, (a, b) in enumerate(self.prompt_layers)
                   for r in range(tp)]
        receivers = [WorkerLayout(f"t{s}.{r}", a, b, r, tp) for s, (a, b) in enumerate(self.token_layers)
                     for r in range(tp)]
        self.transfers = plan(senders, receivers, cfg.num_kv_heads)
        self.kv_bytes = 0
        self.transfer_stats: list[dict] = []  # per prefill: compute, exposed transfer, bytes

    def _rank_config(self, rank: int) -> dict:
        common = {"kv_transport": self.kv_transport, "shm_prefix": self._shm_prefix()}
        return {**common, **self._role_config(rank)}

    def _role_config(self, rank: int) -> dict:
        if rank < self.token_first:
            stage = rank // self.tp
            return {"role": "prompt", "pp": self._dp, "layers": [list(x) for x in self.prompt_layers],
                    "first_rank": 0, "num_blocks": self.num_prompt_blocks, "worker_name": f"p{stage}.{rank % self.tp}"}
        stage = (rank - self.token_first) // self.tp
        return self._swap_config({"role": "token", "pp": self._dt, "layers": [list(x) for x in self.token_layers],
                                  "first_rank": self.token_first, "num_blocks": self.num_blocks,
                                  "worker_name": f"t{stage}.{rank % self.tp}"})

    def _step_ranks(self):
        return range(self.token_first, self.world)

    def _after_ready(self, only: set[int] | None = None) -> None:
        token_workers = [TokenWorker(worker=i["worker"], host=i["addr"], hostname=i["host_id"], kv_port=i["kv_port"],
                                     ipc=self._ipc.get(r), num_blocks=self.num_blocks)
                         for r, i in sorted(self.worker_info.items()) if i["role"] == "token"]
        msg = Peers(token_workers=token_workers, transfers=[dataclasses.asdict(t) for t in self.transfers])
        for r in range(self.token_first):
            if only is None or r in only:
                self.channels[r].send(msg)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt, params, request_id=None) -> Sequence:
        seq = super().add_request(prompt, params, request_id)
        need = blocks_for(len(seq), self.block_size)
        if need > self.num_prompt_blocks:
            self.waiting.remove(seq)
            from ..engine.llm_engine import RequestError

            raise RequestError(f"prompt of {len(seq)} tokens needs {need} KV blocks but the prompt side holds only "
                               f"{self.num_prompt_blocks}")
        return seq

    def has_unfinished(self) -> bool:
        return (super().has_unfinished() or any(self.prompt_inflight) or bool(self.admitting)
                or bool(self.token_waiting) or bool(self.ready))

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.seq_id in self.dispatch.slot_of:
            return super()._finish(seq, reason)
        self.replication.watermark.pop(seq.seq_id, None)
        # Between prefill and a token microbatch: its token-side blocks are held here.
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.ready:
            self.ready.remove(seq)
            self.in_transfer -= 1
        if seq.block_table:
            self._token_alloc(seq).free(seq.block_table)
            seq.block_table = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ------------------------------------------------------------------ the loop
    def _step(self) -> list[Sequence]:
        while self.token_waiting:  # preempted on the token side: prefill again, first in line
            s = self.token_waiting.pop()
            s.token_slot = None  # (with swapping) a slot is chosen again at its prefill
            self.waiting.appendleft(s)
        for i in range(self._dp):
            if self.prompt_inflight[i] is None:
                batch = self._take_prefill_batch()
                if batch:
                    self._launch_prefill(i, batch)
        self._place_ready()
        for i, slot in enumerate(self.slots):
            if self.dispatch.inflight[i] is None:
                seqs, _ = slot.schedule()
                if seqs:
                    self.dispatch.launch(i, seqs, False)
        if not (any(self.dispatch.inflight) or any(self.prompt_inflight) or self.admitting):
            if self.waiting or self.token_waiting:
                if not self.token_waiting and not any(s.running for s in self.slots):
                    raise RuntimeError("scheduler stalled: waiting requests but nothing can run")
                return []
            return []
        msg = self._next_message(time.monotonic() + self.timeout, "running a step")
        if msg.t == "tokens":
            return self.dispatch.on_tokens(msg)
        if msg.t == "pushed":
            return self._on_pushed(msg)
        if msg.t == "admitted":
            self._on_admitted(msg)
        return []

    def _take_prefill_batch(self) -> list[Sequence]:
        batch, tokens = [], 0
        while self.waiting and len(batch) < self.mb and self.in_transfer + len(batch) < self.receive_slots:
            seq = self.waiting[0]
            n = len(seq) - len(self.prefix.hits(seq, self.allocator)[0]) * self.block_size  # tokens to compute
            need = blocks_for(len(seq), self.block_size)
            if batch and tokens + n > self.config.max_num_batched_tokens:
                break
            slot = self._token_slot_for(need, batch) if self.swap else None
            if slot == -1:
                break
            seq.token_slot = slot
            if not self.prefix.take(seq, self._token_alloc(seq)):  # both sides' blocks (hits shared)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += n
        return batch

    def _token_alloc(self, seq: Sequence) -> BlockAllocator:
        """The allocator of `seq`'s token-side blocks: the shared one, or with swapping its slot's."""
        slot = getattr(seq, "token_slot", None)
        return self.allocator if slot is None else self.slots[slot].allocator

    def _token_slot_for(self, need: int, batch: list[Sequence]) -> int:
        """With swapping: the token microbatch a request about to be prefilled will join (-1: none
        has room): the least loaded (running plus on its way) whose region has `need` free blocks."""
        on_way = [s for st in self.prompt_inflight if st for s in st["seqs"]]
        on_way += [s for st in self.admitting.values() for s in st["seqs"]] + list(self.ready) + batch
        load = [len(sl.running) for sl in self.slots]
        for s in on_way:
            if getattr(s, "token_slot", None) is not None:
                load[s.token_slot] += 1
        fits = [i for i in range(self._dt) if load[i] < self.mb and self.slots[i].allocator.can_allocate(need)]
        return min(fits, key=lambda i: (load[i], -self.slots[i].allocator.num_free)) if fits else -1

    def _launch_prefill(self, slot: int, seqs: list[Sequence]) -> None:
        step_id = self.dispatch.next_id()
        items = []
        for s in seqs:
            items.append(self.dispatch.step_item(s, s.num_cached, s.prompt_blocks, key=f"r{s.seq_id}.{step_id}",
                                                 dst_blocks=self.prefix.sent(s)))
            self.dispatch.busy.add(s.seq_id)
        msg = Prefill(mb=slot, id=step_id, seqs=items)
        self.in_transfer += len(seqs)
        self.prompt_inflight[slot] = {"id": step_id, "seqs": seqs, "keys": [it.key for it in items],
                                      "pending": set(range(self.token_first)), "tokens": None, "stats": []}
        self.dispatch.send_to(range(self.token_first), msg)

    def _on_pushed(self, msg) -> list[Sequence]:
        slot = msg.mb
        st = self.prompt_inflight[slot] if 0 <= slot < len(self.prompt_inflight) else None
        if (st is None or st["id"] != msg.id) and self.dispatch.stale(msg.id):
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
        self._append_tokens(seqs, st["tokens"])
        live = []
        for s, key in zip(seqs, st["keys"]):
            if s.finished:  # EOS or max_tokens=1: done without the token side
                self.in_transfer -= 1
                self.dispatch.busy.discard(s.seq_id)
            else:
                live.append((s, key))
        if live:
            step_id = self.dispatch.next_id()
            admit = Admit(id=step_id, delivered=sorted(st.get("delivered", ())),
                          seqs=[AdmitSeq(key=k, blocks=self.prefix.sent(s),
                                          ntok=len(s) - 1 - s.num_named * self.block_size) for s, k in live])
            self.replication.expect(step_id, range(self.token_first, self.world),
                                     [(s, len(s) - 1) for s, _ in live])
            self.admitting[step_id] = {"seqs": [s for s, _ in live],
                                       "pending": set(range(self.token_first, self.world))}
            self.dispatch.send_to(range(self.token_first, self.world), admit)
        return seqs

    def _on_admitted(self, msg) -> None:
        st = self.admitting.get(msg.id)
        if st is None and self.dispatch.stale(msg.id):
            return  # an admission from before a recovery: that request is prefilled again
        if st is None:
            raise WorkerError(f"unexpected admission {msg.id} from worker {msg.rank}")
        st["pending"].discard(msg.rank)
        if st["pending"]:
            return
        del self.admitting[msg.id]
        live = self.dispatch.returned(st["seqs"])  # deferred aborts end here
        self.in_transfer -= len(st["seqs"]) - len(live)
        for s in live:
            s.num_cached = len(s) - 1  # the first sampled token's KV is written by the first decode step
        self.ready.extend(live)
        self._place_ready()

    def _place_ready(self) -> None:
        """Admitted requests join the token microbatch with the fewest sequences, up to `mb` each;
        until then they keep their receive slot (their KV already sits in the token cache)."""
        if self.swap:  # each joins the microbatch its blocks were taken for, in arrival order
            waiting = deque()
            while self.ready:
                s = self.ready.popleft()
                if len(self.slots[s.token_slot].running) >= self.mb:
                    waiting.append(s)
                    continue
                self.in_transfer -= 1
                self.slots[s.token_slot].running.append(s)
                self.dispatch.slot_of[s.seq_id] = s.token_slot
            self.ready = waiting
            return
        while self.ready:
            slot = min(range(self._dt), key=lambda i: len(self.slots[i].running))
            if len(self.slots[slot].running) >= self.mb:
                return
            s = self.ready.popleft()
            self.in_transfer -= 1
            self.slots[slot].running.append(s)
            self.dispatch.slot_of[s.seq_id] = slot

    # ------------------------------------------------------------------ fault tolerance
    def _token_side(self) -> list[Sequence]:
        return super()._token_side() + list(self.ready)

    def _abandon_inflight(self) -> list[str]:
        """Token steps are lost as in the pipeline; prefills in progress and admissions not yet
        acknowledged are redone from the start (only requests that had not reached the token side)."""
        super()._abandon_inflight()
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
            self.dispatch.busy.discard(s.seq_id)
            self.in_transfer -= 1
            self._release(s)
            if s.seq_id in self.dispatch.abort_later:
                self.dispatch.abort_later.discard(s.seq_id)
                s.status, s.finish_reason = Status.FINISHED, "abort"
            elif not s.finished:
                s.num_cached = 0
                s.status = Status.WAITING
                self.waiting.appendleft(s)
        return drop

    def _named_allocators(self) -> list[BlockAllocator]:
        return super()._named_allocators() + [self.prompt_alloc]

    def prefix_cache_stats(self) -> dict | None:
        """The prompt side's counters: prompt tokens whose prefill was skipped (the token side's
        hits, blocks not sent, are in self.allocator.stats)."""
        return None if self.prefix_salt is None else self.prompt_alloc.stats.as_dict()

    def _stop_all(self) -> list[Sequence]:
        self.waiting.extend(self.token_waiting)
        self.token_waiting.clear()
        seqs = super()._stop_all()  # (the ready ones are on the token side)
        self.ready.clear()
        self.in_transfer = 0
        return seqs

    def _release(self, s: Sequence) -> None:
        if getattr(s, "prompt_blocks", None):
            self.prompt_alloc.free(s.prompt_blocks)
            s.prompt_blocks = []
        if s.block_table:
            self._token_alloc(s).free(s.block_table)
            s.block_table = []

    def _after_recovery(self, dead: set[int]) -> None:
        """New token workers have new KV endpoints: every prompt worker hears about them; a new
        prompt worker hears about all token workers."""
        if any(r >= self.token_first for r in dead):
            self._after_ready()
        else:
            self._after_ready(only={r for r in dead if r < self.token_first})

    def _shm_prefix(self) -> str:
        """This deployment's /dev/shm segments: named after this (the controller's) process."""
        from ..kvstream.shm import owner_prefix

        return owner_prefix(cluster_tag(self.token))

    def shutdown(self) -> None:
        super().shutdown()
        from ..kvstream.shm import cleanup

        cleanup(self._shm_prefix())  # whatever a crash left in /dev/shm
