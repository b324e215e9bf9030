"""The namespace-host harness itself (tests/netns.py): hosts reach each other only over the bridge,
and teardown leaves nothing behind, even after a run that was killed."""
import subprocess

import pytest

import netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def test_close_kills_the_hosts_processes_and_deletes_the_namespaces():
    cluster = netns.make_cluster(2)
    names = {cluster.switch} | {h.ns for h in cluster}
    assert names <= _namespaces()
    assert [h.addr for h in cluster] == ["10.77.0.1", "10.77.0.2"]
    addrs = cluster[1].run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.77.0.2/24" in addrs
    p = cluster[0].popen(["sleep", "300"])
    pids = cluster[0].run(["ip", "netns", "pids", cluster[0].ns]).stdout.split()  # the sleeper, seen inside
    assert pids
    cluster.close()
    assert p.wait(10) is not None
    assert not names & _namespaces()


def test_namespaces_of_a_dead_run_are_swept():
    if netns.unavailable():
        pytest.skip(f"no namespace hosts: {netns.unavailable()}")
    stale = "djv999999999x00beef-h0"  # a run whose process (pid 999999999) no longer exists
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        netns.sweep_stale()
        assert stale not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
