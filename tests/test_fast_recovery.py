"""Fast recovery: standbys hold stage weights ready (models/preload.py, cluster/standby.py), and a
replacement on the holder's host fetches its KV through shared memory (kvstream/replica_local.py)."""
import glob
import os
import time

import pytest
import torch

from dejavu import LLM
from dejavu.cluster.messages import Preload, PreloadStage
from dejavu.kvstream.mirror import ReplicaError
from dejavu.kvstream.replica import ReplicaClient, ReplicaServer, block_checksums
from dejavu.kvstream.replica_local import RestoreSegment, to_cache
from dejavu.kvstream.shm import SHM_DIR
from dejavu.models.loader import load_model, resolve
from dejavu.models.preload import Held, Preloader, copy_in
from test_fault_tolerance import MODEL, finish, run, reference  # noqa: F401 (the fixture)

TOKEN = "t" * 32


def _preload(where: str, model: str, layers, kv_bytes: int = 0) -> Preload:
    return Preload(model=model, dtype="float32", device="cpu", seed=3, tp=1, where=where,
                   stages=[PreloadStage(rank=i, layers=list(r), tp_rank=0, local_rank=0, kv_bytes=kv_bytes)
                           for i, r in enumerate(layers)])


@pytest.mark.parametrize("where", ["host", "device"])
def test_preloaded_stage_equals_a_checkpoint_load(where):
    pre = Preloader()
    pre.start(_preload(where, MODEL, [(0, 2), (2, 4)]), TOKEN)  # taken at once: the first is skipped or finished
    cpu = torch.device("cpu")
    got, frm = pre.take(MODEL, cpu, torch.float32, 3, (2, 4), 0, 1)
    assert frm == where and got is not None
    want = load_model(resolve(MODEL), cpu, torch.float32, seed=3, layer_range=(2, 4))
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # What a GPU takeover does with a pinned host copy: a fresh model filled by one copy per tensor
    # (here from plain host tensors), its fused projections still aliasing their matrix.
    held = Held("host", want.cfg, None, {k: v.detach().clone() for k, v in want.named_parameters()})
    copied = copy_in(held, cpu, torch.float32, (2, 4), (0, 1))
    c = copied.state_dict()
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)
    fused = [v for m in copied.modules() for v in vars(m).values() if type(v).__name__ == "FusedLinears"]
    assert fused and all(f.fused for f in fused)
    # what was not taken is dropped; another seed or stage is not held
    assert pre.take(MODEL, cpu, torch.float32, 3, (0, 2), 0, 1) == (None, None)


def test_preload_is_bounded_by_memory():
    pre = Preloader()
    pre.start(_preload("host", "random:bloom-176b", [(0, 70)]), TOKEN)  # 350 GB: above half of any CI host's memory
    assert pre.take("random:bloom-176b", torch.device("cpu"), torch.float32, 3, (0, 70), 0, 1) == (None, None)


def test_standby_keeps_a_restore_segment_ready():
    pre = Preloader()
    pre.start(_preload("host", MODEL, [(0, 2)], kv_bytes=1 << 20), TOKEN)
    pre.thread.join()
    seg = pre.segment
    assert seg is not None and os.path.getsize(seg.path) == 1 << 20
    assert pre.take_segment(4096) is seg and seg.data.numel() == 4096  # a restore fills its first bytes
    seg.close()
    assert not os.path.exists(seg.path)
    pre = Preloader()
    pre.start(_preload("host", MODEL, [(0, 2)], kv_bytes=1 << 20), TOKEN)
    pre.thread.join()
    path = pre.segment.path
    assert pre.take_segment(2 << 20) is None and not os.path.exists(path)  # too small: dropped, made anew


def test_standby_pinned_memory_serves_a_ring_that_fits():
    pre = Preloader()
    pre.pinned = torch.empty(4096, dtype=torch.uint8)  # what _make_pinned allocates (pinned where CUDA is)
    t = pre.take_pinned((2, 8, 2, 4, 4), torch.float16)  # 1 KiB
    assert t.shape == (2, 8, 2, 4, 4) and t.dtype == torch.float16 and pre.pinned is None
    pre.pinned = torch.empty(1024, dtype=torch.uint8)
    assert pre.take_pinned((2, 8, 2, 4, 8), torch.float16) is None and pre.pinned is None  # too small: dropped
    assert pre.take_pinned((1,), torch.float16) is None  # nothing held


