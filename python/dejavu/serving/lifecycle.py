"""Stopping a deployment is not a failure.

SIGTERM or SIGINT sent to a deployment's process group (systemd, Kubernetes, Ctrl-C) reaches the
controller and every worker at once. Workers started by the controller begin life with both
signals blocked (spawn_blocked), so a signal that comes while they import stays pending; once a
worker's handlers are in (quiet_stop_on_signals) a stop signal only starts a grace period: the
worker keeps serving until the controller says shutdown (or its connection or parent goes), and
exits quietly when the grace runs out. The controller meanwhile marks itself stopping
(Controller.begin_stop) before it stops its workers, so no worker exit is taken for a failure.

When the controller is gone (its connection closes, or kill -9 of it: the parent watchdog),
a worker runs its deployment cleanups (e.g. unlinking the deployment's /dev/shm segments) before
it exits, so nothing outlives the deployment.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_cleanups: list = []
_lock = threading.Lock()
_stopping = threading.Event()


def stop_grace() -> float:
    """Seconds a signalled worker waits for the controller's shutdown before exiting on its own."""
    return float(os.environ.get("DEJAVU_STOP_GRACE", "3"))


@contextlib.contextmanager
def spawn_blocked():
    """Around starting a worker process: it inherits SIGTERM and SIGINT blocked (this thread's mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def on_deployment_gone(fn) -> None:
    """Register fn() to run when this worker exits because its controller is gone."""
    with _lock:
        _cleanups.append(fn)


def run_deployment_cleanups() -> None:
    with _lock:
        fns, _cleanups[:] = list(_cleanups), []
    for fn in fns:
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def exit_when(gone, name: str = "parent-watch") -> None:
    """Exit (status 3) once gone() is true (checked every 0.5 s), after the deployment cleanups."""
    def loop():
        while not gone():
            time.sleep(0.5)
        run_deployment_cleanups()
        os._exit(3)
    threading.Thread(target=loop, daemon=True, name=name).start()


def watch_parent(parent: int) -> None:
    """Exit (status 3) once `parent` is gone, after the deployment cleanups."""
    exit_when(lambda: os.getppid() != parent)


def exit_after(seconds: float) -> None:
    """Exit (status 0) `seconds` from now, whatever the process is doing then (a stop's grace period)."""
    def expire():
        time.sleep(seconds)
        os._exit(0)
    threading.Thread(target=expire, daemon=True, name="stop-grace").start()


def on_stop_signals(handler) -> None:
    """Handle SIGTERM / SIGINT with `handler`, then unblock them (spawn_blocked), so one that came
    while the process started is handled now."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stopping() -> bool:
    """A stop signal came: the worker is on its way out."""
    return _stopping.is_set()


def quiet_stop_on_signals() -> None:
    """Worker side: SIGTERM / SIGINT start the grace period (no KeyboardInterrupt, no traceback)."""
    def handler(signum, frame):
        if not _stopping.is_set():
            _stopping.set()
            exit_after(stop_grace())
    on_stop_signals(handler)
