"""DéjàVuLib between hosts: real processes in network-namespace hosts (tests/netns.py), talking
over a bridge through the addresses they bind and advertise. No controller: the library alone."""
import os
import select
import subprocess
import sys
import time

import pytest

from dejavu.kvstream.select import host_id
from dejavu.kvstream.transports import new_cluster_token
from netns import hosts  # noqa: F401 - the fixture

PEER = os.path.join(os.path.dirname(__file__), "kv_peer.py")
TOKEN = new_cluster_token()
ENV = dict(os.environ, DEJAVU_CLUSTER_TOKEN=TOKEN, PYTHONUNBUFFERED="1")


def _line(p: subprocess.Popen, timeout: float = 90) -> str:
    """The next line `p` prints; fails (not hangs) if none comes within `timeout`."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, f"no output from {p.args} within {timeout}s"
    line = p.stdout.readline()
    assert line, f"{p.args} exited ({p.poll()}) before printing"
    return line.strip()


def _serve(host, mode: str, *args: str) -> tuple[subprocess.Popen, int]:
    p = host.popen([sys.executable, PEER, mode, host.addr, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   text=True, env=ENV)
    return p, int(_line(p))


def _push(host, dst_host, port: int, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return host.run([sys.executable, PEER, "tcp-push", dst_host.addr, str(port), *args], timeout=timeout,
                    env=dict(ENV, **env))


def _check(holder: subprocess.Popen) -> str:
    holder.stdin.write("check\n")
    holder.stdin.flush()
    out = _line(holder)
    holder.wait(30)
    return out


def test_namespaces_are_separate_hosts(hosts):
    inodes = {h.run(["readlink", "/proc/self/ns/net"]).stdout.strip() for h in hosts}
    assert len(inodes) == len(hosts) and all(i.startswith("net:[") for i in inodes)
    assert not any(host_id().endswith(i[5:-1]) for i in inodes)  # and none is the test's own


def test_kv_streams_byte_exact_from_one_host_to_another(hosts):
    a, b = hosts[0], hosts[1]
    holder, port = _serve(b, "tcp-hold")
    r = _push(a, b, port)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _check(holder) == "OK ['peer.chunks', 'peer.tokens']"


def test_replica_holder_on_another_host_receives_the_stream_and_serves_it_back(hosts):
    a, b, c = hosts[0], hosts[1], hosts[2]
    holder, port = _serve(b, "replica-hold")
    try:
        r = a.run([sys.executable, PEER, "replica-push", b.addr, str(port), "w0"], env=ENV, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        # A third host (a replacement, say) fetches the replica and checks every slot written.
        r = c.run([sys.executable, PEER, "replica-fetch", b.addr, str(port), "w0"], env=ENV, timeout=120)
        assert r.returncode == 0 and "fetched OK" in r.stdout, r.stdout + r.stderr[-2000:]
    finally:
        holder.stdin.close()
        holder.wait(30)


def _overlimits(host) -> int:
    out = host.run(["tc", "-s", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in out, out
    return int(out.split("overlimits")[1].split()[0])


def test_a_rate_limited_link_still_delivers_exact_bytes(hosts):
    a, b = hosts[0], hosts[1]
    holder, port = _serve(b, "tcp-hold", "big")
    a.rate_limit("200mbit")
    try:
        r = _push(a, b, port, "big")
        assert r.returncode == 0, r.stderr[-2000:]
        assert _overlimits(a) > 0  # the shaper held packets back: the link really was the bottleneck
    finally:
        a.unlimit()
    assert _check(holder) == "OK ['peer.big']"


def test_a_link_taken_down_mid_transfer_fails_clearly_within_the_timeout(hosts):
    a, b = hosts[0], hosts[1]
    holder, port = _serve(b, "tcp-hold", "big")
    a.rate_limit("16mbit")  # 8 MiB take about 4 s: the link goes down in the middle
    try:
        p = a.popen([sys.executable, PEER, "tcp-push", b.addr, str(port), "big"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env=dict(ENV, KV_PEER_TIMEOUT="3"))
        assert _line(p) == "connected"
        time.sleep(0.5)
        a.link_down()
        down = time.monotonic()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the sender hung after its link went down")
        waited = time.monotonic() - down
        err = p.stderr.read()
        assert p.returncode != 0 and "tcp put 'peer.big'" in err and f"{b.addr}:{port}" in err, err[-2000:]
        assert waited < 20, f"the failure took {waited:.1f}s to surface"
    finally:
        a.link_up()
        a.unlimit()
        holder.kill()