def test_ring_budget_is_an_eighth_of_the_cache_at_most_the_cap(monkeypatch):
    from dejavu.serving.replication import ring_budget

    assert ring_budget(8 << 20) == 1 << 20
    assert ring_budget(64 << 30) == 512 << 20
    monkeypatch.setenv("DEJAVU_REPLICA_RING_MIB", "1")
    assert ring_budget(64 << 30) == 1 << 20
    monkeypatch.setenv("DEJAVU_REPLICA_RING", "0")
    assert ring_budget(64 << 30) == 0


def test_a_replacement_waits_for_device_memory_a_dying_worker_frees(monkeypatch):
    from dejavu.models import preload

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls = []

    def alloc():
        calls.append(1)
        if len(calls) < 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "model"
    assert preload.while_memory_frees(alloc, torch.device("cuda")) == "model" and len(calls) == 3

    def never():
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not forever
        preload.while_memory_frees(never, torch.device("cuda"), wait_s=0.2)
    assert len(calls) > 1
    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a CPU worker has no one to wait for
        preload.while_memory_frees(never, torch.device("cpu"))
    assert len(calls) == 1


def _mirror_with(srv, shape):
    cache = torch.randn(shape)
    cli = ReplicaClient("127.0.0.1", srv.port, TOKEN)
    cli.open("s1.0", shape, torch.float32)
    cli.put_blocks("s1.0", list(range(shape[1])), cache.contiguous().view(torch.uint8).reshape(-1))
    return cli, cache


@pytest.mark.parametrize("family", ["llama-tiny", "opt-tiny", "gpt2-tiny", "bloom-tiny"])
def test_warm_up_runs_a_one_layer_model_of_each_family(family):
    from dejavu.cluster.warmup import warm_up
    from dejavu.models.registry import named_config

    tokens = warm_up(named_config(family), torch.device("cpu"), torch.float32)
    assert tokens.shape == (8,) and tokens.dtype == torch.int64  # the last decode step's greedy tokens
    # a TP shard warms up on its shard's shapes
    assert warm_up(named_config(family), torch.device("cpu"), torch.float32, tp=(1, 2)).shape == (8,)


def test_warm_up_runs_a_layer_of_each_kind_where_windowed_and_full_layers_mix(monkeypatch):
    import dataclasses

    from dejavu.cluster import warmup
    from dejavu.models import loader
    from dejavu.models.registry import named_config

    cfg = named_config("llama-tiny")
    cfg = dataclasses.replace(cfg, sliding_window=8, window_layers=[i % 2 == 0 for i in range(cfg.num_layers)])
    built = []
    real = loader.skeleton
    monkeypatch.setattr(loader, "skeleton", lambda c, *a: built.append(c) or real(c, *a))
    assert warmup.warm_up(cfg, torch.device("cpu"), torch.float32).shape == (8,)
    assert built[0].num_layers == 2 and built[0].window_layers == [False, True]


def test_a_standby_warms_up_on_the_first_stage_it_loaded():
    pre, seen = Preloader(), []
    pre.warm_up = lambda cfg, dev, dtype, tp: seen.append((cfg.num_layers, dev, dtype, tp))
    pre.start(_preload("host", MODEL, [(0, 2), (2, 4)], kv_bytes=1 << 20), TOKEN)
    pre.thread.join()
    assert seen == [(4, torch.device("cpu"), torch.float32, (0, 1))] and pre.segment is not None  # after the segment
    pre.segment.close()


def test_local_fetch_restores_the_same_bytes_as_tcp():
    shape = (3, 6, 2, 4, 2, 8)  # layers, blocks, K/V, block size, heads, head dim
    srv = ReplicaServer(TOKEN)
    try:
        cli, cache = _mirror_with(srv, shape)
        blocks = [5, 1, 2, 3]
        tcp, chk_tcp = cli.get_blocks("s1.0", blocks)
        seg = RestoreSegment(TOKEN, "s1.0", tcp.numel())
        assert os.path.exists(seg.path) and (os.stat(seg.path).st_mode & 0o777) == 0o600
        try:
            data, chk = cli.get_blocks("s1.0", blocks, seg)
            assert data.data_ptr() == seg.tensor.data_ptr()  # the holder wrote into our segment
            assert torch.equal(data, tcp) and torch.equal(chk, chk_tcp)
            x = data.view(torch.float32).view((3, len(blocks)) + shape[2:])
            assert torch.equal(x, cache[:, blocks])
            assert torch.equal(block_checksums(x, blocks), chk.view(len(blocks), -1))
            restored = torch.zeros(shape)
            to_cache(x, restored, blocks, seg.pinned)
            assert torch.equal(restored[:, blocks], cache[:, blocks]) and not restored[:, 0].any()
        finally:
            seg.close()
        assert not os.path.exists(seg.path)
        cli.close()
    finally:
        srv.stop()


