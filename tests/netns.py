"""Hosts for multi-host tests on one machine: network namespaces joined by a bridge.

    from netns import hosts          # a module-scoped pytest fixture: a Cluster of 4 hosts
    def test_x(hosts):
        a, b = hosts[0], hosts[1]
        p = a.popen([sys.executable, "peer.py", b.addr])   # runs inside a's namespace

Layout: one *switch* namespace holds the bridge; each host is a namespace with one veth (`eth0`,
10.77.0.<i+1>/24) whose peer end is a port of the bridge. Nothing is added to the machine's own
namespace, so concurrent runs (each with names unique to its process) never collide, even on
addresses. `link_down` / `link_up` unplug a host's cable at the switch; `rate_limit` shapes a
host's egress with tbf (these kernels have no netem). `ssh_agent` writes a script that mpirun uses
in place of ssh to start processes on the hosts of a hostfile (their addresses).

Teardown kills every process left in the run's namespaces and deletes them, on success, failure
or interpreter exit; namespaces of runs whose process died (SIGKILL) are removed by the next run.
Where namespaces cannot be made (not root, no iproute2, no kernel support) the fixture skips with
the reason.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

SUBNET = "10.77.0"
_PREFIX = "djv"
_OURS = re.compile(rf"{_PREFIX}(\d+)x[0-9a-f]{{6}}-")


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {r.stderr.strip() or r.returncode}")
    return r


class Host:
    """One namespace host: `addr` is what its peers dial."""

    def __init__(self, cluster: "Cluster", index: int):
        self.cluster, self.index = cluster, index
        self.ns = f"{cluster.tag}-h{index}"
        self.addr = f"{SUBNET}.{index + 1}"
        self.port_name = f"p{index}"  # its bridge port, in the switch namespace

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """A process inside this host, in a session of its own (torn down with the cluster)."""
        p = subprocess.Popen(self.cmd(argv), start_new_session=True, **kw)
        self.cluster.procs.append(p)
        return p

    def pids(self) -> list[int]:
        """Every process running in this host."""
        return [int(p) for p in _ip("netns", "pids", self.ns, check=False).stdout.split()]

    def kill_all(self) -> list[int]:
        """SIGKILL every process in this host (a whole machine failing); returns their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def link_down(self) -> None:
        _ip("-n", self.cluster.switch, "link", "set", self.port_name, "down")

    def link_up(self) -> None:
        _ip("-n", self.cluster.switch, "link", "set", self.port_name, "up")

    def rate_limit(self, rate: str = "100mbit", burst: str = "64kb", latency: str = "50ms") -> None:
        """Shape everything this host sends to `rate` (tbf); `unlimit` removes it."""
        _ip("netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
            "burst", burst, "latency", latency)

    def unlimit(self) -> None:
        _ip("netns", "exec", self.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def __repr__(self) -> str:
        return f"Host({self.ns}, {self.addr})"


class Cluster:
    def __init__(self, n: int):
        self.tag = f"{_PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        atexit.register(self.close)
        try:
            self._build(n)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, n: int) -> None:
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(n):
            h = Host(self, i)
            self._add_ns(h.ns)
            _ip("-n", self.switch, "link", "add", h.port_name, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("-n", self.switch, "link", "set", h.port_name, "master", "br0", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            self.hosts.append(h)
        # The bridge forwards once its ports are in the forwarding state (at once without STP).
        deadline = time.monotonic() + 10
        while not all(self._forwarding(h) for h in self.hosts):
            if time.monotonic() > deadline:
                raise NetnsUnavailable("the bridge's ports did not start forwarding within 10 s")
            time.sleep(0.1)

    def _forwarding(self, h: Host) -> bool:
        info = json.loads(_ip("-n", self.switch, "-d", "-j", "link", "show", h.port_name).stdout)
        return info[0].get("linkinfo", {}).get("info_slave_data", {}).get("state") == "forwarding"

    def ssh_agent(self, path: str, keep_env=("PATH", "HOME", "PYTHONPATH", "HF_HUB_OFFLINE")) -> str:
        """Write an executable at `path` that mpirun can use in place of ssh (PRTE_MCA_plm_ssh_agent):
        `agent HOST COMMAND...` runs COMMAND with /bin/sh inside the namespace of the host whose address
        is HOST, with only `keep_env` of our environment (as a login on another machine would
        have: the rest, the cluster token included, must be forwarded by mpirun's -x)."""
        cases = "".join(f"  {h.addr}) ns={h.ns} ;;\n" for h in self.hosts)
        keep = " ".join(f'{k}="${{{k}:-}}"' for k in keep_env)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nhost=$1; shift\ncase "$host" in\n{cases}'
                    f'  *) echo "ssh_agent: $host is no namespace host of this cluster" >&2; exit 255 ;;\nesac\n'
                    f'exec ip netns exec "$ns" env -i {keep} /bin/sh -c "$*"\n')
        os.chmod(path, 0o755)
        return path

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def stop_procs(self, sig: int = signal.SIGKILL, wait: float = 5) -> None:
        """Send `sig` to the session of every process started by `Host.popen`, then wait up to
        `wait` s for each (SIGTERM first lets servers clean up, e.g. their /dev/shm segments)."""
        for p in self.procs:
            _kill_group(p.pid, sig)
        for p in self.procs:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.stop_procs()  # our own children first, by their session
        self.procs.clear()
        for name in reversed(self._made):
            _delete_ns(name)
        self._made.clear()


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _delete_ns(name: str) -> None:
    """Kill whatever still runs in the namespace `name` (only processes of the run that made it),
    then delete it (its veths go with it)."""
    r = _ip("netns", "pids", name, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def sweep_stale() -> None:
    """Delete namespaces left by runs of this harness whose process is gone (killed with SIGKILL)."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OURS.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_ns(name)


def unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2; .ci/run installs it)"
    return None


def new_cluster(n: int) -> Cluster:
    """n namespace hosts on one bridge (after removing stale ones); NetnsUnavailable says why not."""
    why = unavailable()
    if why:
        raise NetnsUnavailable(why)
    sweep_stale()
    return Cluster(n)


def bench_cluster(n: int, prog: str) -> "Cluster | None":
    """new_cluster for a benchmark script; None (the reason printed) where they cannot be made."""
    try:
        return new_cluster(n)
    except NetnsUnavailable as e:
        print(f"{prog}: no namespace hosts: {e}", file=sys.stderr)
        return None


def cpu_model() -> str:
    """The processor's name, for benchmark reports run on these hosts (they share it)."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def make_cluster(n: int = 4) -> Cluster:
    """new_cluster for a test; pytest.skip with the reason where they cannot be made."""
    try:
        return new_cluster(n)
    except NetnsUnavailable as e:
        pytest.skip(f"no namespace hosts: {e}")


@pytest.fixture(scope="module")
def hosts():
    cluster = make_cluster(4)
    try:
        yield cluster
    finally:
        cluster.close()
