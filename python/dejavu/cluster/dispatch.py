"""Dispatch: microbatch steps out to the workers, and their results back.

Each microbatch slot has at most one step in flight. A step (messages.Step) says, per sequence, its
new tokens, where their KV goes and how the last stage samples; it goes to every worker that runs
steps, and the sampling stage answers with the tokens (messages.Tokens). A sequence is busy while
its step runs: aborting it then waits until the step returns. Step ids only grow; a reply to a
step from before the last recovery (up to `epoch_step`, set by new_epoch) is stale and ignored.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ..engine.sampler import wire_fields
from .errors import WorkerError
from .messages import SampleExtra, Step, StepSeq, unpack_tokens
from .recovery import Failure

log = logging.getLogger("dejavu.pipeline")


def _extra(x: dict | None) -> SampleExtra | None:
    return None if x is None else SampleExtra(**x)


class Dispatch:
    """The steps of controller `c` (which supplies the slots, the step ranks and the hooks it
    reacts with: _finish, _append_tokens, _banned)."""

    def __init__(self, controller, slots: int):
        self.c = controller
        self.step_id = 0
        self.epoch_step = 0  # the last step id sent before the last recovery
        self.inflight: list[tuple[int, list, float] | None] = [None] * slots  # per slot: (step id, seqs, sent at)
        self.slot_of: dict[int, int] = {}   # seq id -> its microbatch slot
        self.busy: set[int] = set()         # sequences in a step that workers are running
        self.abort_later: set[int] = set()  # aborted while busy: finished when their step returns
        self.resumed = None  # (when, its record): a recovery ended; its first step's timing goes in the record

    def next_id(self) -> int:
        self.step_id += 1
        return self.step_id

    def new_epoch(self) -> None:
        """A recovery starts: replies to every step sent so far are stale from now on."""
        self.epoch_step = self.step_id

    def stale(self, step_id: int) -> bool:
        """A reply to a step (or prefill, admission) from before the last recovery."""
        return self.c.ft and step_id <= self.epoch_step

    def step_item(self, s, start: int, blocks: list[int], **extra) -> StepSeq:
        """One sequence's part of a step message: its new tokens from `start`, where their KV goes,
        and what the last stage needs to sample its next token."""
        p = s.params
        return StepSeq(ids=s.token_ids[start:], start=start, blocks=blocks, temp=p.temperature, top_k=p.top_k,
                       top_p=p.top_p, seed=s.seed, banned=self.c._banned(s),
                       x=_extra(wire_fields(p, s.token_ids, s.num_prompt_tokens)), **extra)

    def launch(self, slot: int, seqs: list, is_prefill: bool, tiers=None) -> None:
        """tiers: the step's prefix-tier copies (messages.TierOps), for every worker before the step."""
        c = self.c
        step_id = self.next_id()
        items = []
        for s in seqs:
            # From the first token without KV: everything for a prefill, the newest token for a decode,
            # more after a recovery (from the request's watermark).
            items.append(self.step_item(s, s.num_cached, s.block_table))
            s.num_cached = len(s)
            self.slot_of[s.seq_id] = slot
            self.busy.add(s.seq_id)
        c.replication.expect(step_id, c._step_ranks(), [(s, len(s)) for s in seqs])
        live = c.regions.live(c.slots[slot].running)  # with swapping: the blocks workers keep resident
        msg = Step(mb=slot, id=step_id, prefill=is_prefill, seqs=items, live=live, tiers=tiers)
        self.inflight[slot] = (step_id, seqs, time.monotonic())  # before sending: a failed send loses it
        if self.resumed is not None and "first_step_sent_s" not in self.resumed[1]:
            self.resumed[1]["first_step_sent_s"] = round(time.monotonic() - self.resumed[0], 4)
        self.send_to(c._step_ranks(), msg)

    def send_to(self, ranks, msg) -> None:
        """A message on the serving path: a worker whose channel is gone has died (kill -9 before
        its death was noticed), which is a failure to recover from, not the controller's error."""
        c = self.c
        for r in ranks:
            try:
                c.members.channels[r].send(msg)
            except OSError as e:
                if c.ft and c.members.started:
                    raise Failure({r}, f"worker {r} is unreachable: {e}") from None
                raise WorkerError(f"worker {r} is unreachable: {e}") from None

    def on_tokens(self, msg) -> list:
        """A microbatch's sampled tokens came back: append them to the sequences still live."""
        c, i = self.c, msg.mb
        if not 0 <= i < len(self.inflight):  # refused without effect
            log.warning("a worker answered for microbatch %d, which does not exist", i)
            return []
        cur = self.inflight[i]
        if (cur is None or cur[0] != msg.id) and self.stale(msg.id):
            return []  # a step from before a recovery: replayed already
        if cur is None or msg.id != cur[0]:
            raise WorkerError(f"microbatch {i}: expected {f'step {cur[0]}' if cur else 'no step'}, got step {msg.id}")
        step_id, seqs, _ = cur
        self.inflight[i] = None
        if self.resumed is not None:  # the recovery's end -> the first step's tokens back
            self.resumed[1]["first_step_s"] = round(time.monotonic() - self.resumed[0], 4)
            self.resumed = None
        if msg.step_s is not None:  # the sampling stage's previous decode step (worker.py)
            c.decode_steps.append(msg.step_s)
            c.decode_step_totals[0] += 1
            c.decode_step_totals[1] += msg.step_s
        live = {id(s) for s in self.returned(seqs)}
        tokens = unpack_tokens(msg.tokens, msg.logprobs)
        c._append_tokens([s for s in seqs if id(s) in live], [t for s, t in zip(seqs, tokens) if id(s) in live])
        return seqs

    def returned(self, seqs: list) -> list:
        """Sequences whose step came back: not busy any more; deferred aborts happen now."""
        live = []
        for s in seqs:
            self.busy.discard(s.seq_id)
            if s.seq_id in self.abort_later:
                self.abort_later.discard(s.seq_id)
                if not s.finished:
                    self.c._finish(s, "abort")
            elif not s.finished:
                live.append(s)
        return live

    def abandon(self) -> None:
        """Every in-flight step is lost (it passed through every stage)."""
        for i, inf in enumerate(self.inflight):
            if inf is not None:
                self.inflight[i] = None
                self.returned(inf[1])
        self.c.replication.pending.clear()

    def classify(self, item: tuple, doing: str):
        """Handles bookkeeping messages and failures; returns those the caller must see."""
        c = self.c
        rank, gen, msg = item
        if rank is not None and gen != c.members.gen.get(rank):
            return None  # from a worker already replaced
        t = msg.t
        if t == "error":
            raise WorkerError(f"worker {msg.rank} failed: {msg.msg}")
        if t == "dead":
            c.members.check_dead(msg, doing)
        if t == "step_failed":
            if msg.id > self.epoch_step:  # a live link broke: reset and replay, even if no one died
                raise Failure(set(), f"worker {msg.rank} lost step {msg.id}: {msg.msg}")
            return None
        if t == "replicated":
            c.replication.on_replicated(msg)
            return None
        if t == "swapstats":
            c.swap_stats[msg.rank] = dataclasses.asdict(msg)
            return None
        if t == "rereplicated":
            if msg.error:
                log.warning("worker %d could not re-seed its replica holder: %s", msg.rank, msg.error)
            return None
        if t == "joined":
            return msg if c.members.on_joined(msg) else None
        return msg
