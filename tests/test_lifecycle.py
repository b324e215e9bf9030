"""Stopping is not failure: real `dejavu serve` process groups stopped by SIGTERM / SIGINT or killed
with SIGKILL, dead workers reaped, /dev/shm segments that do not outlive their deployment, and
replacements that die during a recovery retried."""
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import alive, proc_stats
from dejavu import LLM
from dejavu.kvstream.shm import SHM_DIR, ShmDest, cleanup_orphans, owner_prefix, retire
from dejavu.cluster import recovery
from dejavu.cluster.errors import WorkerError
from test_fault_tolerance import MODEL, PARAMS, PROMPTS, reference, run  # noqa: F401 - a fixture

SERVE = [sys.executable, "-m", "dejavu", "serve", "--model", MODEL, "--block-size", "4", "--kv-cache-blocks", "256"]


def _post(port, body, timeout=60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as f:
        return f.status, f.read().decode()


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return [pid for pid, f in proc_stats() if int(f[2]) == pgid and f[0] != "Z"]


def _zombie_children() -> list[int]:
    me = os.getpid()
    return [pid for pid, f in proc_stats() if int(f[1]) == me and f[0] == "Z"]


def _start_serve(args, log_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen(SERVE + args + ["--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, open(log_path).read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    assert _post(port, {"prompt": [5, 6, 7], "max_tokens": 4})[0] == 200
    return proc, port


def _streams(port, n):
    """n long streaming requests in flight; returns the threads and their outcomes."""
    outcomes = []

    def one(i):
        try:
            outcomes.append(_post(port, {"prompt": [9 + i] * (3 + i), "max_tokens": 400, "ignore_eos": True,
                                         "stream": True}, timeout=30))
        except (OSError, http.client.HTTPException) as e:
            outcomes.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, outcomes


@pytest.mark.parametrize("args,sig", [(["--pp", "2"], signal.SIGTERM),
                                      (["--prompt-stages", "1", "--token-stages", "1"], signal.SIGINT)],
                         ids=["pp2-sigterm", "disagg-sigint"])
def test_group_signal_stops_everything_quietly(tmp_path, args, sig):
    proc, port = _start_serve(args, tmp_path / "serve.log")
    try:
        threads, outcomes = _streams(port, 3)
        time.sleep(1.0)  # decoding
        members = _group(proc.pid)
        assert len(members) >= 4, members  # the server, two workers, the warm spare
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        proc.wait(20)
        while _group(proc.pid) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        took = time.monotonic() - t0
        assert not _group(proc.pid), "a process of the group outlived the stop"
        assert took < 10, took
        for t in threads:
            t.join(20)
        # in-flight requests end (aborted, or the server's shutdown error event), none hangs until the stop
        assert len(outcomes) == 3 and all(isinstance(o, tuple) and ('"abort"' in o[1] or "the server is shutting down" in o[1])
                                         for o in outcomes), outcomes
        log = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log and "ERROR" not in log and "recovering" not in log, log
        assert not glob.glob(os.path.join(SHM_DIR, f"dejavu-{proc.pid}-*"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_killed_server_leaves_no_shared_memory(tmp_path):
    proc, port = _start_serve(["--prompt-stages", "1", "--token-stages", "1"], tmp_path / "serve.log")
    try:
        threads, _ = _streams(port, 4)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while _group(proc.pid) and time.monotonic() < deadline:  # the workers notice and exit
            time.sleep(0.1)
        assert not _group(proc.pid)
        assert not glob.glob(os.path.join(SHM_DIR, f"dejavu-{proc.pid}-*"))
        for t in threads:
            t.join(30)
    finally:
        if _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_orphaned_segments_are_removed_and_retired_prefixes_refuse_new_ones():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    buf = torch.arange(64, dtype=torch.uint8)
    gone, mine = ShmDest(owner_prefix("ab12", dead.pid)), ShmDest(owner_prefix("cd34"))
    try:
        gone.put("k", buf).wait(10)
        mine.put("k", buf).wait(10)
        assert gone.size("k") == 64 and mine.size("k") == 64
        assert cleanup_orphans() >= 1
        assert gone.size("k") == -1 and mine.size("k") == 64  # only the dead owner's segment
        assert retire(mine.prefix) == 1 and mine.size("k") == -1
        with pytest.raises(Exception, match="deployment is gone"):
            mine.put("k2", buf).wait(10)
        assert mine.size("k2") == -1
    finally:
        retire(gone.prefix)
        retire(mine.prefix)


def _kill_replacements(eng, rank, n, killed, stop):
    """Kill the next n replacement processes started for `rank` while a recovery waits for them."""
    while len(killed) < n and not stop.is_set():
        p = eng.launcher.proc_of.get(rank)
        if rank in eng._needed and p is not None and p.pid not in killed:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        time.sleep(0.002)


def test_replacement_killed_during_recovery_is_retried(reference):  # noqa: F811
    llm = LLM(model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True)
    eng, stop, repl = llm.engine, threading.Event(), []
    watcher = threading.Thread(target=_kill_replacements, args=(eng, 1, 2, repl, stop))
    watcher.start()
    procs, killed = [], []
    try:
        got, killed = run(llm, [(8, 1)])
        assert got == reference
        assert len(repl) == 2  # the warm spare and the first new process were killed while starting
        ft = eng.fault_tolerance()
        assert any("while starting" in e["reason"] for e in ft["recoveries"]), ft["recoveries"]
        assert alive(eng.worker_info[1]["pid"])
        procs = list(eng.procs)
        time.sleep(0.2)
        # every dead worker was reaped as its failure was handled: no zombies, no /proc entry
        assert not _zombie_children()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in killed + repl)
    finally:
        stop.set()
        watcher.join()
        llm.shutdown()
    assert not any(alive(p.pid) for p in procs)


def test_replacements_exhausted_fail_clearly(monkeypatch):
    monkeypatch.setattr(recovery, "REPLACE_ATTEMPTS", 1)
    llm = LLM(model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True)
    eng, stop, repl = llm.engine, threading.Event(), []
    watcher = threading.Thread(target=_kill_replacements, args=(eng, 0, 1, repl, stop))
    watcher.start()
    try:
        with pytest.raises(WorkerError, match=r"s0\.0 \(rank 0\) could not be replaced"):
            run(llm, [(4, 0)])
        assert len(repl) == 1
    finally:
        stop.set()
        watcher.join()
        procs = list(eng.procs)
        llm.shutdown()
    assert not any(alive(p.pid) for p in procs)
    assert not _zombie_children()
