"""Deployments across hosts: the controller in one network-namespace host (tests/netns.py), its
workers in others, started by hand as `dejavu worker --controller HOST:PORT` (--launcher external,
also as srun would start them) or by the controller's mpirun over a hostfile (--launcher mpirun),
talking over the bridge through the addresses they advertise. Every run's greedy tokens equal the
single-process run's (which test_hf_equality checks against HF)."""
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

from dejavu import LLM
from dejavu.kvstream.transports import new_cluster_token
from multihost_controller import PARAMS, PROMPTS
from netns import hosts  # noqa: F401 - the fixture

HERE = os.path.dirname(__file__)
TOKEN = new_cluster_token()
ENV = dict(os.environ, DEJAVU_CLUSTER_TOKEN=TOKEN, PYTHONUNBUFFERED="1", DEJAVU_WORKER_THREADS="1")
FAST_FAILURE = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5, "worker_timeout": 60}


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model="random:llama-tiny", device="cpu", block_size=4)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


class Deployment:
    """A controller on hosts[0] at PORT and workers started on other hosts, each logging to tmp."""

    def __init__(self, hosts, tmp_path, port: int, env: dict | None = None, **kw):
        self.hosts, self.tmp = hosts, tmp_path
        self.address = f"{hosts[0].addr}:{port}"
        self.log = open(tmp_path / "controller.log", "w")
        self.ctl = hosts[0].popen([sys.executable, os.path.join(HERE, "multihost_controller.py"), self.address,
                                   json.dumps(kw)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                  text=True, env=dict(ENV, **(env or {})))
        self.workers: dict[str, subprocess.Popen] = {}

    def worker(self, name: str, host, *args: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.log", "w")
        p = host.popen([sys.executable, "-m", "dejavu", "worker", "--controller", self.address, *args],
                       stdout=out, stderr=subprocess.STDOUT, env=dict(ENV, **(env or {})))
        self.workers[name] = p
        return p

    def expect(self, want: str, timeout: float = 120) -> str:
        """The controller's next line, which must start with `want`."""
        ready, _, _ = select.select([self.ctl.stdout], [], [], timeout)
        assert ready, f"the controller said nothing within {timeout}s\n{self.logs()}"
        line = self.ctl.stdout.readline().strip()
        assert line.startswith(want), f"expected {want!r}, got {line!r} (exit {self.ctl.poll()})\n{self.logs()}"
        return line

    def go(self) -> None:
        self.ctl.stdin.write("go\n")
        self.ctl.stdin.flush()

    def result(self, timeout: float = 120) -> dict:
        out = json.loads(self.expect("{", timeout))
        self.ctl.wait(30)
        return out

    def logs(self) -> str:
        self.log.flush()
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.tmp.glob("*.log")))


def test_pipeline_across_two_hosts_assigns_ranks_and_matches_one_process(hosts, tmp_path, reference):
    d = Deployment(hosts, tmp_path, 29501, pp=2)
    d.worker("a", hosts[1])  # no --rank: the controller assigns them
    d.worker("b", hosts[2])
    d.expect("ready")
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    workers = out["workers"]
    assert {w["addr"] for w in workers.values()} == {hosts[1].addr, hosts[2].addr}
    assert len({w["host_id"] for w in workers.values()}) == 2
    assert all(w["local_rank"] == 0 for w in workers.values())  # one worker per host: GPU 0 on each
    assert all(p.wait(30) == 0 for p in d.workers.values())     # told to shut down, and did


def test_disaggregated_prompt_and_token_stages_on_two_hosts(hosts, tmp_path, reference):
    d = Deployment(hosts, tmp_path, 29502, prompt_stages=1, token_stages=1)
    d.worker("prompt", hosts[1], "--rank", "0")
    d.worker("token", hosts[2], "--rank", "1")
    d.expect("ready")
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    assert out["transports"] == ["tcp"]  # another host: KV over TCP, never shared memory
    assert out["workers"]["0"]["addr"] == hosts[1].addr and out["workers"]["1"]["addr"] == hosts[2].addr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (.ci/run installs Open MPI)")
def test_mpirun_starts_the_workers_on_the_hosts_of_a_hostfile(hosts, tmp_path, reference):
    hostfile = tmp_path / "hostfile"  # Open MPI syntax; the hosts by address
    hostfile.write_text(f"{hosts[1].addr} slots=1\n{hosts[2].addr} slots=1\n")
    # mpirun reaches the hosts through this agent in place of ssh; the token is not in the
    # environment the agent passes on, so the workers have it only through mpirun's -x.
    agent = hosts.ssh_agent(str(tmp_path / "ssh_agent"))
    d = Deployment(hosts, tmp_path, 29506, env={"PRTE_MCA_plm_ssh_agent": agent}, pp=2, launcher="mpirun",
                   hostfile=str(hostfile), log_dir=str(tmp_path))
    d.expect("ready")
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    workers = out["workers"]  # ranks in hostfile order (MPI's), one worker per host: local rank 0
    assert [workers[r]["addr"] for r in ("0", "1")] == [hosts[1].addr, hosts[2].addr], workers
    assert all(w["local_rank"] == 0 for w in workers.values()) and len({w["host_id"] for w in workers.values()}) == 2
    assert d.ctl.returncode == 0 and hosts[1].pids() == hosts[2].pids() == []  # mpirun took its daemons down


