"""A controller's death survived: its live workers rejoin the controller the front-end starts next
(serving/frontend.py), which adopts them instead of starting new ones.

Worker side: a worker of a split deployment (pipeline stage, prompt or token worker: its Config's
`rejoin` > 0) whose control connection breaks keeps its weights, cache and listeners, and dials
the same controller address again for up to `rejoin` seconds, with a HELLO that says `adopt` and
carries the epoch it is in (as the rank it serves, also a promoted standby); it then says READY
again (its listeners' ports) and serves the new controller. It exits when the front-end process
is gone ($DEJAVU_FRONTEND_PID), when no controller took it in time, or when one turns it away.

Front-end side (`adoptable`, `retire_workers`): from the lost controller's last status, whether
its workers can be adopted (none dead, hung or being replaced), else kill those of this host
before a controller with new workers starts.

Controller side (Membership.rendezvous while `pending()`, with `rejoining_rank` and
`reset_workers`): wait for every rank's adopting HELLO, rebuild the membership (where each worker
is, its ports), move to an epoch above every worker's (messages of an older controller are refused
from then on: worker.py drops a message of an epoch below its own), reset every worker (steps in
flight when the old controller died are dropped, and the prompt KV pushed for the old controller's
prefills), offer standbys their weights as at a first start, and send the pipes. The front-end
then resubmits its requests, which are recomputed.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from ..parallel.wire import connect
from ..serving.lifecycle import exit_when
from .errors import WorkerError
from .messages import Reset, Shutdown

log = logging.getLogger("dejavu.adopt")

FRONTEND_PID_ENV = "DEJAVU_FRONTEND_PID"
REJOIN_S = 60.0      # how long a worker waits for the next controller (Config.rejoin)
ADOPT_WAIT_S = 30.0  # how long a new controller waits for every worker to rejoin

_pending = False     # this process's controller takes over live workers (set by serving/engine_core.py)
_pids: dict[int, int] = {}  # rank -> pid of the workers to adopt on this host, as the front-end last saw them
_armed = threading.Event()  # worker side: rejoining is on, so the controller process's exit is not ours


def expect_workers(pids: dict[int, int] | None = None) -> None:
    global _pending
    _pending = True
    _pids.update(pids or {})


def proc_state(pid: int) -> str | None:
    """A process's state letter from /proc (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_worker(pid: int) -> bool:
    """Whether `pid` is a live `dejavu worker` process (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"dejavu" in args and b"worker" in args and proc_state(pid) not in (None, "Z")


def check_missing(m) -> None:
    """A worker that has not rejoined and is gone (or stopped: hung) never will: fail now rather
    than after ADOPT_WAIT_S (the front-end then starts a controller with new workers)."""
    for rank, pid in _pids.items():
        if rank not in m.channels and proc_state(pid) in (None, "Z", "T"):
            raise WorkerError(f"worker rank {rank} (pid {pid}) is gone or stopped: it cannot rejoin") from None


def turn_away(ch, hello) -> None:
    """Tell a worker this controller has no place for to exit (a rejoining one would otherwise
    dial again): `shutdown` in its own epoch, which it heeds, then close."""
    ch.stamp = lambda: hello.epoch
    try:
        ch.send(Shutdown())
    except OSError:
        pass
    finally:
        ch.close()


def pending() -> bool:
    return _pending


# ---------------------------------------------------------------------- worker side
def arm() -> None:
    _armed.set()


def watch_deployment(parent: int) -> None:
    """A worker's watchdog: exit (status 3, after the deployment cleanups) once the front-end is gone,
    or once its parent is, unless it rejoins the next controller."""
    frontend = int(os.environ.get(FRONTEND_PID_ENV) or 0)
    if not (frontend or parent):
        return  # started by hand: nothing to watch

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    exit_when(lambda: bool((frontend and gone(frontend)) or (parent and os.getppid() != parent and not _armed.is_set())),
              "deployment-watch")


def rejoin(host: str, port: int, token: str, hello: dict, epoch: int, wait: float):
    """Dial the controller address until a new controller takes this worker in (its channel), or
    None after `wait` seconds or when the controller turns it away."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            return connect(host, port, token, dict(hello, adopt=True, epoch=epoch), timeout=10,
                           wait=max(0.0, deadline - time.monotonic()))
        except OSError as e:
            if type(e) is ConnectionError:  # the controller refused the HELLO (wire.connect)
                log.warning("rejoining failed: %s", e)
                return None
            time.sleep(0.2)  # no controller listening yet, or it went while we said HELLO
    return None


# ---------------------------------------------------------------------- front-end side
def local_workers(workers: list[dict]) -> list[dict]:
    """The workers of a controller's status (its /v1/cluster list) that run on this host."""
    here = socket.gethostname()
    return [w for w in workers if w.get("host") == here and w.get("pid") and w.get("rank") is not None]


def adoptable(status) -> bool:
    """Whether the workers of a lost controller (its last status) can rejoin the next one: recovery
    is on (without it they exit with their controller), no worker was being replaced, and every
    worker of this host is still running (a dead or hung one would keep the next controller
    waiting for it, then fail its start)."""
    if status.fault_tolerance.get("recovery") == "off":
        return False
    if status.recovering:  # a replacement still starting goes with its controller
        log.warning("the controller was replacing workers: the next controller starts new workers")
        return False
    for w in local_workers(status.workers):
        if proc_state(int(w["pid"])) in (None, "T", "Z"):
            log.warning("worker %s (pid %s) is not running: the next controller starts new workers",
                        w.get("worker"), w["pid"])
            return False
    return True


def retire_workers(workers: list[dict]) -> None:
    """The next controller starts new workers: the old ones of this host are killed, as a controller
    kills a worker it replaces (a hung one would linger; a live one is turned away when it
    rejoins). Those of other hosts are fenced by the epoch."""
    for w in local_workers(workers):
        if is_worker(int(w["pid"])):
            try:
                os.kill(int(w["pid"]), signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------------- controller side
# (Membership.rendezvous, when pending(): each rank's worker rejoins instead of a new one starting)
def rejoining_rank(m, hello) -> int | None:
    """The rank a rejoining worker serves, or None: turned away (not rejoining, or its rank taken)."""
    if hello.adopt and hello.rank is not None and hello.rank not in m.channels:
        return hello.rank
    log.warning("turned away a worker (rank %s) while adopting: expected each rank's rejoining worker", hello.rank)
    return None


def reset_workers(m) -> set[int]:
    """Reset every adopted worker (the ranks that owe a reset_done): what the old controller left in
    flight is dropped, with the prompt KV pushed for it (disaggregation: such keys start with the
    epoch they were made in, and the new controller's restart at step 1)."""
    stale = [f"e{e}" for e in range(m.epoch)]
    for ch in m.channels.values():
        ch.send(Reset(drop_keys=stale))
    return set(m.channels)
