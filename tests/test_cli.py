"""The console script, as a user runs it."""
import json
import os
import subprocess
import sys

import pytest


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dejavu", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_generate_json():
    args = ("generate", "--model", "random:gpt2-tiny", "--prompt", "hello", "--prompt", "a longer prompt here",
            "--max-tokens", "5", "--ignore-eos", "--json")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["hello", "a longer prompt here"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    assert "tok/s" in r.stderr
    # each greedy step waiting for its tokens: the same tokens
    r = run(*args, "--no-overlap")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["token_ids"] for x in r.stdout.splitlines()] == [x["token_ids"] for x in lines]


def test_generate_errors_are_clear():
    r = run("generate", "--model", "random:nope", "--prompt", "x")
    assert r.returncode == 2 and "unknown random model 'nope'" in r.stderr
    r = run("generate", "--model", "random:gpt2-tiny", "--prompt", "x", "--max-tokens", "0")
    assert r.returncode == 2 and "--max-tokens must be > 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_decode_on_cpu(tmp_path):
    """The decode benchmark's rows (ours vs HF, same prompts) and its --batch validation."""
    out = tmp_path / "decode.json"
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "1,3", "--prompt-len", "20",
            "--max-tokens", "6", "--compare-pdl", "--pairs", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["batch"] for row in res["rows"]] == [1, 3]
    for row in res["rows"]:
        assert row["ms_per_step"] > 0 and row["hf_ms_per_step"] > 0
        # prefill: the median of 3 runs of each, alternating, after an untimed one
        assert row["prefill_runs"] == 3 and row["prefill_ms"] > 0 and row["hf_prefill_ms"] > 0
        assert row["identical_sequences"] == f"{row['batch']}/{row['batch']}"  # fp32 greedy equals HF
        assert row["hf_first_difference"] == [None] * row["batch"]
        # --compare-pdl: off / on pairs (on the CPU nothing is launched either way, and no graphs)
        assert len(row["pdl_pair_ratios"]) == 2 and row["pdl_ratio"] > 0 and "pdl_on_gpu_ms" not in row
    assert not res["cuda_graphs"] and res["weight_bytes"] > 0 and res["programmatic_launch"] is False
    assert "programmatic launch on:" in r.stdout
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "1,x")
    assert r.returncode == 2 and "--batch must be comma-separated positive integers" in r.stderr


def test_first_difference_from_hf():
    """Where a greedy sequence parts from HF's (reported per sequence by bench decode)."""
    from dejavu.bench.decode import first_difference

    assert first_difference([5, 6, 7], [5, 6, 7]) is None
    assert first_difference([5, 6, 7], [5, 9, 7]) == 1 and first_difference([1], [2]) == 0
    assert first_difference([5, 6], [5, 6, 7]) == 2  # one ended early


def test_bench_decode_with_replication_running(tmp_path):
    """--replicate: each batch decoded again with every step's new KV streamed to a replica holder
    (the Replicator of a token worker), alternating off / on; every step is acknowledged and the
    holder's copy of the last steps' slots equals the cache."""
    out = tmp_path / "decode.json"
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "1,3", "--prompt-len", "20",
            "--max-tokens", "6", "--no-hf", "--replicate", "--pairs", "2", "--replicate-path", "ring,gather",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    for row in json.loads(out.read_text())["rows"]:
        assert row["replicate_acked"] == "20/20"  # 2 pairs x 2 paths x 5 decode steps
        # replicated steps stay overlapped: each run's decode steps after its first are queued before
        # the tokens of the step before are read (the runner commits them to the Replicator as queued)
        assert row["replicate_chained_steps"] == 2 * 2 * 4
        assert row["replica_exact"] is True and row["replicate_bytes"] > 0 and row["replicate_ring_misses"] == 0
        assert row["replicate_ratio"] == row["replicate_by_path"]["ring"]["ratio"] > 0
        assert sorted(row["replicate_by_path"]) == ["gather", "ring"]
        assert all(len(r["pair_ratios"]) == 2 for r in row["replicate_by_path"].values())
    assert "with replication (ring):" in r.stdout and "with replication (gather):" in r.stdout
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "1", "--no-hf",
            "--replicate", "--replicate-path", "ring,copy")
    assert r.returncode == 2 and "--replicate-path takes" in r.stderr
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "2", "--prompt-len", "20",
            "--max-tokens", "6", "--no-hf", "--replicate", "--pairs", "1", "--replica-holder", "process",
            "--replicate-every", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["replica_holder"] == "process" and res["replicate_every"] == 2
    # by default both paths, the gather first (the cheaper one for steps queued ahead): 2 x 5 steps
    assert res["replicate_paths"] == ["gather", "ring"]
    row = res["rows"][0]
    assert row["replicate_ratio"] == row["replicate_by_path"]["gather"]["ratio"] > 0
    assert row["replicate_acked"] == "10/10" and row["replica_exact"] is True
    # the diagnostic that leaves out each step's send: still acknowledged, but the holder has nothing
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "2", "--prompt-len", "20",
            "--max-tokens", "6", "--no-hf", "--replicate", "--pairs", "1", "--replicate-skip", "send", "--json", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["replicate_acked"] == "10/10" and row["replica_exact"] is False


