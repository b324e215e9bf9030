"""`dejavu bench serve --chaos`: random SIGKILLs and SIGSTOPs of a replicated pp=2 deployment's
workers under load (a short seeded run); every request completes with the failure-free output."""
import json

import pytest

from conftest import alive
from dejavu import LLM
from dejavu.cli import main
from dejavu.serving.api import ApiServer

MODEL = "random:llama-tiny"


def test_chaos_loses_nothing_and_stays_exact(tmp_path):
    llm = LLM(device="cpu", model=MODEL, pp=2, replicate=True, block_size=4, kv_cache_blocks=256, worker_timeout=60)
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([[16, 48]] * 6))
    out = tmp_path / "c.json"
    try:
        # seed 3: the first fault comes 0.54 s into the chaos pass, inside the first pass
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--trace", str(trace), "--chaos", "6",
                   "--chaos-interval", "2", "--seed", "3", "--json", str(out), "--disable-tqdm"])
    finally:
        srv.stop()
    r = json.loads(out.read_text())
    assert r["faults"] and r["recoveries"] >= 1, r
    assert r["lost"] == 0 and r["completed"] == r["requests"] >= 6, r["errors"]
    assert r["exact"] == r["completed"]
    assert not r["never_replaced"] and not any(alive(f["pid"]) for f in r["faults"])
    assert rc == 0


@pytest.mark.parametrize("argv, message", [
    (["--chaos", "0"], "--chaos must be > 0 seconds"),
    (["--chaos", "5", "--chaos-faults", "kill,reboot"], "--chaos-faults takes"),
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
