"""Failures beyond one worker, and replication together with swapping: real worker processes
killed with SIGKILL mid-run; every request's output equals the failure-free run's."""
import argparse
import os
import signal
import time

import pytest

from conftest import alive
from dejavu import LLM
from dejavu.cli.common import add_model_args, config_from_args
from test_fault_tolerance import MODEL, PROMPTS, finish, reference, run  # noqa: F401 (reference: a fixture)


def _kill_together(llm, ranks):
    """A `ready` for run(): the first kill of the pair also kills the others at once, and waits
    until every one of them is gone, so that one recovery finds them all dead."""
    def ready(eng, rank):
        pids = [eng.worker_info[r]["pid"] for r in ranks if r != rank]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        ready.killed += pids
        return True
    ready.killed = []
    return ready


def test_worker_and_one_holder_killed_together_resume_from_the_other(reference):
    """--replicas 2 on pp=3: stage 0's holders are stages 1 and 2. Stage 0 and stage 1 die together:
    stage 0 restores from stage 2 (its second holder), stage 1 from stage 2 (its first); the dead
    holders' replacements are re-seeded; only tokens past the watermark are recomputed."""
    llm = LLM(device="cpu", model=MODEL, pp=3, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              replicas=2)
    eng = llm.engine
    assert [eng.holder_ranks(r) for r in range(3)] == [[1, 2], [2, 0], [0, 1]]
    ready = _kill_together(llm, [0, 1])
    killed = []
    try:
        got, killed = run(llm, [(12, 0)], ready=ready)
        assert got == reference
        evs = eng.fault_tolerance()["recoveries"]
        assert sorted(r for e in evs for r in e["ranks"]) == [0, 1], evs
        assert all(e["bad_replicas"] == 0 for e in evs), evs
        assert sum(e["recomputed_tokens"] for e in evs) <= 3 * len(PROMPTS), evs  # from the prompts: hundreds
        # The replacements (and the re-seeded holders) keep replicating to both holders.
        assert {k for _, k in eng.replication.bytes} == {0, 1}
    finally:
        finish(llm, killed + ready.killed)


def test_worker_and_its_only_holder_killed_together_recompute(reference):
    """One holder each, no replica directory: both workers of pp=2 die together, each holding the
    other's only replica. The requests start over from their prompts, still exact."""
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True)
    ready = _kill_together(llm, [0, 1])
    killed = []
    try:
        got, killed = run(llm, [(14, 0)], ready=ready)
        assert got == reference
        evs = llm.engine.fault_tolerance()["recoveries"]
        assert sorted(r for e in evs for r in e["ranks"]) == [0, 1], evs
        assert sum(e["recomputed_tokens"] for e in evs) >= 3 * len(PROMPTS), evs  # past every watermark
    finally:
        finish(llm, killed + ready.killed)


@pytest.mark.parametrize("kills", [[(9, 1)], [(6, 0), (20, 1)]])
def test_swapping_and_replication_together(reference, kills):
    """--swap --replicate: 2 microbatch slots over 1 resident region, so one microbatch is always
    swapped out. The replicas are of the host copy (resident and swapped KV alike): a killed
    worker's replacement restores both and resumes from the watermark."""
    llm = LLM(device="cpu", model=MODEL, pp=2, swap=True, resident_microbatches=1, microbatch_size=4, block_size=4,
              kv_cache_blocks=96, worker_timeout=60, replicate=True)
    eng = llm.engine
    killed = []
    try:
        got, killed = run(llm, kills)
        assert got == reference
        evs = eng.fault_tolerance()["recoveries"]
        assert [e["ranks"] for e in evs] == [[r] for _, r in kills]
        assert all(e["bad_replicas"] == 0 and e["recomputed_tokens"] <= 3 * len(PROMPTS) for e in evs), evs
        assert all(s["bytes_in"] > 0 for s in eng.swap_stats.values())  # it did swap
    finally:
        finish(llm, killed)


def test_replicas_flag_reaches_the_config():
    p = argparse.ArgumentParser()
    add_model_args(p)
    c = config_from_args(p.parse_args(["--pp", "3", "--replicate", "--replicas", "2", "--swap"])).validate()
    assert c.replication.replicas == 2 and c.swap.swap  # swap and replication together are accepted
    with pytest.raises(SystemExit):
        p.parse_args(["--replicas", "0"])
