"""The prefix cache's host and disk tiers in a pp=2 pipeline of worker processes: the controller
looks names up once in its index, every worker restores its own layers' bytes; tokens equal a
single process without caching, with hits from the host tier, from the disk tier, after a worker is
killed and after a corrupted block file (both recovered: every name dropped); with --replicate
(restored blocks replicated by the step that restores them, a kill resumed from the replicas) and
with --swap (the tiers copy to and from the workers' host copies)."""
from __future__ import annotations

import os
import random
import signal

from dejavu import LLM, SamplingParams

MODEL = "random:llama-tiny"
BS = 4
SP = SamplingParams(max_tokens=6, ignore_eos=True)
STAGE_BLOCK = 2 * 2 * BS * 2 * 32 * 4  # one stage of llama-tiny: 2 layers x (K, V) x block x 2 heads x 32 x fp32


def _workload():
    """A shared 14-token prefix, then prompts that push its blocks off a 12-block device cache,
    then the shared prefix again (three of its blocks come back from below the device)."""
    r = random.Random(11)
    system = [r.randrange(3, 500) for _ in range(14)]
    others = [[r.randrange(3, 500) for _ in range(22)] for _ in range(4)]
    return [system + [7]] + others + [system + [9, 8, 3]]


def _reference(prompts):
    with LLM(model=MODEL, device="cpu", block_size=BS) as llm:
        return [o.token_ids for o in llm.generate(prompts, SP)]


def _pipeline(**kw):
    return LLM(model=MODEL, device="cpu", pp=2, block_size=BS, kv_cache_blocks=12, microbatch_size=1,
               enable_prefix_caching=True, **kw)


def _one_by_one(llm, prompts):
    return [llm.generate([p], SP)[0].token_ids for p in prompts]


def test_pipeline_host_tier_hits_are_exact():
    prompts = _workload()
    ref = _reference(prompts)
    with _pipeline(kv_offload_gib=2**-14) as llm:  # 64 KiB: 16 blocks of a stage, every evicted one fits
        assert _one_by_one(llm, prompts) == ref
        st = llm.engine.prefix_cache_stats()
        assert st["evictions"] > 0 and st["host_hit_tokens"] >= 3 * BS and st["disk_hit_tokens"] == 0, st
        tiers = llm.engine.prefix_cache_tiers()
        assert 0 < tiers["host"]["blocks"] <= tiers["host"]["capacity_blocks"] == 2**16 // STAGE_BLOCK
        assert llm.engine.allocator.num_used == 0


def test_pipeline_disk_tier_hits_are_exact_and_a_corrupted_file_recovers(tmp_path):
    prompts = _workload()
    ref = _reference(prompts)
    # host: two blocks of a stage; the rest spills to disk
    with _pipeline(kv_offload_gib=2 * STAGE_BLOCK / 2**30, kv_offload_dir=str(tmp_path)) as llm:
        assert _one_by_one(llm, prompts) == ref
        st = llm.engine.prefix_cache_stats()
        assert st["disk_hit_tokens"] >= BS and st["host_capacity_blocks"] == 2, st
        # each worker keeps its own layers' files under the same names as the controller's index
        names = {f[:-3] for f in os.listdir(tmp_path / "s0.0")}
        assert names == {f[:-3] for f in os.listdir(tmp_path / "s1.0")} == {n.hex() for n in llm.engine.tiers.disk.entries}
        # push the shared prefix down to the disk again, then damage stage 1's copies of every block
        assert _one_by_one(llm, prompts[1:-1]) == ref[1:-1]
        files = list((tmp_path / "s1.0").iterdir())
        for path in files:
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x5A
            path.write_bytes(bytes(raw))
        hits = llm.engine.prefix_cache_stats()["disk_hit_tokens"]
        assert _one_by_one(llm, prompts[-1:]) == ref[-1:]  # stage 1 fails the step; replayed from the prompt
        st = llm.engine.prefix_cache_stats()
        assert len(llm.engine.recovery.failures) == 1 and st["disk_hit_tokens"] > hits, st
        assert not any(path.exists() for path in files)  # dropped with every name
        assert _one_by_one(llm, prompts) == ref  # the tiers refill, the same names on every worker
        assert llm.engine.prefix_cache_stats()["disk_hit_tokens"] > st["disk_hit_tokens"]


