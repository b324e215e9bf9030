"""Recovery with tensor parallelism: pp x tp=2 worker processes (each TP group its own gloo world,
formed anew per epoch through the controller's store), one shard killed with SIGKILL mid-stream.
Every request's output equals the failure-free run's; the shard's TP peer survives with its KV."""
import pytest

from conftest import alive
from dejavu import LLM
from test_fault_tolerance import MODEL, PROMPTS, finish, reference, run  # noqa: F401 (reference: a fixture)


@pytest.mark.parametrize("pp,rank,at,replicate", [
    (2, 1, 10, True),    # stage 0, shard 1: resumed from the replicas (stage 1's shard 1 holds them)
    (1, 0, 16, False),   # one stage, the shard that samples, no replicas: recomputed from the prompts
])
def test_killed_tp_shard_resumes_exactly(reference, pp, rank, at, replicate):
    llm = LLM(device="cpu", model=MODEL, pp=pp, tp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60,
              replicate=replicate)
    eng = llm.engine
    assert eng.recovery.policy == "respawn"  # recovery is on by default with tp > 1
    peer = rank ^ 1  # the other shard of the same stage
    peer_pid = eng.worker_info[peer]["pid"]
    killed = []
    try:
        got, killed = run(llm, [(at, rank)])
        assert got == reference
        ft = eng.fault_tolerance()
        assert [e["workers"] for e in ft["recoveries"]] == [[f"s{rank // 2}.{rank % 2}"]], ft["recoveries"]
        ev = ft["recoveries"][0]
        if replicate:
            # Resumed from the replicas (the same TP rank of the other stage): only the steps not yet
            # acknowledged by every holder are recomputed.
            assert ev["bad_replicas"] == 0 and ev["recomputed_tokens"] <= 3 * len(PROMPTS), ev
            assert {r for r, _ in eng.replication.bytes} == {0, 1, 2, 3}
        else:
            assert ev["recomputed_tokens"] >= 20, ev  # from the prompts on
        # The TP peer kept its process (weights, KV) and formed the new group with the replacement.
        assert eng.worker_info[peer]["pid"] == peer_pid and alive(peer_pid)
        new_pid = eng.worker_info[rank]["pid"]
        assert new_pid not in killed and alive(new_pid)
    finally:
        finish(llm, killed)


# ---------------------------------------------------------------------- the group itself
SHARD = r"""
import sys, time
from types import SimpleNamespace
import torch
from torch import nn
from dejavu.models import tp
from dejavu.models.layers import Linear
from dejavu.parallel.tp_group import TPGroup

rank, port, mode, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
model = nn.Module()
model.cfg = SimpleNamespace(arch="opt")
model.fc2 = Linear(4, 2, bias=False)  # row-parallel in OPT's plan: its output is all-reduced
with torch.no_grad():
    model.fc2.weight.fill_(rank + 1)
cfg = SimpleNamespace(backend="gloo", tp_store=port, tp_groups=[[5, 6]], timeout=timeout)
group = TPGroup(model, cfg, 5 + rank, "127.0.0.1")
x = torch.ones(1, 4)
group.join(0)
print("epoch 0:", model.fc2(x).tolist(), flush=True)
if rank == 1:
    if mode == "hang":
        time.sleep(60)  # alive, never in the collective again: only the timeout frees the peer
    time.sleep(0.5)
    group.leave()   # what a shard whose step failed elsewhere does
else:
    t = time.monotonic()
    try:
        model.fc2(x)
        print("no error", flush=True)
    except tp.TPBroken as e:
        print(f"broken after {time.monotonic() - t:.1f}: {e}", flush=True)
    try:
        model.fc2(x)
    except tp.TPBroken as e:
        print(f"then refused: {e}", flush=True)
    group.leave()
    if mode == "hang":
        sys.exit(0)
group.join(1)  # the next epoch's rendezvous, on the same store
print("epoch 1:", model.fc2(x).tolist(), flush=True)
"""


@pytest.mark.parametrize("mode", ["leave", "hang"])
def test_a_peer_blocked_in_an_all_reduce_is_freed_and_the_group_reforms(mode):
    """A shard waiting in an all-reduce whose peer left the group fails at once (TPBroken, not a
    hang and not an exit); with a peer alive but silent it fails at the group's timeout. Either way
    the group forms again for the next epoch through the controller's store, and sums correctly."""
    import subprocess
    import sys

    from dejavu.parallel.tp_group import RendezvousStore

    store = RendezvousStore("127.0.0.1", 30)
    timeout = 40.0 if mode == "leave" else 4.0  # the group's: half of it (20 s, 2 s)
    procs = [subprocess.Popen([sys.executable, "-c", SHARD, str(r), str(store.port), mode, str(timeout)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        out0 = procs[0].communicate(timeout=90)[0]
        if mode == "hang":
            procs[1].kill()
        out1 = procs[1].communicate(timeout=90)[0]
    finally:
        for p in procs:
            p.kill()
        store.close()
    lines = [ln for ln in out0.splitlines() if ln.startswith(("epoch", "broken", "then", "no error"))]
    assert lines[0] == "epoch 0: [[12.0, 12.0]]", out0  # 4 x 1 + 4 x 2 on each output
    took = float(lines[1].split()[2].rstrip(":"))
    assert lines[1].startswith("broken after"), out0
    if mode == "leave":
        assert took < 10, out0  # at once, not at the 20 s timeout
        assert "epoch 1: [[12.0, 12.0]]" in out1 and lines[3] == "epoch 1: [[12.0, 12.0]]", (out0, out1)
    else:
        assert 1.5 <= took < 15, out0
    assert lines[2].startswith("then refused"), out0  # a left group refuses every later step at once


def test_serve_flags_accept_replication_with_tensor_parallelism():
    """`dejavu serve --pp 2 --tp 2 --replicate`: accepted, recovery on (respawn) by default."""
    import argparse

    from dejavu.cli.common import add_model_args, config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    c = config_from_args(p.parse_args(["--pp", "2", "--tp", "2", "--replicate"])).validate()
    assert (c.parallel.tp, c.replication.replicate) == (2, True)
    assert c.replication.resolved_recovery(c.parallel.launcher) == "respawn"
