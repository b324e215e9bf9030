"""Health checks of a deployment's workers (Membership calls them while it waits for messages):
exited processes and silent heartbeats are failures (recovery.Failure) once serving with recovery on."""
from __future__ import annotations

import time

from .errors import WorkerError
from .recovery import Failure


def check_procs(m) -> None:
    """A worker process that exited is a failure (a WorkerError before start-up or without recovery)."""
    c = m.c
    if c._stopping:
        return  # workers exit because we stop them: not failures
    if c.ft and m.started:  # a dead rank is replaced (even when no process is left to watch)
        for rank, p in list(c.launcher.proc_of.items()):
            if p.poll() is None:
                continue
            if rank in m.needed:
                raise Failure({rank}, f"the replacement for rank {rank} (pid {p.pid}) exited with status "
                                      f"{p.returncode} while starting")
            raise Failure({rank}, f"worker process {p.pid} (rank {rank}) exited with status {p.returncode}")
        c.recovery.respawn_unserved()
        return
    for p in c.launcher.procs:
        if p.poll() is not None:
            raise WorkerError(f"worker process {p.pid} exited with status {p.returncode}")


def check_heartbeats(m) -> None:
    """Workers silent for the heartbeat timeout are a failure."""
    if not (m.c.ft and m.started) or m.c._stopping:
        return
    now = time.monotonic()
    silent = {r for r in m.channels
              if r not in m.needed and now - m.last_seen.get(r, now) > m.hb_timeout}
    if silent:
        raise Failure(silent, f"no heartbeat from rank(s) {sorted(silent)} for {m.hb_timeout}s")
