"""Same-host transfers through POSIX shared memory (/dev/shm).

put(key, buf) creates a segment named prefix + key, copies the buffer in on a C++ worker thread
and leaves it for the reader; get(key, buf) maps it, copies it out and unlinks it. Local memory
needs no checksum, and nothing is pickled. `cleanup(prefix)` removes every segment a deployment
left behind (crashes included), so no shared memory leaks. A deployment's prefix names its owner
(`owner_prefix`: dejavu-<controller pid>-<tag>-): its workers `retire` it when the controller
is gone, and the next deployment's `cleanup_orphans` removes what a dead owner still left.
"""
from __future__ import annotations

import glob
import os
import re
from multiprocessing import resource_tracker, shared_memory

import torch

from .futures import Future
from .transports import Destination, _check_buf, default_workers

SHM_DIR = "/dev/shm"
_OWNED = re.compile(r"dejavu-(\d+)-[0-9a-f]+-")
_retired: set[str] = set()  # prefixes whose deployment is gone: no new segments under them


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # The reader unlinks segments; keep this process's tracker from "cleaning" them at exit.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - no public API before 3.13
    except Exception:  # noqa: BLE001
        pass


class ShmDest(Destination):
    name = "shm"

    def __init__(self, prefix: str, workers=None):
        if not prefix or "/" in prefix:
            raise ValueError(f"bad shared-memory prefix {prefix!r}")
        self.prefix = prefix
        self.workers = workers or default_workers()

    def _name(self, key: str) -> str:
        if "/" in key or not key:
            raise ValueError(f"bad chunk key {key!r}")
        return self.prefix + key

    def put(self, key, buf):
        _check_buf(buf)
        n = buf.numel()
        if self.prefix in _retired:
            return Future.failed(f"shm put {key!r}", "the deployment is gone")
        try:
            shm = shared_memory.SharedMemory(name=self._name(key), create=True, size=max(n, 1))
        except FileExistsError:
            return Future.failed(f"shm put {key!r}", "a chunk with this key is already waiting to be read")
        _untrack(shm)
        view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=n) if n else None
        if view is None:
            shm.close()
            return Future.completed(f"shm put {key!r}")
        h = self.workers.gather(buf.data_ptr(), [(0, n)], view.data_ptr())
        state = {"view": view}

        def close():
            state.pop("view", None)
            shm.close()
        return Future(f"shm put {key!r}", parts=[h], keep=[buf], cleanup=close, nbytes=n)

    def get(self, key, buf):
        _check_buf(buf)
        try:
            shm = shared_memory.SharedMemory(name=self._name(key))
        except FileNotFoundError:
            return Future.failed(f"shm get {key!r}", "no such chunk")
        _untrack(shm)
        n = shm.size if buf.numel() >= shm.size else -1
        if n < 0:
            shm.close()
            return Future.failed(f"shm get {key!r}", f"chunk is {shm.size} bytes, buffer {buf.numel()}")
        view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=n)
        h = self.workers.gather(view.data_ptr(), [(0, n)], buf.data_ptr())
        state = {"view": view}

        def close():
            state.pop("view", None)
            shm.close()
            try:  # not shm.unlink(): that would unregister from the tracker a second time
                os.unlink(os.path.join(SHM_DIR, self._name(key)))
            except FileNotFoundError:
                pass
        return Future(f"shm get {key!r}", parts=[h], keep=[buf], cleanup=close, nbytes=n)

    def size(self, key):
        path = os.path.join(SHM_DIR, self._name(key))
        return os.path.getsize(path) if os.path.exists(path) else -1


def cleanup(prefix: str) -> int:
    """Unlink every segment whose name starts with prefix; returns how many."""
    n = 0
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
        try:
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            pass
    return n


def owner_prefix(tag: str, pid: int | None = None) -> str:
    """The segment prefix of a deployment run by process `pid` (this one by default)."""
    return f"dejavu-{os.getpid() if pid is None else pid}-{tag}-"


def retire(prefix: str) -> int:
    """The deployment is gone: refuse new segments under prefix and unlink those left."""
    _retired.add(prefix)
    return cleanup(prefix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_orphans() -> int:
    """Unlink the segments of deployments whose owner process is dead; returns how many."""
    n = 0
    for path in glob.glob(os.path.join(SHM_DIR, "dejavu-*")):
        m = _OWNED.match(os.path.basename(path))
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(path)
                n += 1
            except (FileNotFoundError, PermissionError):
                pass
    return n
