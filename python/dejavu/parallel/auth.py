"""The cluster token and the controller's side of the control channel's handshake.

The token is a shared secret: whoever presents it is a full member of the deployment. It never
appears on a command line (other users read argv through /proc): workers get it from the
environment (DEJAVU_CLUSTER_TOKEN) or from a file only its owner may read (--token-file).

The controller's `Acceptor` handshakes every incoming connection on a thread of its own, so a slow
or silent client never holds up the workers joining behind it: a connection that has not sent a
valid HELLO within `deadline` seconds is dropped. A HELLO is at most HELLO_MAX bytes (nothing
larger is read before the token checks out), and one whose fields are malformed (not a
messages.Hello, a rank outside [0, world)) is refused with a message naming the problem; the
deployment goes on. A HELLO without a rank (nor standby) is given one by the controller.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import threading

from ..cluster.messages import MessageError, Refused, Welcome, decode
from ..kvstream.auth import (AUTH_DEADLINE, HELLO_MAX, TOKEN_ENV, cluster_tag, derive_key,  # noqa: F401 - re-exported
                             token_matches)
from ..kvstream.net import shutdown as _shutdown
from .wire import Channel, ProtocolError

log = logging.getLogger("dejavu.auth")

MAX_PENDING = 64          # connections handshaking at once; more are closed at once


class TokenError(ValueError):
    pass


def read_token(token_file: str | None = None) -> str:
    """The cluster token: from `token_file` (which only its owner may read), else $DEJAVU_CLUSTER_TOKEN."""
    if token_file:
        try:
            st = os.stat(token_file)
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise TokenError(f"cannot read the token file {token_file}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenError(f"token file {token_file} is readable by other users (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    else:
        token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise TokenError(f"no cluster token: set {TOKEN_ENV} (or pass --token-file PATH)")
    return token


def cluster_prefix(token: str) -> str:
    return f"dejavu-{cluster_tag(token)}-"


def hello_problem(hello, world: int) -> str | None:
    """What is wrong with a (well-typed) HELLO's rank for a deployment of `world` workers, or None."""
    if hello.standby or hello.rank is None:  # no rank: the controller assigns one
        return None
    if not 0 <= hello.rank < world:
        return f"rank {hello.rank} is outside [0, {world})"
    return None


class Acceptor:
    """Accepts on `listener` until closed; each connection's HELLO is checked on its own thread and
    the accepted (Channel, messages.Hello) pairs come out of `get` in the order their handshakes completed."""

    def __init__(self, listener: socket.socket, token: str, world: int, deadline: float = AUTH_DEADLINE):
        self.listener, self.token, self.world, self.deadline = listener, token, world, deadline
        self.joined: queue.Queue = queue.Queue()
        self.refused = 0
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = False
        threading.Thread(target=self._loop, daemon=True, name="controller-accept").start()

    def get(self, timeout: float) -> tuple[Channel, dict]:
        """The next accepted worker; TimeoutError if none within `timeout` seconds."""
        try:
            return self.joined.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no worker connected within {timeout}s") from None

    def close(self) -> None:
        self._closed = True
        _shutdown(self.listener)  # wakes the accepting thread (closing alone does not)

    def _loop(self) -> None:
        self.listener.settimeout(None)
        while not self._closed:
            try:
                sock, addr = self.listener.accept()
            except OSError:  # the listener was closed
                return
            if not self._pending.acquire(blocking=False):
                self.refused += 1
                log.warning("refused a connection from %s:%s: too many handshakes pending", *addr[:2])
                sock.close()
                continue
            threading.Thread(target=self._handshake, args=(sock, addr), daemon=True, name="controller-hello").start()

    def _handshake(self, sock: socket.socket, addr) -> None:
        ch = None
        # A hard deadline for the whole HELLO (a per-read timeout alone lets a client drip bytes).
        state = {"expired": False, "done": False}
        lock = threading.Lock()

        def expire():
            with lock:
                if not state["done"]:
                    state["expired"] = True
                    _shutdown(sock)
        timer = threading.Timer(self.deadline, expire)
        timer.start()
        try:
            ch = Channel(sock, f"worker at {addr[0]}:{addr[1]}")
            try:
                raw = ch.recv_frame(self.deadline, max_frame=HELLO_MAX)
            except (ConnectionError, TimeoutError, OSError) as e:
                raise ProtocolError(f"handshake failed: {e}") from None
            # The token is checked before the HELLO is parsed any further.
            if raw.get("t") != "hello" or not token_matches(raw.get("token"), self.token):
                self._refuse(ch, "bad cluster token")
                raise ProtocolError(f"{ch.peer} presented a bad cluster token")
            try:
                msg = decode(raw)
                problem = hello_problem(msg, self.world)
            except MessageError as e:
                problem = str(e)
            if problem is not None:
                self._refuse(ch, f"malformed hello: {problem}")
                raise ProtocolError(f"{ch.peer} sent a malformed hello: {problem}")
            with lock:
                state["done"] = True
                if state["expired"]:
                    raise ProtocolError(f"{ch.peer} did not complete its hello within {self.deadline}s")
            timer.cancel()
            ch.send(Welcome())
            self.joined.put((ch, msg))
        except (ProtocolError, OSError) as e:
            self.refused += 1
            log.warning("refused a connection: %s", e)
            (ch or sock).close()
        finally:
            timer.cancel()
            self._pending.release()

    @staticmethod
    def _refuse(ch: Channel, why: str) -> None:
        try:
            ch.send(Refused(msg=why))
        except OSError:
            pass
