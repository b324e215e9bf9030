"""Prompt-token disaggregation across real processes: prompt workers stream KV layer by layer to
token workers; output identical to the single-process engine."""
import pytest

from dejavu import LLM, RequestError, SamplingParams
from test_pipeline import PROMPTS, alive, generate_with_arrivals, reference

MODEL = "random:llama-tiny"  # 4 layers, 2 KV heads of 32, SmolLM2 tokenizer
BLOCK = 4


def expected_kv_bytes(prompts, layers=4, kv_heads=2, head_dim=32, elem=4):
    blocks = sum(-(-len(p) // BLOCK) for p in prompts)
    return blocks * layers * 2 * BLOCK * kv_heads * head_dim * elem


def _metrics_text(engine) -> str:
    from dejavu.serving.async_engine import AsyncEngine

    ae = AsyncEngine(engine)
    try:
        return ae.metrics.render()
    finally:
        ae.shutdown()


@pytest.mark.parametrize("dp,dt,tp,transport", [(1, 1, 1, "tcp"), (1, 2, 1, "auto"), (2, 1, 1, "tcp"),
                                                 (2, 2, 1, "auto"), (1, 1, 2, "shm")])
def test_disaggregated_matches_single_process(dp, dt, tp, transport):
    import glob

    params = SamplingParams(max_tokens=9, ignore_eos=True)
    ref = reference(MODEL, PROMPTS, 9)
    with LLM(device="cpu", model=MODEL, prompt_stages=dp, token_stages=dt, tp=tp, block_size=BLOCK, kv_cache_blocks=128,
             worker_timeout=60, kv_transport=transport) as llm:
        eng = llm.engine
        roles = sorted((w["role"], w["stage"], w["tp_rank"]) for w in eng.cluster())
        assert roles == sorted([("prompt", s, r) for s in range(dp) for r in range(tp)]
                               + [("token", s, r) for s in range(dt) for r in range(tp)])
        assert generate_with_arrivals(llm, PROMPTS, params) == ref
        # Every prompt's KV crossed exactly once, all layers, all heads.
        assert eng.kv_bytes == expected_kv_bytes(PROMPTS)
        # Each prefill reports its compute, its exposed transfer time and the calibrated raw one.
        assert all(st["raw_s"] > 0 and st["compute_s"] > 0 and st["exposed_s"] >= 0 for st in eng.transfer_stats)
        if (dp, dt, tp) == (1, 1, 1):  # /metrics reports those times (once is enough)
            text = _metrics_text(eng)
            raw = sum(st["raw_s"] for st in eng.transfer_stats)
            assert f'dejavu_kv_transfer_seconds_total{{part="prompt_to_token_raw"}} {raw}' in text
            # The token stage times its decode steps (at least one per generated token after the
            # first two: the latest rides with the next reply).
            n = eng.decode_step_totals[0]
            assert n >= 7 and len(eng.decode_steps) == n and all(x > 0 for x in eng.decode_steps)
            assert f"dejavu_decode_steps_total {n}" in text
        assert eng.allocator.num_used == 0 and eng.prompt_alloc.num_used == 0
        # auto picks shared memory: every worker runs on this host.
        assert eng.transports_used == {"shm" if transport in ("auto", "shm") else "tcp"}
        pids = [p.pid for p in eng.procs]
        prefix = f"/dev/shm/{eng.shm_prefix()}"
    assert not any(alive(p) for p in pids)
    assert not glob.glob(prefix + "*"), "shared memory left behind"


def test_more_prompts_than_receive_slots_all_complete():
    prompts = [[i + 3] * (i + 1) for i in range(12)]
    ref = reference(MODEL, prompts, 5)
    with LLM(device="cpu", model=MODEL, prompt_stages=1, token_stages=1, block_size=BLOCK, kv_cache_blocks=64,
             kv_receive_slots=1, microbatch_size=2) as llm:
        out = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
        assert [o.token_ids for o in out] == ref
        assert llm.engine.in_transfer == 0


def test_prompt_too_long_for_the_token_side_is_rejected_before_any_work():
    with LLM(device="cpu", model=MODEL, prompt_stages=1, token_stages=1, block_size=BLOCK, kv_cache_blocks=8) as llm:
        with pytest.raises(RequestError, match="needs 10 KV blocks but the cache holds only 8"):
            llm.generate([[7] * 36], SamplingParams(max_tokens=4))
        assert llm.engine.kv_bytes == 0 and not llm.engine.transfer_stats
        # Still serving.
        assert len(llm.generate([[7] * 5], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_transport_choice():
    from dejavu.kvstream.select import choose

    assert choose("localhost") == "shm" and choose("127.0.0.1") == "shm"
    assert choose("localhost", device="cuda") == "ipc"
    assert choose("other-host", local_host="this-host", device="cuda") == "tcp"
    with pytest.raises(ValueError, match="needs workers on CUDA devices"):
        choose("localhost", "ipc")
    assert choose("other-host", local_host="this-host") == "tcp"
    assert choose("localhost", "tcp") == "tcp"
    with pytest.raises(ValueError, match="unknown KV transport 'carrier-pigeon'"):
        choose("x", "carrier-pigeon")


def test_shm_destination_round_trip_and_cleanup():
    import torch

    from dejavu.kvstream import KVStreamer, Region
    from dejavu.kvstream.shm import ShmDest, cleanup
    from kv_helpers import empty_like, filled_cache, region_values

    src = filled_cache(seed=4)
    dest = ShmDest("dejavu-pytest-")
    region = Region.chunks([1, 3], [2, 9, 5])
    KVStreamer(src).stream_out(region, dest, "r1").wait()
    assert dest.size("r1") == region.nbytes(src.layout())
    dst = empty_like(src)
    KVStreamer(dst).stream_in(dest, "r1", region).wait()
    assert torch.equal(region_values(dst, region), region_values(src, region))
    assert dest.size("r1") == -1  # the reader unlinked it
    KVStreamer(src).stream_out(region, dest, "left-behind").wait()
    assert cleanup("dejavu-pytest-") == 1 and dest.size("left-behind") == -1


def test_disaggregation_options_are_checked():
    with pytest.raises(ValueError, match="go together"):
        LLM(device="cpu", model=MODEL, prompt_stages=1)
    with pytest.raises(ValueError, match="leave pp at 1"):
        LLM(device="cpu", model=MODEL, prompt_stages=1, token_stages=1, pp=2)


def test_cuda_ipc_writes_into_the_token_cache_exactly_like_tcp():
    """On a GPU: prompt workers write straight into the token worker's cache (CUDA IPC); the
    tokens must equal those of the same deployment moving the bytes over TCP."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    outs = {}
    for transport in ("ipc", "tcp"):
        with LLM(model=MODEL, device="cuda", dtype="float32", prompt_stages=1, token_stages=1, block_size=BLOCK,
                 kv_cache_blocks=128, kv_transport=transport, worker_timeout=120) as llm:
            outs[transport] = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=9, ignore_eos=True))]
            assert llm.engine.transports_used == {transport}
            assert llm.engine.kv_bytes == expected_kv_bytes(PROMPTS)
    assert outs["ipc"] == outs["tcp"]
