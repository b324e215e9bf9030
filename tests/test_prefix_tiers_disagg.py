"""The prefix cache's host and disk tiers with prompt-token disaggregation: the prompt side holds
them (its evicted named blocks go down, a hit is restored into the prompt worker's cache before its
prefill), and the layer-by-layer stream sends the token side the blocks it lacks, restored ones
included. Worker processes, against a single process without caching."""
from __future__ import annotations

import os
import random
import signal

import pytest
from dejavu import LLM, SamplingParams
from dejavu.engine.block_manager import blocks_for

MODEL = "random:llama-tiny"
BS = 4
SP = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT_BLOCK = 4 * 2 * BS * 2 * 32 * 4  # the prompt worker's block: 4 layers x (K, V) x block x 2 heads x 32 x fp32


def _workload():
    """A shared 14-token prefix, then prompts that push its blocks off a 12-block cache on either
    side, then the shared prefix again (three of its blocks come back from below the device)."""
    r = random.Random(11)
    system = [r.randrange(3, 500) for _ in range(14)]
    others = [[r.randrange(3, 500) for _ in range(22)] for _ in range(4)]
    return [system + [7]] + others + [system + [9, 8, 3]]


def _reference(prompts, sp=SP):
    with LLM(model=MODEL, device="cpu", block_size=BS) as llm:
        return [o.token_ids for o in llm.generate(prompts, sp)]


def _disagg(token_stages=1, prompt_stages=1, **kw):
    return LLM(model=MODEL, device="cpu", prompt_stages=prompt_stages, token_stages=token_stages, block_size=BS,
               kv_cache_blocks=12, microbatch_size=1, worker_timeout=60, enable_prefix_caching=True, **kw)


def _one_by_one(llm, prompts, sp=SP):
    return [llm.generate([p], sp)[0].token_ids for p in prompts]


@pytest.mark.parametrize("prompt_stages", [1, 2])
def test_disaggregated_host_tier_hits_are_exact(prompt_stages):
    """Also with two prompt stages, each restoring its own layers (capacity in blocks of a stage)."""
    prompts = _workload()
    ref = _reference(prompts)
    with _disagg(prompt_stages=prompt_stages, kv_offload_gib=16 * PROMPT_BLOCK / 2**30) as llm:
        eng = llm.engine
        assert _one_by_one(llm, prompts) == ref
        st = eng.prefix_cache_stats()
        assert st["evictions"] > 0 and st["host_hit_tokens"] >= 3 * BS and st["disk_hit_tokens"] == 0, st
        # the token side lost the shared blocks too: the prompt worker restored and sent all of them
        per_block = eng.transfer_stats[0]["bytes"] // blocks_for(len(prompts[0]), BS)
        assert eng.transfer_stats[-1]["bytes"] == blocks_for(len(prompts[-1]), BS) * per_block
        host = eng.prefix_cache_tiers()["host"]
        assert 0 < host["blocks"] <= host["capacity_blocks"] == 16 * prompt_stages
        # all at once, then again: device hits on both sides, host hits where the device lost them
        assert [o.token_ids for o in llm.generate(prompts, SP)] == ref
        assert _one_by_one(llm, prompts) == ref
        assert eng.allocator.num_used == 0 and eng.prompt_alloc.num_used == 0


def test_disaggregated_disk_tier_hits_are_exact_and_a_corrupted_file_recovers(tmp_path):
    prompts = _workload()
    ref = _reference(prompts)
    with _disagg(kv_offload_gib=2 * PROMPT_BLOCK / 2**30, kv_offload_dir=str(tmp_path)) as llm:
        eng = llm.engine
        assert _one_by_one(llm, prompts) == ref
        st = eng.prefix_cache_stats()
        assert st["disk_hit_tokens"] >= BS and st["host_capacity_blocks"] == 2, st
        # the prompt worker's files are the index's names
        assert {f[:-3] for f in os.listdir(tmp_path / "p0.0")} == {n.hex() for n in eng.tiers.disk.entries}
        # push the shared prefix down again, then damage every file: the prefill fails on the prompt
        # worker, every name is dropped, and it is prefilled again from the prompt
        assert _one_by_one(llm, prompts[1:-1]) == ref[1:-1]
        files = list((tmp_path / "p0.0").iterdir())
        for path in files:
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x5A
            path.write_bytes(bytes(raw))
        hits = eng.prefix_cache_stats()["disk_hit_tokens"]
        assert _one_by_one(llm, prompts[-1:]) == ref[-1:]
        assert len(eng.recovery.failures) == 1 and eng.prefix_cache_stats()["disk_hit_tokens"] > hits
        assert not any(path.exists() for path in files)
        assert _one_by_one(llm, prompts) == ref  # the tiers refill
        assert eng.prefix_cache_stats()["disk_hit_tokens"] > hits + BS


def test_replicated_disaggregation_resumes_exact_after_a_kill_following_host_restores():
    """--replicate (token_stages=2): the token side replicates the KV it is sent, restored blocks
    included. The prompt worker killed as a prefill that restores blocks is sent to it (the prefill
    is redone, every name dropped), or a token worker killed once that request's KV is replicated
    (it resumes from its watermark; also with --swap on the token side): tokens equal a single
    process's."""
    prompts = _workload()
    long = SamplingParams(max_tokens=16, ignore_eos=True)
    ref = _reference(prompts[-1:], long)[0]
    for rank, swap in ((0, False), (2, False), (2, True)):  # the prompt worker, the second token worker
        extra = {"swap": True, "resident_microbatches": 1} if swap else {}
        with _disagg(token_stages=2, kv_offload_gib=16 * PROMPT_BLOCK / 2**30, replicate=True, **extra) as llm:
            eng = llm.engine
            _one_by_one(llm, prompts[:-1])  # the shared prefix goes down to the host tier
            hits = eng.prefix_cache_stats()["host_hit_tokens"]
            seq = eng.add_request(prompts[-1], long)
            killed = None
            if rank == 0:
                eng.policy.feed()  # the prefill that restores the shared blocks is sent ...
                assert eng.prefix_cache_stats()["host_hit_tokens"] >= hits + 3 * BS
                killed = eng.worker_info[rank]["pid"]
                os.kill(killed, signal.SIGKILL)  # ... and its worker killed
            while eng.has_unfinished():
                if killed is None and eng.replication.watermark_of(seq) >= len(prompts[-1]):
                    assert eng.prefix_cache_stats()["host_hit_tokens"] >= hits + 3 * BS
                    killed = eng.worker_info[rank]["pid"]
                    os.kill(killed, signal.SIGKILL)
                eng.step()
            assert killed is not None and seq.output_ids == ref, (rank, swap)
            ev = eng.fault_tolerance()["recoveries"][0]
            assert ev["workers"] == [eng.worker_info[rank]["worker"]] and ev["bad_replicas"] == 0, ev
            assert _one_by_one(llm, prompts) == _reference(prompts)  # the tiers refill after the reset
