"""`dejavu bench serve --chaos`: random SIGKILLs and SIGSTOPs of a replicated pp=2 deployment's
workers under load, kills inside swap-ins of a swapping one, and SIGKILLs and SIGSTOPs of a split
`dejavu serve`'s controller (short seeded runs); every request completes with the failure-free output."""
import json

import pytest

from conftest import alive
from dejavu import LLM
from dejavu.cli import main
from dejavu.serving.api import ApiServer
from test_controller_failover import serving

MODEL = "random:llama-tiny"


def _chaos(tmp_path, llm, trace, *argv):
    """`bench serve --chaos 6` against `llm` behind the HTTP server; (exit code, its JSON report),
    checked for what every chaos run must show: faults, recoveries, nothing lost, all exact."""
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    (tmp_path / "t.json").write_text(json.dumps(trace))
    out = tmp_path / "c.json"
    try:
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--trace", str(tmp_path / "t.json"),
                   "--chaos", "6", "--chaos-interval", "2", "--json", str(out), "--disable-tqdm", *argv])
    finally:
        srv.stop()
    r = json.loads(out.read_text())
    assert r["faults"] and r["recoveries"] >= 1, r
    assert r["lost"] == 0 and r["completed"] == r["requests"] >= 6, r["errors"]
    assert r["exact"] == r["completed"]
    assert not r["never_replaced"] and not any(alive(f["pid"]) for f in r["faults"])
    assert rc == 0
    return r


def test_chaos_loses_nothing_and_stays_exact(tmp_path):
    llm = LLM(device="cpu", model=MODEL, pp=2, replicate=True, block_size=4, kv_cache_blocks=256, worker_timeout=60)
    # seed 3: the first fault comes 0.54 s into the chaos pass, inside the first pass
    _chaos(tmp_path, llm, [[16, 48]] * 6, "--seed", "3")


def test_kills_inside_swap_ins_of_a_swapping_replicated_deployment(tmp_path):
    """--swap --replicate (2 microbatches over 1 resident region: every step swaps one in) under
    `swapin` faults: kills aimed inside the workers' swap-in copies. Nothing is lost, all exact."""
    llm = LLM(device="cpu", model=MODEL, pp=2, replicate=True, swap=True, resident_microbatches=1,
              microbatch_size=3, block_size=4, kv_cache_blocks=64, worker_timeout=60)
    r = _chaos(tmp_path, llm, [[16, 40]] * 6, "--chaos-faults", "swapin", "--seed", "5")
    assert all(f["kind"] == "swapin" for f in r["faults"]), r["faults"]
    assert any(f["in_copy"] for f in r["faults"]), r["faults"]  # at least one landed inside a copy


def test_chaos_strikes_the_controller_of_a_split_deployment(tmp_path):
    """`dejavu serve --pp 2` (front-end and controller processes) under `controller` and
    `controller-stop` faults: each struck controller is replaced by the standby, which adopts the
    workers; nothing is lost and every output is exact."""
    (tmp_path / "t.json").write_text(json.dumps([[16, 48]] * 6))
    out = tmp_path / "c.json"
    with serving(tmp_path, "--pp", "2", "--controller-timeout", "1.5") as port:
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--trace", str(tmp_path / "t.json"),
                   "--chaos", "6", "--chaos-interval", "2", "--chaos-faults", "controller,controller-stop",
                   "--seed", "3", "--json", str(out), "--disable-tqdm"])
    r = json.loads(out.read_text())
    assert r["faults"] and all(f["kind"] in ("controller", "controller-stop") for f in r["faults"]), r["faults"]
    assert r["controller_takeovers"] >= len(r["faults"]) and not r["controllers_not_replaced"], r
    assert r["lost"] == 0 and r["completed"] == r["requests"] >= 6, r["errors"]
    assert r["exact"] == r["completed"]
    assert not r["never_replaced"] and not any(alive(f["pid"]) for f in r["faults"])
    assert rc == 0


def test_controller_faults_need_a_split_deployment(capsys):
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=64)
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    try:
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--num-requests", "2",
                   "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm",
                   "--chaos", "5", "--chaos-faults", "controller"])
    finally:
        srv.stop()
    assert rc == 2 and "need a split deployment" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--chaos", "0"], "--chaos must be > 0 seconds"),
    (["--chaos", "5", "--chaos-faults", "kill,reboot"], "--chaos-faults takes"),
    (["--chaos", "5", "--chaos-faults", ""], "--chaos-faults takes"),
    (["--chaos", "5", "--chaos-interval", "-1"], "--chaos-interval must be > 0"),
])
def test_chaos_bad_flags_are_named(argv, message, capsys):
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=64)
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    try:
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--num-requests", "2",
                   "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm", *argv])
    finally:
        srv.stop()
    assert rc == 2 and message in capsys.readouterr().err
