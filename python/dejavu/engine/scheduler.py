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

With prefix caching (a `prefix_salt`), admission first looks up the sequence's leading full blocks
by name: blocks on the device are shared (a reference each), blocks a lower tier holds (`tiers`,
engine/prefix_tiers.py) get fresh blocks listed in Sequence.restore for the engine to fill, and the
prefill computes only the rest. At least the last token is always computed (its logits are needed).
Blocks are named once their K/V is computed (docs/prefix-caching.md). A request that would compute
a block this step's batch computes waits a step (and hits it); so does one whose long prefill would
hold back the first tokens of a batch with hits.
"""
from __future__ import annotations

from collections import deque

from ..config import ADMISSION, check_choice
from .block_manager import BlockAllocator, block_hashes, blocks_for, root_hash
from .sequence import Sequence, Status



def lifetime_blocks(seq: Sequence, block_size: int) -> int:
    """Blocks `seq` holds when it stops at max_tokens (the last token's KV is never written)."""
    return blocks_for(max(len(seq), seq.num_prompt_tokens + seq.params.max_tokens - 1), block_size)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 waiting: deque | None = None, admission: str = "greedy", prefix_salt: str | None = None,
                 tiers=None):
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
        self.root = root_hash(prefix_salt) if prefix_salt is not None else None  # None: no prefix caching
        self.tiers = tiers  # lower tiers: lookup(names) -> how many leading names they hold

    @property
    def prefix_caching(self) -> bool:
        return self.root is not None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        for seq in self.running:
            self._name_computed(seq)
        batch: list[Sequence] = []
        tokens = 0
        computing: set[bytes] = set()  # names of the full blocks this batch computes
        hit_batch = False  # the batch has a request that hit the prefix cache
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            hits, lower = self._cached_prefix(seq)
            n = len(seq) - (len(hits) + len(lower)) * self.block_size  # tokens this step computes
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            if batch and self._waits_for(seq, len(hits) + len(lower), computing):
                break  # it hits those blocks next step instead of computing its own copy now
            if hit_batch and n > 2 * tokens:
                break  # a long prefill would hold back the first tokens of this batch's cache hits
            need = blocks_for(len(seq), self.block_size) - len(hits)
            promise = max(0, lifetime_blocks(seq, self.block_size) - need - len(hits)) if self.reserve else 0
            if not self.allocator.can_allocate(need + self.allocator.num_unreferenced(hits) + promise):
                break
            self.waiting.popleft()
            self.allocator.acquire(hits)
            seq.block_table = hits + self.allocator.allocate(need)
            self.allocator.promise(promise)
            seq.promised = promise
            seq.num_cached = len(hits) * self.block_size  # the engine adds the restored blocks'
            seq.num_named = len(hits)
            seq.restore = list(zip(seq.block_table[len(hits):len(hits) + len(lower)], lower))
            if self.prefix_caching:
                self.allocator.stats.queried_tokens += len(seq)
                self.allocator.stats.device_hit_tokens += len(hits) * self.block_size
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += n
            if self.prefix_caching:
                computing.update(seq.block_names[len(hits) + len(lower):])
                hit_batch = hit_batch or bool(hits or lower)
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

    def names(self, seq: Sequence, full: int) -> list[bytes]:
        """Names of `seq`'s first `full` blocks (computed once per sequence and block)."""
        have = len(seq.block_names)
        if have < full:
            parent = seq.block_names[-1] if have else self.root
            seq.block_names += block_hashes(seq.token_ids, self.block_size, parent, have, full)
        return seq.block_names[:full]

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """Device blocks holding `seq`'s leading full blocks, then the names of the blocks after them
        that a lower tier holds. Never the block of the last token: it is computed for its logits."""
        if self.root is None or seq.params.prompt_logprobs is not None:  # (those need every prompt row)
            return [], []
        names = self.names(seq, (len(seq) - 1) // self.block_size)
        hits = self.allocator.lookup(names)
        lower = names[len(hits):len(hits) + self.tiers.lookup(names[len(hits):])] if self.tiers else []
        return hits, lower

    def _waits_for(self, seq: Sequence, cached: int, computing: set[bytes]) -> bool:
        """True when `seq`'s first block to compute is one this step's batch computes already:
        admitted next step, it shares that block and those after it (a burst of requests with one
        system prompt computes it once, not once each)."""
        return cached < len(seq.block_names) and seq.block_names[cached] in computing

    def _name_computed(self, seq: Sequence) -> None:
        """Name `seq`'s full blocks whose K/V is computed, so later admissions can share them."""
        if self.root is None:
            return
        full = min(seq.num_cached, len(seq)) // self.block_size
        if full > seq.num_named:
            names = self.names(seq, full)
            for i in range(seq.num_named, full):
                self.allocator.register(seq.block_table[i], names[i])
            seq.num_named = full

    def _release(self, seq: Sequence) -> None:
        """Free `seq`'s blocks (last first, so its prefix stays cached longest) and whatever was still
        promised to it."""
        self._name_computed(seq)
        self.allocator.free(reversed(seq.block_table))
        self.allocator.promise(-seq.promised)
        seq.block_table, seq.promised, seq.num_named, seq.restore = [], 0, 0, []

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