def test_workers_take_rank_and_local_rank_from_srun_environment(hosts, tmp_path, reference):
    d = Deployment(hosts, tmp_path, 29507, pp=2)
    # Two tasks on one host, with the environment `srun` gives them (srun itself is not run: no
    # Slurm here). Without it each would get its place among the host's ranks as its local rank.
    d.worker("task1", hosts[1], env={"SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    d.worker("task0", hosts[1], env={"SLURM_PROCID": "0", "SLURM_LOCALID": "1"})
    d.expect("ready")
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    workers = out["workers"]
    assert workers["0"]["pid"] == d.workers["task0"].pid and workers["1"]["pid"] == d.workers["task1"].pid, workers
    assert (workers["0"]["local_rank"], workers["1"]["local_rank"]) == (1, 0), workers


def _overlimits(host) -> int:
    out = host.run(["tc", "-s", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in out, out
    return int(out.split("overlimits")[1].split()[0])


def test_a_whole_host_killed_mid_stream_is_replaced_by_a_standby_on_a_third_host(hosts, tmp_path, reference):
    d = Deployment(hosts, tmp_path, 29503, pp=2, replicate=True, recovery="standby", pause_at=8, **FAST_FAILURE)
    d.worker("r0", hosts[1], "--rank", "0")
    d.worker("r1", hosts[2], "--rank", "1")
    d.worker("standby", hosts[3], "--standby")
    d.expect("ready")
    d.expect("paused")
    killed = hosts[1].kill_all()  # every process of the host, at once
    assert d.workers["r0"].pid in killed
    d.go()
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    (rec,) = out["recoveries"]
    assert rec["ranks"] == [0] and rec["replicated"] and rec["recomputed_tokens"] < 6 * 8, rec
    assert rec["detect_s"] < 1.5 and rec["kv_fetch_s"] > 0, rec  # noticed by the lost connections, not heartbeats
    print("host killed: recovery", {k: rec[k] for k in ("detect_s", "respawn_s", "kv_fetch_s", "total_s")})
    assert out["workers"]["0"]["addr"] == hosts[3].addr and out["workers"]["0"]["pid"] == d.workers["standby"].pid


def test_a_partitioned_worker_is_fenced_when_its_link_comes_back(hosts, tmp_path, reference):
    d = Deployment(hosts, tmp_path, 29504, pp=2, recovery="standby", pause_at=8, hold_after_recovery=True,
                   **FAST_FAILURE)
    old = d.worker("r0", hosts[1], "--rank", "0")
    d.worker("r1", hosts[2], "--rank", "1")
    d.worker("standby", hosts[3], "--standby")
    d.expect("ready")
    d.expect("paused")
    hosts[1].link_down()
    try:
        d.go()
        d.expect("recovered", 60)  # the heartbeat timeout passed: rank 0 went to the standby
        assert old.poll() is None  # cut off, not dead: it cannot know yet
    finally:
        hosts[1].link_up()
    try:
        rc = old.wait(30)  # the fence notice reaches it once the link is back
    except subprocess.TimeoutExpired:
        pytest.fail(f"the partitioned worker was not fenced\n{d.logs()}")
    assert rc == 5 and "fenced: rank 0" in (tmp_path / "r0.log").read_text(), d.logs()
    d.go()
    out = d.result()
    assert out["tokens"] == reference, d.logs()
    assert [r["ranks"] for r in out["recoveries"]] == [[0]]
    rec = out["recoveries"][0]
    assert rec["detect_s"] >= FAST_FAILURE["heartbeat_timeout"], rec  # silence, past the heartbeat timeout
    print("host partitioned: recovery", {k: rec[k] for k in ("detect_s", "respawn_s", "kv_fetch_s", "total_s")})
    assert out["workers"]["0"]["addr"] == hosts[3].addr


def test_a_rate_limited_link_between_stages(hosts, tmp_path, reference):
    hosts[1].rate_limit("2mbit", burst="4kb", latency="200ms")  # stage 0's hidden states leave through it
    try:
        d = Deployment(hosts, tmp_path, 29505, pp=2)
        d.worker("r0", hosts[1], "--rank", "0")
        d.worker("r1", hosts[2], "--rank", "1")
        d.expect("ready")
        out = d.result()
        assert _overlimits(hosts[1]) > 0  # the shaper held packets back
    finally:
        hosts[1].unlimit()
    assert out["tokens"] == reference, d.logs()