@pytest.mark.parametrize("driver", ["step", "thread"])
def test_bench_decode_with_a_swap_stream(tmp_path, driver):
    """--swap-stream: each batch decoded again with microbatch swapping running beside it (a
    SwapCache cycling three shadow microbatches of the batch's size through two regions); every
    prefetch moves a whole shadow microbatch in, and the decoded tokens do not change. The swap-ins
    start between steps (driver step) or on a thread of their own (thread)."""
    out = tmp_path / "decode.json"
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "2", "--prompt-len", "20",
            "--max-tokens", "6", "--no-hf", "--swap-stream", "--swap-driver", driver, "--pairs", "2",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["swap_same_tokens"] is True and len(row["swap_pair_ratios"]) == 2 and row["swap_ratio"] > 0
    # the host's time starting swap-ins in the decode loop (none there with the thread driver)
    assert (row["swap_host_ms_per_step"] > 0) == (driver == "step")
    assert "swap_gpu_ratio" not in row  # no graphs on the CPU: nothing to replay
    # the extra pair timed apart (events around each replay on CUDA; none here) counts in no ratio,
    # and what the device did after the decode's stream was done is reported, not counted
    assert "swap_loop_busy_ratio" not in row and row["swap_tail_ms"] >= 0
    from dejavu.engine.block_manager import blocks_for

    blocks = 2 * blocks_for(20 + 6, 16)  # the batch's blocks: one shadow microbatch
    assert row["swap_prefetches"] >= 2
    assert row["swap_bytes_in"] == row["swap_prefetches"] * blocks * row["swap_block_bytes"]
    assert "with a swap stream:" in r.stdout


