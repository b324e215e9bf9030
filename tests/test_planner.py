"""Planner, simulator and profiler: formulas against hand-computed cases, the simulator against the
closed form in steady state, the paper's qualitative results, the CLI and its errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dejavu.planner.analytic import analytic_profile
from dejavu.planner.model import (PlanError, Profile, balanced_split, disagg_inverse_throughput, disagg_threshold,
                                  ft_inverse_throughput, min_depth)
from dejavu.planner.plan import explicit_profile, load_choice, plan
from dejavu.planner.simulator import simulate
from dejavu.planner.workload import Deployment, SimOptions


def test_closed_forms_by_hand():
    # Y = 10, t = 1, N = 20, D = 4: 10 + 20 + 3 * 9 / 4 = 36.75
    assert ft_inverse_throughput(10, 1, 20, 4) == pytest.approx(36.75)
    # disaggregated 1 + 3: max(4 * 10 / 1, 4 * 20 / 3) = 40; 2 + 2: max(20, 40) = 40; with m = 1.5, 1+3: 60
    assert disagg_inverse_throughput(10, 1, 20, 4, 1, 3) == pytest.approx(40)
    assert disagg_inverse_throughput(10, 1, 20, 4, 2, 2) == pytest.approx(40)
    assert disagg_inverse_throughput(10, 1, 20, 4, 1, 3, m=1.5) == pytest.approx(60)
    # balanced: Dp = 4 * 10 / (10 + 20) = 4/3, where both sides take mY + Nt = 30 < 36.75
    assert balanced_split(10, 1, 20, 4) == pytest.approx(4 / 3)
    # threshold (D-1)/(D(2-m)-1): m = 1 -> 1; D = 4, m = 1.5 -> 3; m close to 2 -> never
    assert disagg_threshold(4, 1.0) == pytest.approx(1.0)
    assert disagg_threshold(4, 1.5) == pytest.approx(3.0)
    assert math.isinf(disagg_threshold(4, 1.8))
    with pytest.raises(PlanError, match="Dp, Dt >= 1"):
        disagg_inverse_throughput(10, 1, 20, 4, 0, 4)


def test_threshold_is_where_the_balanced_split_breaks_even():
    D, m, t, N = 4, 1.3, 1.0, 16
    thr = disagg_threshold(D, m)
    for ratio, wins in ((thr * 0.9, False), (thr * 1.1, True)):
        Y = ratio * t
        balanced = m * Y + N * t  # both pipelines equally loaded
        assert (balanced < ft_inverse_throughput(Y, t, N, D)) == wins


def test_min_depth_by_hand_and_infeasible():
    gib = 2**30
    # 100 GiB of weights, KV 1 MiB/token, microbatch 8 x 1024 tokens = 8 GiB per stage; 40 GiB devices:
    # 100 / (40 - 8) = 3.125 -> 4 stages
    assert min_depth(100 * gib, 2**20, 8, 1024, 40 * gib) == 4
    with pytest.raises(PlanError, match="lower the microbatch"):
        min_depth(100 * gib, 2**20, 64, 1024, 40 * gib)
    prof = explicit_profile(0.1, 0.01, 32, 100 * gib, 2**20, 2)
    with pytest.raises(PlanError, match="infeasible: .* at least 4 machines"):
        plan(prof, 2, 8, 512, 512, memory=40 * gib, simulate_candidates=False)


@pytest.mark.parametrize("D", [1, 2, 4])
def test_simulated_ft_pipeline_matches_the_closed_form(D):
    Y, t, N, b = 0.1, 0.01, 32, 8
    prof = explicit_profile(Y, t, 32, 10**9, 1000, D)
    r, _ = simulate(prof, Deployment("ft", stages=D), [(100, N)] * (D * b * 20), opts=SimOptions(microbatch=b))
    expect = b * N / ft_inverse_throughput(Y, t, N, D)
    assert r["tokens_per_s"] == pytest.approx(expect, rel=0.05)


def test_stage_link_delays_each_boundary_by_the_hidden_states_it_carries():
    """A measured stage link: a prefill's hidden states (prompt tokens x hidden bytes) cross each of
    the D-1 boundaries before the next stage starts, one step at a time per boundary. One request
    through ft:2 finishes later by exactly one prefill hop and one hop per decode step; without a
    link (0, old profiles) nothing changes; disaggregation with one prompt and one token stage
    has no boundary to cross."""
    prof = explicit_profile(0.1, 0.01, 32, 10**9, 1000, 2)
    base = {d: simulate(prof, Deployment.parse(d), [(1000, 5)], opts=SimOptions(microbatch=1))[0]
            for d in ("ft:2", "disagg:1+1")}
    prof.hidden_bytes_per_token, prof.stage_link_bytes_per_s = 4096, 4096 * 1000 * 10  # a 1000-token prompt: 0.1 s
    slow = {d: simulate(prof, Deployment.parse(d), [(1000, 5)], opts=SimOptions(microbatch=1))[0]
            for d in ("ft:2", "disagg:1+1")}
    hop_prefill, hop_decode = 0.1, 1 / 10000
    assert slow["ft:2"]["makespan_s"] == pytest.approx(base["ft:2"]["makespan_s"] + hop_prefill + 4 * hop_decode)
    assert slow["disagg:1+1"]["makespan_s"] == pytest.approx(base["disagg:1+1"]["makespan_s"])


def test_controller_overhead_shares_the_cores_of_a_cpu_deployment():
    """On a CPU deployment the controller's per-step time comes out of the workers' cores (an equal
    share per stage): a step of the FT pipeline costs its compute plus the overhead, on every stage
    in turn. An unbalanced pipeline shows the difference from a GPU deployment, where the overhead
    only delays the launch and the slack of the faster stage absorbs it."""
    import dataclasses

    Y, t, N, b, D, o = 0.1, 0.01, 32, 8, 2, 0.006
    base = dataclasses.replace(explicit_profile(Y, t, 32, 10**9, 1000, D), step_overhead_s=o)
    reqs = [(100, N)] * (D * b * 20)
    cpu, _ = simulate(dataclasses.replace(base, device="cpu"), Deployment("ft", stages=D), reqs,
                      opts=SimOptions(microbatch=b))
    free, _ = simulate(dataclasses.replace(base, device="cpu", step_overhead_s=0.0), Deployment("ft", stages=D), reqs,
                       opts=SimOptions(microbatch=b))
    # each stage's 10 ms decode step carries 3 ms of the controller: about 13/10 the time per token
    assert free["tokens_per_s"] / cpu["tokens_per_s"] == pytest.approx(1.2, abs=0.1)
    lopsided = dataclasses.replace(base, token_last=dataclasses.replace(base.token_one, a=base.token_one.a + 0.02))
    gpu, _ = simulate(dataclasses.replace(lopsided, device="cuda"), Deployment("ft", stages=D), reqs,
                      opts=SimOptions(microbatch=b))
    cpu, _ = simulate(dataclasses.replace(lopsided, device="cpu"), Deployment("ft", stages=D), reqs,
                      opts=SimOptions(microbatch=b))
    assert cpu["tokens_per_s"] < 0.95 * gpu["tokens_per_s"]


@pytest.mark.parametrize("dp,dt", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_simulated_disaggregation_matches_the_closed_form(dp, dt):
    D = dp + dt
    Y, t, N, b = 0.1, 0.01, 32, 8
    prof = explicit_profile(Y, t, 32, 10**9, 1000, D)
    r, _ = simulate(prof, Deployment("disagg", prompt_stages=dp, token_stages=dt), [(100, N)] * (D * b * 20),
                    opts=SimOptions(microbatch=b, receive_slots=10_000))
    expect = b * N / disagg_inverse_throughput(Y, t, N, D, dp, dt)
    assert r["tokens_per_s"] == pytest.approx(expect, rel=0.05)


def test_paper_appendix_b_qualitative_results():
    """Roofline profiles of the paper's setups: disaggregation pays for prompt-heavy work on a deep
    enough pipeline and not for generation-heavy work; a small-memory GPU needs a deep pipeline."""
    bloom = analytic_profile("random:bloom-176b", "a100-80gb", gpus_per_machine=4)
    prompt_heavy = plan(bloom, 8, 8, 1000, 50)
    assert prompt_heavy["disaggregation_wins"] and prompt_heavy["choice"].startswith("disagg:")
    best = max(prompt_heavy["candidates"], key=lambda c: c["simulated_tokens_per_s"])
    ft = prompt_heavy["candidates"][0]
    assert best["simulated_tokens_per_s"] > 1.05 * ft["simulated_tokens_per_s"]
    opt66 = analytic_profile("random:opt-66b", "a100-80gb", gpus_per_machine=4)
    gen_heavy = plan(opt66, 4, 8, 100, 1000)
    assert gen_heavy["choice"] == "ft:4"
    # OPT-30B in fp16 is ~56 GiB: on V100-16GB stages it needs a pipeline of at least 4
    opt30 = analytic_profile("random:opt-30b", "v100-16gb")
    assert plan(opt30, 8, 2, 500, 100, simulate_candidates=False)["min_depth"]["ft"] >= 4
    with pytest.raises(PlanError, match="infeasible"):
        plan(opt30, 2, 2, 500, 100)


def test_failure_with_replicas_beats_restart_from_scratch():
    prof = explicit_profile(0.05, 0.01, 32, 10**9, 1000, 2)
    lengths = [(64, 64)] * 16
    base, _ = simulate(prof, Deployment.parse("ft:2"), lengths, opts=SimOptions(microbatch=8))
    kw = dict(microbatch=8, fail_at=base["makespan_s"] * 0.6, fail_stage=("stage", 1), detect_s=0.5, restart_s=0.5)
    rep, _ = simulate(prof, Deployment.parse("ft:2"), lengths, opts=SimOptions(replicate=True, **kw))
    scratch, _ = simulate(prof, Deployment.parse("ft:2"), lengths, opts=SimOptions(replicate=False, **kw))
    assert rep["recomputed_tokens"] == 0 and scratch["recomputed_tokens"] > 0
    assert base["makespan_s"] < rep["makespan_s"] < scratch["makespan_s"]
    assert rep["latency_s"]["p99"] < scratch["latency_s"]["p99"]


def test_swapping_counts_pcie_bound_steps():
    prof = explicit_profile(0.05, 0.001, 32, 10**9, 10**6, 2)
    prof.pcie_bytes_per_s = 1e9  # 1 GB/s: a microbatch's KV (8 x ~100 tokens x 1 MB) takes far longer than t
    r, _ = simulate(prof, Deployment.parse("ft:2"), [(64, 16)] * 16, opts=SimOptions(microbatch=8, swap=True))
    assert r["pcie_bound_steps"] > 0 and r["pcie_s"] > 0
    fast, _ = simulate(prof, Deployment.parse("ft:2"), [(64, 16)] * 16, opts=SimOptions(microbatch=8))
    assert r["makespan_s"] > fast["makespan_s"]


def test_bad_inputs_are_named():
    with pytest.raises(PlanError, match="ft:D"):
        Deployment.parse("pipeline:4")
    with pytest.raises(PlanError, match="each >= 1"):
        Deployment.parse("disagg:0+2")
    prof = explicit_profile(0.1, 0.01, 4, 10**9, 1000, 2)
    with pytest.raises(PlanError, match="a stage would be empty"):
        simulate(prof, Deployment.parse("ft:8"), [(8, 8)])
    with pytest.raises(PlanError, match="lengths must be > 0"):
        simulate(prof, Deployment.parse("ft:2"), [(0, 8)])
    with pytest.raises(PlanError, match=r"m \(prompt-side"):
        plan(prof, 2, 4, 8, 8, m=2.5)
    with pytest.raises(PlanError, match="not a DéjàVu profile"):
        Profile.from_json({"model": "x"})


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dejavu", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_profile_simulate_plan_serve_plan(tmp_path):
    """A real (tiny) profile on this CPU, then the simulator with trace, chrome trace and plot, then the
    planner's JSON, which `dejavu serve --plan` accepts."""
    prof_path = tmp_path / "p.json"
    r = _cli("profile", "--model", "random:opt-tiny", "--batches", "1,2", "--prompt-lens", "8,16", "--contexts",
             "8,16", "--repeat", "1", "--no-overhead", "--json", str(prof_path))
    assert r.returncode == 0, r.stderr
    prof = Profile.load(str(prof_path))
    assert prof.num_layers == 2 and prof.kv_bytes_per_token == 2 * 2 * 64 * 4 and prof.weight_bytes > 0
    assert prof.prompt_time(1, 2, 16) > 0 and prof.token_time(2, 2, 16) > 0
    assert prof.hidden_bytes_per_token == 64 * 4 and prof.stage_link_bytes_per_s > 0  # measured through StagePipes
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([[12, 6], [5, 9], [16, 3]]))
    out = tmp_path / "sim.json"
    chrome = tmp_path / "trace.chrome.json"
    png = tmp_path / "cmp.png"
    r = _cli("simulate", "--profile", str(prof_path), "--trace", str(trace), "--deploy", "ft:2", "--deploy",
             "disagg:1+1", "--json", str(out), "--chrome-trace", str(chrome), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"]
    assert [x["deployment"] for x in res] == ["ft:2", "disagg:1+1"]
    assert all(x["output_tokens"] == 18 and x["tokens_per_s"] > 0 for x in res)
    events = json.loads(chrome.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {"prompt", "token"} and all(e["dur"] >= 0 for e in events)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan_path = tmp_path / "plan.json"
    r = _cli("plan", "--profile", str(prof_path), "--machines", "2", "--microbatch", "2", "--prompt-len", "16",
             "--output-len", "8", "--json", str(plan_path))
    assert r.returncode == 0, r.stderr
    assert "<- chosen" in r.stdout
    choice = load_choice(str(plan_path))
    assert choice["microbatch_size"] == 2 and (choice.get("pp") == 2 or choice.get("prompt_stages") == 1)
    r = _cli("serve", "--model", "random:opt-tiny", "--plan", str(plan_path), "--pp", "2", timeout=60)
    assert r.returncode == 2 and "--plan chooses the deployment" in r.stderr


def test_profile_overhead_through_the_http_server(tmp_path):
    """--overhead-via http: the per-step overhead measured with a real server and `dejavu bench serve`."""
    prof_path = tmp_path / "p.json"
    r = _cli("profile", "--model", "random:opt-tiny", "--batches", "1,2", "--prompt-lens", "8,16", "--contexts",
             "8,16", "--repeat", "1", "--overhead-via", "http", "--json", str(prof_path))
    assert r.returncode == 0, r.stderr
    prof = Profile.load(str(prof_path))
    # Real steps were timed through the server; the overhead is their time beyond the stages'
    # profiled compute (clamped at 0: on a loaded machine the difference can be noise).
    got = prof.samples["overhead"]
    assert got["via"] == "http" and got["step_s"] > 0 and got["stages_s"] > 0
    assert prof.step_overhead_s == max(0.0, got["step_s"] - got["stages_s"])


def test_cli_errors(tmp_path):
    r = _cli("plan", "--machines", "4")
    assert r.returncode == 2 and "need --profile FILE, or --Y and --t" in r.stderr
    r = _cli("plan", "--machines", "4", "--Y", "0.1", "--t", "0.01", "--weights-gib", "500", "--kv-kib-per-token", "800",
             "--memory-gib", "80")
    assert r.returncode == 2 and "infeasible" in r.stderr
    r = _cli("plan", "--machines", "4", "--Y", "0.1", "--t", "0.01", "--layers", "32", "--no-simulate")
    assert r.returncode == 0 and "disagg:2+2" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    r = _cli("simulate", "--profile", str(bad), "--lengths", "8,8", "--deploy", "ft:1")
    assert r.returncode == 2 and "is not JSON" in r.stderr
    r = _cli("serve", "--model", "random:opt-tiny", "--plan", str(bad))
    assert r.returncode == 2 and "not a plan written by" in r.stderr
