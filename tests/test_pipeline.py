"""The FT-style pipeline across real worker processes: same greedy tokens as one process."""
import os
import shutil

import pytest

from conftest import alive, proc_stats
from dejavu import LLM, SamplingParams
from dejavu.cluster.errors import WorkerError
from hf_models import save_hf_model

PROMPTS = [[5, 6, 7], [9] * 10, list(range(1, 14)), [100], list(range(200, 231))]


def reference(model, prompts, max_tokens, **kw):
    kw.setdefault("device", "cpu")
    llm = LLM(model=model, block_size=4, **kw)
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


def generate_with_arrivals(llm, prompts, params):
    """Half the requests arrive first; the rest join while those are running."""
    eng = llm.engine
    first = [eng.add_request(p, params) for p in prompts[: len(prompts) // 2]]
    for _ in range(3):
        eng.step()
    later = [eng.add_request(p, params) for p in prompts[len(prompts) // 2:]]
    while eng.has_unfinished():
        eng.step()
    return [s.output_ids for s in first + later]


@pytest.mark.parametrize("pp,mb", [(2, 0), (4, 2)])
def test_pipeline_matches_single_process(pp, mb):
    model = "random:llama-tiny"  # 4 layers, GQA
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = reference(model, PROMPTS, 10)
    with LLM(device="cpu", model=model, pp=pp, microbatch_size=mb, block_size=4, kv_cache_blocks=128) as llm:
        pids = [p.pid for p in llm.engine.procs]
        assert all(alive(p) for p in pids)
        got = generate_with_arrivals(llm, PROMPTS, params)
        assert got == ref
        # Every microbatch slot did work, and every block came back.
        assert llm.engine.allocator.num_used == 0
    assert not any(alive(p) for p in pids), "workers left behind after shutdown"


def test_pipeline_hf_checkpoint_and_sampling(tmp_path):
    """A real checkpoint directory loaded by each worker; seeded sampling identical too."""
    save_hf_model("opt", tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    single = LLM(device="cpu", model=str(tmp_path), block_size=4)
    ref = [o.token_ids for o in single.generate(PROMPTS, params)]
    with LLM(device="cpu", model=str(tmp_path), pp=2, block_size=4, kv_cache_blocks=128, microbatch_size=2) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == ref


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
@pytest.mark.parametrize("pp,tp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_pipeline_via_mpirun(pp, tp):
    model = "random:llama-tiny"
    ref = reference(model, PROMPTS, 6)
    with LLM(device="cpu", model=model, pp=pp, tp=tp, block_size=4, kv_cache_blocks=128, launcher="mpirun",
             worker_timeout=120) as llm:
        out = llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
        assert [o.token_ids for o in out] == ref
        assert sorted(w["tp_rank"] for w in llm.engine.cluster()) == sorted(list(range(tp)) * pp)
        procs = list(llm.engine.procs)
    assert all(p.poll() is not None for p in procs)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom", "llama"])
def test_tensor_parallel_matches_hf(family, tmp_path):
    """tp=2: heads and MLP split over two worker processes, all-reduce over gloo."""
    from hf_models import hf_greedy

    hf = save_hf_model(family, tmp_path)
    prompts = [p for p in PROMPTS if max(p) < hf.config.vocab_size]
    with LLM(device="cpu", model=str(tmp_path), tp=2, block_size=4, kv_cache_blocks=128) as llm:
        out = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for p, o in zip(prompts, out):
        assert o.token_ids == hf_greedy(hf, p, 8), f"{family} tp=2 diverged on a prompt of {len(p)} tokens"


def test_pipeline_and_tensor_parallel_together():
    ref = reference("random:llama-tiny", PROMPTS, 8)
    with LLM(device="cpu", model="random:llama-tiny", pp=2, tp=2, microbatch_size=2, block_size=4, kv_cache_blocks=128) as llm:
        assert generate_with_arrivals(llm, PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True)) == ref
        assert len(llm.engine.cluster()) == 4


def test_tp_must_divide_the_heads():
    from dejavu import ModelError

    with pytest.raises(ModelError, match="tensor parallelism 3 does not divide num_heads=4"):
        LLM(device="cpu", model="random:llama-tiny", tp=3)


def test_worker_that_fails_to_start_is_a_clear_error(tmp_path):
    save_hf_model("gpt2", tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:1000])  # the controller reads config.json only; workers fail to load
    with pytest.raises(WorkerError, match="worker \\d failed: ModelError: cannot read weight file"):
        LLM(device="cpu", model=str(tmp_path), pp=2, block_size=4, kv_cache_blocks=64, worker_timeout=60)


def test_bad_pipeline_options():
    with pytest.raises(ValueError, match="pp: must be an integer from 1 to 8"):
        LLM(device="cpu", model="random:gpt2-tiny", pp=9)
    with pytest.raises(ValueError, match="pipeline depth 3 must be between 1 and the 2 layers"):
        LLM(device="cpu", model="random:gpt2-tiny", pp=3)
    with pytest.raises(ValueError, match="must be contiguous, non-empty ranges"):
        LLM(device="cpu", model="random:gpt2-tiny", pp=2, layer_split=[(0, 1), (1, 1)])
    with pytest.raises(ValueError, match="does not end at the model's 2 layers"):
        LLM(device="cpu", model="random:gpt2-tiny", pp=2, layer_split=[(0, 1), (1, 3)])
    with pytest.raises(ValueError, match="admission: must be 'greedy' or 'reserve'"):
        LLM(device="cpu", model="random:gpt2-tiny", admission="fifo")
    with pytest.raises(ValueError, match="not yet available with prompt_stages"):
        LLM(device="cpu", model="random:gpt2-tiny", prompt_stages=1, token_stages=1, admission="reserve")


def _children(pid):
    return [p for p, f in proc_stats() if int(f[1]) == pid and f[0] != "Z"]


def test_sigterm_stops_every_worker():
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "dejavu", "generate", "--model", "random:llama-tiny", "--pp", "2", "--prompt", "x",
           "--max-tokens", "1000", "--ignore-eos", "--max-model-len", "2048"]
    ctl = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while len(_children(ctl.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = _children(ctl.pid)
        assert len(workers) == 2, "workers did not start"
        time.sleep(2)  # let it generate
        ctl.send_signal(signal.SIGTERM)
        ctl.wait(30)
        time.sleep(1)
        assert not any(alive(w) for w in workers), "a worker outlived its controller"
    finally:
        if ctl.poll() is None:
            ctl.kill()


def test_worker_killed_mid_run_is_reported_not_hung():
    """With recovery off (as with tp > 1), a dead worker stops the engine with a clear error."""
    import signal
    import time

    llm = LLM(device="cpu", model="random:llama-tiny", pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=30, recovery="off")
    try:
        eng = llm.engine
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True))
        eng.step()
        os.kill(eng.procs[1].pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(WorkerError, match="worker"):
            while eng.has_unfinished():
                eng.step()
        assert time.time() - t0 < 30
    finally:
        llm.shutdown()
    assert not any(alive(p.pid) for p in llm.engine.procs)


def test_tokens_for_a_microbatch_without_a_step_are_a_clear_error():
    """A worker's answer for a microbatch slot with no step in flight (and not from before a
    recovery) is named in a WorkerError, not a TypeError from unpacking nothing."""
    from dejavu.cluster.messages import Tokens

    with LLM(device="cpu", model="random:llama-tiny", pp=2, block_size=4, kv_cache_blocks=32) as llm:
        eng = llm.engine
        # where a worker's reader thread puts what it read (cluster/membership.py)
        eng.members.inbox.put((1, eng.members.gen[1], Tokens(mb=1, id=10**6, tokens=[5])))
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        with pytest.raises(WorkerError, match="microbatch 1: expected no step, got step 1000000"):
            while eng.has_unfinished():
                eng.step()