def test_bench_decode_with_replication_and_swapping_at_once(tmp_path):
    """--replicate with --swap-stream: besides each stream alone, the batch decoded with both running
    at once against neither (issue 9's "with token-level replication and swapping streams running"):
    every replicated step is acknowledged, the holder's copy is exact, and the tokens do not change."""
    out = tmp_path / "decode.json"
    r = run("bench", "decode", "--model", "random:opt-tiny", "--device", "cpu", "--batch", "2", "--prompt-len", "20",
            "--max-tokens", "6", "--no-hf", "--replicate", "--replicate-path", "gather", "--swap-stream",
            "--pairs", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["replicate_acked"] == "10/10" and row["swap_same_tokens"] is True  # each stream alone
    assert row["both_path"] == "gather" and len(row["both_pair_ratios"]) == 2 and row["both_ratio"] > 0
    assert row["both_acked"] == "10/10" and row["both_replica_exact"] is True and row["both_same_tokens"] is True
    blocks = 2 * -(-(20 + 6) // 16)
    assert row["both_swap_prefetches"] >= 2
    assert row["both_swap_bytes_in"] == row["both_swap_prefetches"] * blocks * row["swap_block_bytes"]
    assert "with replication (gather) and a swap stream at once:" in r.stdout


def test_bench_swap_holds_d_over_k_times_the_batch(tmp_path):
    """`bench swap` with reserve admission: pp=2 with one resident microbatch runs microbatches twice
    the size at the same KV budget, neither run preempts, and the tokens are the same (fp32)."""
    out = tmp_path / "swap.json"
    # 12 + 8 tokens: 19 KV slots, 2 blocks of 16; 8 blocks per worker: 4 requests without swapping
    # (2 microbatches of 2), 8 with it (a region of 8 blocks per microbatch of 4).
    r = run("bench", "swap", "--model", "random:opt-tiny", "--pp", "2", "--resident-microbatches", "1",
            "--kv-cache-blocks", "8", "--requests", "10", "--prompt-len", "12", "--max-tokens", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    off, on = res["rows"]
    assert res["admission"] == "reserve" and res["same_tokens"] is True
    assert (off["microbatch_size"], on["microbatch_size"]) == (2, 4)
    assert (off["peak_running"], on["peak_running"]) == (4, 8)
    assert off["preemptions"] == on["preemptions"] == 0
    assert on["swap_in_bytes"] > 0 and off["swap_in_bytes"] == 0


# ---------------------------------------------------------------------- vLLM's spellings
def test_vllm_flag_spellings_version_help_and_verbose_after_the_subcommand():
    from dejavu.cli import build_parser
    from dejavu.cli.common import config_from_args

    args = build_parser().parse_args(["serve", "random:llama-tiny", "-tp", "2", "--pipeline-parallel-size", "2",
                                      "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--seed", "3", "-v"])
    assert (args.model_tag, args.tp, args.pp, args.verbose) == ("random:llama-tiny", 2, 2, True)
    cfg = config_from_args(args)
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens, cfg.seed) == (8, 512, 3)
    assert build_parser().parse_args(["serve"]).verbose is False
    r = run("--version")
    import dejavu
    assert r.returncode == 0 and r.stdout.strip() == f"dejavu {dejavu.__version__}"
    r = run("serve", "--help")
    assert r.returncode == 0 and "--tensor-parallel-size" in r.stdout and "-pp" in r.stdout
    assert "requests in a batch at once (default: 64)" in " ".join(r.stdout.split())
    r = run("serve", "random:llama-tiny", "--model", "random:gpt2-tiny")
    assert r.returncode == 2 and "two models given" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--model", "random:gpt2-tiny", "--device", "cpu", "--prompt", "x",
            "--gpu-memory-utilization", "0.5")
    assert r.returncode == 2 and "gpu_memory_utilization" in r.stderr and "--kv-cache-blocks" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_template_and_tokenizer_flags(tmp_path):
    from dejavu import LLM, ConfigError

    tpl = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (tmp_path / "t.jinja").write_text(tpl)
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for given in (tpl, str(tmp_path / "t.jinja")):
        llm = LLM(model="random:llama-tiny", device="cpu", chat_template=given, kv_cache_blocks=16)
        assert llm.tokenizer.apply_chat_template(msgs) == llm.tokenizer.encode("<developer>be brief<user>hi<assistant>")
    llm.tokenizer.tok.save_pretrained(tmp_path / "tok")
    other = LLM(model="random:llama-tiny", device="cpu", tokenizer=str(tmp_path / "tok"), kv_cache_blocks=16)
    assert other.tokenizer.encode("hello there") == llm.tokenizer.encode("hello there")
    with pytest.raises(ConfigError, match="tokenizer: .* is not a directory with tokenizer files"):
        LLM(model="random:llama-tiny", device="cpu", tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="chat_template: .* neither a file nor a Jinja template"):
        LLM(model="random:llama-tiny", device="cpu", chat_template="no-such-file.jinja")


# ---------------------------------------------------------------------- a mistake: one line, before slow work
def _one_line_error(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_taken_port_missing_cuda_or_mpirun_fail_in_one_line_first(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that does not exist: the port is checked before it would be looked for.
        line = _one_line_error(run("serve", "--model", "/no/such/model", "--port", str(port)))
        assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    hidden = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # no CUDA even on a GPU host
    r = subprocess.run([sys.executable, "-m", "dejavu", "bench", "kvstream", "--device", "cuda"], capture_output=True,
                       text=True, env=hidden, timeout=120)
    assert "--device cuda: torch sees no CUDA device" in _one_line_error(r)
    no_mpi = dict(os.environ, HF_HUB_OFFLINE="1", PATH=str(tmp_path))  # an empty PATH directory
    for cmd in (("generate", "--prompt", "x"), ("serve", "--port", "0")):
        r = subprocess.run([sys.executable, "-m", "dejavu", *cmd, "--model", "/no/such/model", "--pp", "2",
                            "--launcher", "mpirun"], capture_output=True, text=True, env=no_mpi, timeout=120)
        assert "--launcher mpirun: no mpirun on PATH" in _one_line_error(r)