def test_pipeline_tiers_after_a_worker_is_killed():
    prompts = _workload()
    ref = _reference(prompts)
    with _pipeline(kv_offload_gib=2**-14) as llm:
        assert _one_by_one(llm, prompts) == ref
        os.kill(llm.engine.worker_info[1]["pid"], signal.SIGKILL)
        # the replacement's tiers are empty, the survivor's and the index are dropped with every name
        assert _one_by_one(llm, prompts) == ref
        assert len(llm.engine.recovery.failures) == 1
        assert _one_by_one(llm, prompts) == ref
        assert llm.engine.prefix_cache_stats()["host_hit_tokens"] >= 3 * BS


def test_replicated_pipeline_host_tier_hits_are_exact():
    """--replicate: a step that restores blocks from the host tier replicates them with its own slots."""
    prompts = _workload()
    ref = _reference(prompts)
    with _pipeline(kv_offload_gib=2**-14, replicate=True, worker_timeout=60) as llm:
        assert _one_by_one(llm, prompts) == ref
        assert _one_by_one(llm, prompts) == ref
        eng = llm.engine
        hits = eng.prefix_cache_stats()["host_hit_tokens"]
        assert hits >= 6 * BS
        # resuming paused replication drops the device's names (no replica), not the host tier's
        eng.set_replication(False)
        assert _one_by_one(llm, prompts) == ref
        held = eng.prefix_cache_tiers()["host"]["blocks"]
        eng.set_replication(True)
        assert eng.prefix_cache_tiers()["device"]["blocks"] == 0 and eng.prefix_cache_tiers()["host"]["blocks"] == held
        assert _one_by_one(llm, prompts) == ref
        assert eng.prefix_cache_stats()["host_hit_tokens"] > hits


def test_replicated_pipeline_resumes_exact_after_a_kill_following_host_restores():
    """A worker killed (SIGKILL) once a request's host-tier restore is replicated: its replacement
    takes the restored blocks from the replica holder, and the request resumes from its watermark."""
    prompts = _workload()
    long = SamplingParams(max_tokens=16, ignore_eos=True)
    with LLM(model=MODEL, device="cpu", block_size=BS) as ref_llm:
        ref = ref_llm.generate(prompts[-1:], long)[0].token_ids
        ref_all = [o.token_ids for o in ref_llm.generate(prompts, SP)]
    for rank, swap in ((1, False), (0, False), (1, True)):  # swapping replicates the host copy
        extra = {"swap": True, "resident_microbatches": 1} if swap else {}
        with _pipeline(kv_offload_gib=2**-14, replicate=True, worker_timeout=60, **extra) as llm:
            eng = llm.engine
            _one_by_one(llm, prompts[:-1])  # the shared prefix goes down to the host tier
            hits = eng.prefix_cache_stats()["host_hit_tokens"]
            seq = eng.add_request(prompts[-1], long)
            killed = None
            while eng.has_unfinished():
                if killed is None and eng.replication.watermark_of(seq) >= len(prompts[-1]):
                    killed = eng.worker_info[rank]["pid"]
                    os.kill(killed, signal.SIGKILL)
                eng.step()
            assert killed is not None and seq.output_ids == ref, (rank, swap)
            assert eng.prefix_cache_stats()["host_hit_tokens"] >= hits + 3 * BS
            ev = eng.fault_tolerance()["recoveries"][0]
            assert ev["workers"] == [f"s{rank}.0"] and ev["bad_replicas"] == 0, ev
            assert ev["recomputed_tokens"] < len(prompts[-1]), ev  # from the replicas, not the prompt
            assert _one_by_one(llm, prompts) == ref_all  # the tiers refill after the recovery dropped them


def test_swapping_pipeline_tier_hits_are_exact(tmp_path):
    """--swap: every slot's allocator names its own logical blocks; the one index serves them all and
    each worker's tiers copy to and from its host copy at those logical ids (host hits; then a
    two-block host tier over a disk tier: disk hits promoted into the host copy)."""
    prompts = _workload()
    ref = _reference(prompts)
    for tiers in ({"kv_offload_gib": 2**-14},
                  {"kv_offload_gib": 2 * STAGE_BLOCK / 2**30, "kv_offload_dir": str(tmp_path)}):
        with _pipeline(swap=True, resident_microbatches=1, worker_timeout=60, **tiers) as llm:
            assert _one_by_one(llm, prompts) == ref
            assert [o.token_ids for o in llm.generate(prompts, SP)] == ref
            assert _one_by_one(llm, prompts) == ref
            eng = llm.engine
            st = eng.prefix_cache_stats()
            below = st["disk_hit_tokens"] if "kv_offload_dir" in tiers else st["host_hit_tokens"]
            assert below >= 3 * BS and st["evictions"] > 0, st
            assert all(s.allocator.num_used == 0 for s in eng.slots)
