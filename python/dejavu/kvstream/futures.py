"""Futures over C++ handles, CUDA events and other futures, with chaining.

A Future is done only when every byte of its operation has moved. It keeps the tensors its
operation reads or writes alive until then, and runs its cleanup (e.g. returning a pool buffer)
exactly once when it finishes, successfully or not.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .errors import StreamError


class PolledCompletion:
    """A Future part for libraries that only offer "is it done?" (MPI requests, torch.distributed
    work): polls `poll()`, then runs `check()` once, whose exception fails the part."""

    def __init__(self, poll: Callable[[], bool], check: Callable[[], None] | None = None,
                 block: Callable[[float | None], None] | None = None):
        self._poll, self._check, self._block, self._err, self._done = poll, check, block, None, False

    def test(self) -> bool:
        if not self._done and self._poll():
            self._done = True
            if self._check is not None:
                try:
                    self._check()
                except Exception as e:  # noqa: BLE001 - reported through the future
                    self._err = str(e)
        return self._done

    def wait(self, timeout: float) -> bool:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        if self._block is not None and not self._done:
            # Some libraries (gloo) only make progress inside their own wait, which takes a timeout.
            self._block(None if deadline is None else timeout)
        while not self.test():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(5e-5)
        return True

    def failed(self) -> bool:
        return self._err is not None

    def error(self) -> str:
        return self._err or ""


def _part_done(p) -> bool:
    if isinstance(p, Future):
        return p._try_done()
    if hasattr(p, "query"):      # torch.cuda.Event
        return p.query()
    return p.test()              # _C.Handle


def _chained_error(f: "Future") -> str | None:
    """A step's error with what the step was (the peer it talked to, say), for the future it is part of."""
    return None if f._error is None else f"{f.what}: {f._error}"


def _part_error(p) -> str | None:
    if isinstance(p, Future):
        return _chained_error(p)
    if hasattr(p, "failed") and p.failed():
        return p.error()
    return None


def _part_wait(p, timeout: float | None) -> bool:
    if isinstance(p, Future):
        p.wait(timeout)
        return True
    if hasattr(p, "query"):
        if timeout is None:
            p.synchronize()
            return True
        deadline = time.monotonic() + timeout
        nap = 5e-5
        while not p.query():
            if time.monotonic() > deadline:
                return False
            # Back off: a tight query loop keeps taking the GIL and the driver's lock from the thread
            # that is launching the next step's kernels.
            time.sleep(nap)
            nap = min(nap * 2, 2e-3)
        return True
    return p.wait(-1.0 if timeout is None else timeout)


class Future:
    def __init__(self, what: str, parts=(), keep=(), then: Callable[[], "Future | None"] | None = None,
                 cleanup: Callable[[], None] | None = None, nbytes: int = 0, event=None):
        self.what = what
        self._parts = list(parts)
        self._keep: list[Any] = list(keep)
        self._then = then
        self._cleanup = cleanup
        self._next: Future | None = None
        self._error: str | None = None
        self._done = False
        self.nbytes = nbytes
        self.event = event  # CUDA event that marks completion on the device, for stream ordering
        self._lock = threading.RLock()  # the progress thread and the owner may both advance it

    @classmethod
    def completed(cls, what: str, nbytes: int = 0) -> "Future":
        f = cls(what, nbytes=nbytes)
        f._finish()
        return f

    @classmethod
    def failed(cls, what: str, error: str) -> "Future":
        f = cls(what)
        f._error = error
        f._finish()
        return f

    def _advance(self) -> None:
        """All parts finished: collect errors, then start the chained step (once)."""
        for p in self._parts:
            err = _part_error(p)
            if err and self._error is None:
                self._error = err
        self._parts = []
        if self._error is None and self._then is not None:
            then, self._then = self._then, None
            try:
                self._next = then()
            except Exception as e:  # noqa: BLE001 - reported through the future
                self._error = f"{type(e).__name__}: {e}"

    def drive(self) -> "Future":
        """Let the background progress thread advance this future's chained steps (e.g. start the
        send as soon as the gather finished) instead of waiting for the owner to poll or wait."""
        _driver.add(self)
        return self

    def _try_done(self) -> bool:
        """done() if the future is free to advance now; False (not yet) if someone else holds it."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._done_locked()
        finally:
            self._lock.release()

    def done(self) -> bool:
        """True once finished (successfully or not); never blocks on the transfer."""
        with self._lock:
            return self._done_locked()

    def _done_locked(self) -> bool:
        if self._done:
            return True
        if self._parts and not all(_part_done(p) for p in self._parts):
            return False
        self._advance()
        if self._next is not None and self._error is None:
            if not self._next._try_done():
                return False
            self._error = _chained_error(self._next)
        self._finish()
        return True

    def wait(self, timeout: float | None = None) -> "Future":
        """Block until done; raises StreamError on failure or timeout (the operation is then not done)."""
        with self._lock:
            return self._wait_locked(timeout)

    def _wait_locked(self, timeout: float | None) -> "Future":
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if not self._done:
            for p in self._parts:
                if not _part_wait(p, left()):
                    raise StreamError(f"{self.what}: timed out after {timeout}s")
            self._advance()
            if self._next is not None and self._error is None:
                try:
                    self._next.wait(left())
                except StreamError as e:
                    if not self._next._done:
                        raise StreamError(f"{self.what}: timed out after {timeout}s") from e
                self._error = _chained_error(self._next)
            self._finish()
        if self._error is not None:
            raise StreamError(f"{self.what}: {self._error}")
        return self

    @property
    def error(self) -> str | None:
        self.done()
        return self._error

    def _finish(self):
        if self._done:
            return
        self._done = True
        self._keep.clear()
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


_NAP_MIN, _NAP_MAX = 2e-4, 1e-3


class _Driver:
    """One daemon thread that keeps driving registered futures to completion."""

    def __init__(self):
        self._cv = threading.Condition()
        self._futures: set[Future] = set()
        self._thread: threading.Thread | None = None

    def add(self, f: Future) -> None:
        with self._cv:
            self._futures.add(f)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvstream-progress", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        # Polls often while futures move, backing off while none does (a long send holds nothing for
        # it to do): polling at full rate takes a core's share from the transfers themselves.
        nap = _NAP_MIN
        while True:
            with self._cv:
                while not self._futures:
                    self._cv.wait()
                    nap = _NAP_MIN
                items = list(self._futures)
            finished = [f for f in items if f._try_done()]
            with self._cv:
                self._futures.difference_update(finished)
                if finished or len(self._futures) > len(items) - len(finished):
                    nap = _NAP_MIN  # progress, or new work
                else:
                    nap = min(nap * 2, _NAP_MAX)
                self._cv.wait(nap)


_driver = _Driver()


def gather_futures(what: str, futures, cleanup=None) -> Future:
    futures = list(futures)
    return Future(what, parts=futures, cleanup=cleanup, nbytes=sum(f.nbytes for f in futures))
