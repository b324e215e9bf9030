"""Placement by host (cluster/placement.py) and the pieces of a multi-host deployment that need no
second host: the options, a worker's identity, local ranks, holders and standbys on other hosts,
(epoch stamping on the control channel: test_messages.py)."""
import types

import pytest

from dejavu.cluster.placement import (free_local_rank, holder_ring, holder_rings, local_ranks, pick_standby,
                                      worker_identity)
from dejavu.cluster.replication import Replication
from dejavu.config import Config, ConfigError
from dejavu.kvstream.net import route_address
from dejavu.kvstream.select import host_id


def test_holders_go_to_another_host_whenever_one_exists():
    assert holder_ring(["a", "b"]) == [1, 0]
    assert holder_ring(["a", "a", "b", "b"]) == [2, 2, 0, 0]   # never the stage next door on the same host
    assert holder_ring(["a", "a", "a"]) == [1, 2, 0]           # one host: the plain ring
    assert holder_ring(["a", "b", "a"]) == [1, 2, 1]
    rep = Replication(True, 4)
    rep.place(["a", "a", "b", "b"])
    assert rep.ring == [2, 2, 0, 0]
    given = Replication(True, 2, ring=[1, 0])
    given.place(["a", "a"])
    assert given.ring == [1, 0]  # replicate_to is the operator's choice


def test_several_holders_go_to_different_hosts():
    assert holder_rings(["a", "a", "a"], 2) == [[1, 2, 0], [2, 0, 1]]     # one host: the next two stages
    # each stage's two holders on the two other hosts, never its own
    assert holder_rings(["a", "a", "b", "b", "c", "c"], 2) == [[2, 2, 4, 4, 0, 0], [4, 4, 0, 0, 2, 2]]
    assert holder_rings(["a", "b", "a"], 2, first=[2, 2, 1]) == [[2, 2, 1], [1, 0, 0]]  # replicate_to first
    with pytest.raises(ValueError, match="at least 3 stages"):
        holder_rings(["a", "b"], 2)
    rep = Replication(True, 4, replicas=3)
    rep.place(["a", "b", "c", "d"])
    assert rep.holder_ranks(5, {"role": "stage", "first_rank": 0}, 2) == [7, 1, 3]  # stage 2, TP rank 1: stages 3, 0, 1
    with pytest.raises(ValueError, match="replicas must be"):
        Replication(True, 2, replicas=2)


def test_local_ranks_count_the_workers_of_each_host():
    hosts = {0: "a", 1: "b", 2: "a", 3: "b", 4: "a"}
    assert local_ranks(hosts, {}) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2}
    assert local_ranks(hosts, {2: 5}) == {0: 0, 1: 0, 2: 5, 3: 1, 4: 2}  # the launcher's (SLURM_LOCALID) wins
    live = {0: ("a", 0), 1: ("b", 0), 4: ("a", 2)}
    assert free_local_rank("a", live) == 1 and free_local_rank("c", live) == 0 and free_local_rank("a", live, 3) == 3


def test_a_replacement_standby_comes_from_another_host():
    sb = [(None, types.SimpleNamespace(host_id=h)) for h in ("x", "x", "y")]
    assert pick_standby(sb, {"x"}) == 2
    assert pick_standby(sb, {"z"}) == 0
    assert pick_standby(sb[:2], {"x"}) == 0  # none elsewhere: one on the same host still serves


def test_rank_and_local_rank_come_from_the_launchers_environment(monkeypatch):
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
              "MPI_LOCALRANKID", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    from dejavu.cluster.worker import _env_rank

    assert _env_rank() == 3
    ident = worker_identity("127.0.0.1", 9)
    assert ident["local_rank"] == 1 and ident["addr"] == "127.0.0.1" and ident["host_id"] == host_id()
    assert 0 < ident["dist_port"] < 65536
    monkeypatch.setenv("SLURM_PROCID", "x")
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        _env_rank()
    with pytest.raises(ValueError, match="wildcard"):
        worker_identity("127.0.0.1", 9, advertise="0.0.0.0")
    with pytest.raises(OSError):
        worker_identity("127.0.0.1", 9, advertise="192.0.2.1")  # not an address of this host: cannot bind
    assert route_address("127.0.0.1", 1) == "127.0.0.1"


def test_cluster_address_and_hostfile_options_are_checked(tmp_path):
    def check(**kw):
        Config.from_kwargs(model="random:llama-tiny", pp=2, **kw).validate()

    check(cluster_address="10.0.0.1:29500", launcher="external")
    check(cluster_address="[::1]:29500")
    for bad in ("10.0.0.1", "10.0.0.1:0", ":29500", "h:99999", "h:x"):
        with pytest.raises(ConfigError, match="cluster_address: must be HOST:PORT"):
            check(cluster_address=bad)
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=2\n")
    check(launcher="mpirun", hostfile=str(hf))
    with pytest.raises(ConfigError, match="hostfile: is for launcher 'mpirun'"):
        check(hostfile=str(hf))
    with pytest.raises(ConfigError, match="hostfile: no such file"):
        check(launcher="mpirun", hostfile=str(tmp_path / "nope"))