def test_local_fetch_refuses_foreign_or_misfit_segments(tmp_path):
    shape = (2, 4, 2, 4, 2, 8)
    srv = ReplicaServer(TOKEN)
    try:
        cli, _ = _mirror_with(srv, shape)
        other = RestoreSegment("u" * 32, "s1.0", 2 * 2 * 2 * 4 * 2 * 8 * 4)  # another deployment's name
        small = RestoreSegment(TOKEN, "s1.1", 16)                             # not the blocks' size
        try:
            with pytest.raises(ReplicaError, match="bad restore segment name"):
                cli.get_blocks("s1.0", [0, 1], other)
            with pytest.raises(ReplicaError, match="not a segment of ours of at least"):
                cli.get_blocks("s1.0", [0, 1], small)
            with pytest.raises(ReplicaError, match="bad restore segment name"):
                cli._call({"t": "get_blocks", "src": "s1.0", "blocks": [0], "shm": "../etc/passwd"})
        finally:
            other.close()
            small.close()
        data, _ = cli.get_blocks("s1.0", [0])  # the connection and the holder carry on
        assert data.numel() == 2 * 2 * 4 * 2 * 8 * 4
        cli.close()
    finally:
        srv.stop()
    assert not glob.glob(os.path.join(SHM_DIR, "dejavu-*-restore-*"))


def test_warm_spare_with_preloaded_weights_takes_over_exactly(reference):  # noqa: F811
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              spare_workers=1, standby_weights="host")
    eng = llm.engine
    killed = []
    try:
        for _ in range(200):  # the spare registers in the background and is told what to hold
            eng.idle_check()
            if eng._standbys and eng.recovery.weights.asked:
                break
            time.sleep(0.1)
        ch, hello = eng._standbys[0]
        assert eng.recovery.weights.asked[id(ch)] == [0, 1]  # both stages, neither held by another standby
        # ... and it keeps a restore segment as large as a stage's cache, faulted in, ready
        ready = os.path.join(SHM_DIR, f"dejavu-{hello.pid}-*-restore-standby")
        for _ in range(100):
            if glob.glob(ready):
                break
            time.sleep(0.1)
        assert [os.path.getsize(f) for f in glob.glob(ready)] == [eng.num_blocks * 2 * 2 * 4 * 2 * 32 * 4]
        got, killed = run(llm, [(5, 1)])
        assert got == reference
        ev = llm.engine.fault_tolerance()["recoveries"][0]
        assert ev["weights_from"] == "host" and ev["kv_local"] and ev["bad_replicas"] == 0, ev
        # the recovery's record splits the replacement's start and the KV fetch into their phases
        assert set(ev["ready_parts"]) == {"weights", "cache", "roles"}, ev
        assert set(ev["restore_parts"]) == {"segment", "fetch", "verify", "copy"}, ev
        assert sum(ev["restore_parts"].values()) <= ev["kv_fetch_s"], ev
        assert 0 < ev["reset_s"] <= ev["respawn_s"] and 0 < ev["ready_s"] <= ev["respawn_s"], ev
        assert 0 <= ev["first_step_sent_s"] <= ev["first_step_s"], ev  # the step after the recovery, timed
        assert eng.worker_info[1]["pid"] == hello.pid
        assert not glob.glob(ready)  # the restore used it (and unlinked it)
    finally:
        finish(llm, killed)


def test_a_failed_rank_prefers_a_standby_holding_its_weights():
    from dejavu.cluster.messages import Hello
    from dejavu.cluster.placement import pick_standby

    standbys = [(name, Hello(token="k", standby=True, host_id=h)) for name, h in (("a", "h1"), ("b", "h2"), ("c", "h2"))]
    assert pick_standby(standbys, {"h1"}) == 1
    assert pick_standby(standbys, {"h1"}, lambda ch: ch == "c") == 2  # same host quality: the one holding it
    assert pick_standby(standbys, {"h1"}, lambda ch: ch == "a") == 1  # another host still comes first
    assert pick_standby(standbys, set(), lambda ch: ch == "b") == 1
