"""Admission: greedy (admit by the tokens so far, preempt when the cache fills) against reserve (admit
only when prompt + max_tokens fits beside what running sequences were promised; never preempt).
The scheduler is driven here without a model: each decode step appends one token per sequence."""
from __future__ import annotations

import pytest

from dejavu import SamplingParams
from dejavu.engine.block_manager import BlockAllocator, OutOfBlocks
from dejavu.engine.scheduler import Scheduler, lifetime_blocks
from dejavu.engine.sequence import Sequence


def _drive(admission: str, num_blocks: int, lengths: list[tuple[int, int]], block_size: int = 4):
    """Run (prompt, max_tokens) requests to the end; returns the scheduler, the most sequences running
    at once, and every sequence's tokens."""
    alloc = BlockAllocator(num_blocks)
    sch = Scheduler(alloc, block_size, max_num_seqs=64, max_num_batched_tokens=4096, admission=admission)
    seqs = [Sequence(list(range(1, p + 1)), SamplingParams(max_tokens=m, ignore_eos=True), seed=0)
            for p, m in lengths]
    for s in seqs:
        sch.add(s)
    peak, steps = 0, 0
    while sch.has_unfinished():
        steps += 1
        assert steps < 10_000, "the scheduler made no progress"
        batch, _prefill = sch.schedule()
        peak = max(peak, len(sch.running))
        # Blocks held plus those promised never exceed the budget, and each sequence's table covers it.
        assert alloc.num_used + alloc.promised <= num_blocks
        for s in batch:
            assert len(s.block_table) * block_size >= len(s)
            s.token_ids.append(7)  # the token this step sampled (its KV is written next step)
            if s.num_output_tokens >= s.params.max_tokens:
                sch.finish(s, "length")
    return sch, alloc, peak, seqs


def test_reserve_never_preempts_and_holds_what_the_budget_fits():
    # 10 requests of 6 + 10 tokens: 15 KV slots at most, 4 blocks of 4 each; 16 blocks hold 4 of them.
    lengths = [(6, 10)] * 10
    sch, alloc, peak, seqs = _drive("reserve", 16, lengths)
    assert sch.num_preemptions == 0
    assert peak == 4
    assert all(s.num_output_tokens == 10 for s in seqs)
    assert alloc.num_used == 0 and alloc.promised == 0 and alloc.num_free == 16


def test_greedy_admits_more_at_first_and_preempts_on_the_same_load():
    lengths = [(6, 10)] * 10
    sch, alloc, peak, seqs = _drive("greedy", 16, lengths)
    assert peak > 4  # admitted by prompt (2 blocks each)
    assert sch.num_preemptions > 0
    assert all(s.num_output_tokens == 10 for s in seqs)
    assert alloc.num_used == 0 and alloc.promised == 0


def test_reserve_with_mixed_lengths_and_a_shared_allocator():
    """Two schedulers (pipeline microbatches) on one allocator: promises of one bind the other."""
    alloc = BlockAllocator(12)
    a, b = (Scheduler(alloc, 4, 8, 4096, admission="reserve") for _ in range(2))
    long = Sequence([1] * 5, SamplingParams(max_tokens=20, ignore_eos=True), seed=0)  # 24 slots: 6 blocks
    assert lifetime_blocks(long, 4) == 6
    a.add(long)
    batch, prefill = a.schedule()
    assert batch == [long] and prefill and len(long.block_table) == 2 and alloc.promised == 4
    # 10 blocks are free but 4 are promised: a 7-block request waits, a 6-block one runs.
    big = Sequence([1] * 9, SamplingParams(max_tokens=20, ignore_eos=True), seed=0)  # 28 slots: 7 blocks
    b.add(big)
    assert b.schedule() == ([], False) and b.waiting[0] is big
    b.waiting.clear()
    fits = Sequence([1] * 9, SamplingParams(max_tokens=16, ignore_eos=True), seed=0)  # 24 slots: 6 blocks
    b.add(fits)
    assert b.schedule()[0] == [fits] and alloc.promised == 4 + 3 and alloc.num_free == 12 - 2 - 3
    with pytest.raises(OutOfBlocks, match="promised"):
        alloc.allocate(1)  # every free block is promised
    b.finish(fits, "abort")  # its promise goes back with its blocks
    assert alloc.promised == 4 and alloc.num_free == 10


def test_unknown_admission_is_a_clear_error():
    with pytest.raises(ValueError, match="admission: must be 'greedy' or 'reserve', got 'lazy'"):
        Scheduler(BlockAllocator(4), 4, 8, 4096, admission="lazy")
