"""Continuous batching: who runs in the next iteration, prefill first, preempting when out of blocks.

A step is either a prefill step (new sequences, all their tokens) or a decode step (one token for
every running sequence). When decode needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its tokens (prompt and output so far) when blocks free up.

Admission is "greedy" (the default) or "reserve". Greedy admits a sequence when its tokens so far
fit, so more sequences run at once and sequences that stop early (EOS) leave room sooner; the
price is preemption and recomputation when they all grow. Reserve admits one only when every block
it can ever need (prompt + max_tokens) fits beside the blocks promised to those running: it holds
fewer at once and never preempts, so the batch a KV budget holds is a fixed number (docs/serving.md).
"""
from __future__ import annotations

from collections import deque

from ..config import ADMISSION, check_choice
from .block_manager import BlockAllocator, blocks_for
from .sequence import Sequence, Status



def lifetime_blocks(seq: Sequence, block_size: int) -> int:
    """Blocks `seq` holds when it stops at max_tokens (the last token's KV is never written)."""
    return blocks_for(max(len(seq), seq.num_prompt_tokens + seq.params.max_tokens - 1), block_size)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 waiting: deque | None = None, admission: str = "greedy"):
        check_choice("admission", admission, ADMISSION)
        self.reserve = admission == "reserve"
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Several schedulers (one per pipeline microbatch) may share one queue and one allocator.
        self.waiting: deque[Sequence] = waiting if waiting is not None else deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq)
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            need = blocks_for(n, self.block_size)
            promise = max(0, lifetime_blocks(seq, self.block_size) - need) if self.reserve else 0
            if not self.allocator.can_allocate(need + promise):
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(need)
            self.allocator.promise(promise)
            seq.promised = promise
            seq.num_cached = 0
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += n
        if batch:
            self.running.extend(batch)
            return batch, True

        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            # (a token still being computed on the device takes its slot in the next step)
            while len(seq.block_table) < blocks_for(len(seq) + seq.inflight, self.block_size):
                if seq.promised:
                    seq.block_table += self.allocator.allocate(1, promised=True)
                    seq.promised -= 1
                elif self.allocator.can_allocate(1):
                    seq.block_table += self.allocator.allocate(1)
                elif self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

    def _release(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and whatever was still promised to it."""
        self.allocator.free(seq.block_table)
        self.allocator.promise(-seq.promised)
        seq.block_table, seq.promised = [], 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def decode_fits(self, seqs: list[Sequence]) -> bool:
        """True when the next schedule() is a decode step of exactly `seqs` (in this order): nobody
        waits for admission and every running sequence gets its next block without a preemption."""
        if self.waiting or list(self.running) != seqs:
            return False
        unpromised = 0
        for s in seqs:
            need = blocks_for(len(s) + s.inflight, self.block_size) - len(s.block_table)
            unpromised += max(0, need - s.promised)
        return self.allocator.can_allocate(unpromised)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.inflight = 0  # whatever a queued step computes for it is dropped
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self._release(seq)
