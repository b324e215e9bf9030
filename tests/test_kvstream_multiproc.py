"""DéjàVuLib across real processes: TCP host-to-host, MPI ranks (mpirun -n 2), a gloo process group."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from dejavu.kvstream import KVStreamer, TcpDest, TcpReplicaServer
from dejavu.kvstream.transports import new_cluster_token
from kv_helpers import empty_like, filled_cache, region_values

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from kv_peer import REGION, TOKENS  # noqa: E402


def test_tcp_between_processes():
    token = new_cluster_token()
    server = TcpReplicaServer(token)
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "kv_peer.py"), "tcp-push", "127.0.0.1",
                            str(server.port)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, DEJAVU_CLUSTER_TOKEN=token))
        assert r.returncode == 0, r.stderr
        assert set(server.keys()) == {"peer.chunks", "peer.tokens"}
        src = filled_cache(seed=42, dtype=torch.float16)
        dst = empty_like(src)
        s = KVStreamer(dst)
        dest = TcpDest("127.0.0.1", server.port, token)
        s.stream_in(dest, "peer.chunks", REGION).wait(30)
        s.stream_in(dest, "peer.tokens", TOKENS).wait(30)
        for region in (REGION, TOKENS):
            assert torch.equal(region_values(dst, region), region_values(src, region))
    finally:
        server.stop()


def _mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        return None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return exe


@pytest.mark.skipif(_mpirun() is None, reason="mpirun / mpi4py not installed")
def test_mpi_two_ranks():
    cmd = [_mpirun(), "-n", "2"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["--oversubscribe", sys.executable, os.path.join(HERE, "kv_peer.py"), "mpi"]
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mpi round trip OK" in r.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank, port, result):
    import torch.distributed as dist

    from dejavu.kvstream.dist import ProcessGroupDest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        src = filled_cache(seed=5)
        if rank == 0:
            KVStreamer(src).stream_out(REGION, ProcessGroupDest(1), "g").wait(60)
        else:
            dst = empty_like(src)
            KVStreamer(dst).stream_in(ProcessGroupDest(0), "g", REGION).wait(60)
            result.put(bool(torch.equal(region_values(dst, REGION), region_values(src, REGION))))
    finally:
        dist.destroy_process_group()


def test_gloo_process_group():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert q.get(timeout=5) is True


def test_bench_kvpeer_between_cpu_processes(tmp_path):
    """`dejavu bench kvpeer` on CPU (gloo): it checks the received region itself before timing."""
    import json

    r = subprocess.run([sys.executable, "-m", "dejavu", "bench", "kvpeer", "--device", "cpu", "--layers", "2",
                        "--kv-heads", "2", "--head-dim", "16", "--block-sizes", "4,1", "--total-mib", "2",
                        "--repeat", "2", "--json", str(tmp_path / "p.json")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [x["block_tokens"] for x in rows] == [4, 1]
    assert all(x["bytes"] > 0 and x["dejavulib_GBps"] > 0 and x["raw_GBps"] > 0 for x in rows)


def test_bench_kvpeer_refuses_one_gpu():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this host has two GPUs")
    r = subprocess.run([sys.executable, "-m", "dejavu", "bench", "kvpeer", "--device", "cuda"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "needs two GPUs" in r.stderr


def test_trace_overlap_counts_nccl_time_under_other_kernels(tmp_path):
    """benchmarks/trace_overlap.py (reads `bench kvpeer --trace-dir` traces): busy and overlapping
    time from a hand-made trace. NCCL kernels [0, 10) and [20, 30) us; copies [5, 8), [7, 12) and
    [40, 41): copies are busy 8 us, of which 5 under NCCL (5-10)."""
    import json

    ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d, "args": {"stream": s}}
          for n, t, d, s in [("ncclDevKernel_SendRecv", 0, 10, 7), ("ncclDevKernel_SendRecv", 20, 10, 7),
                             ("copy_spans_kernel", 5, 3, 3), ("copy_spans_kernel", 7, 5, 3),
                             ("copy_spans_kernel", 40, 1, 3)]]
    ev.append({"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0, "dur": 100})
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": ev}))
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "trace_overlap.py")
    r = subprocess.run([sys.executable, script, str(tmp_path), "--rows", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "span 41 us, NCCL busy 20 us, other kernels busy 8 us, overlap 5 us, 5 kernels" in r.stdout
    assert r.stdout.count("\n") == 3  # the summary and two kernel rows
