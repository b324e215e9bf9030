"""The controller process of a split `dejavu serve` (`python -m dejavu.serving.engine_core`, started
by serving/frontend.py): it builds the pipeline or disaggregated engine, which owns the workers,
dispatch, replication and recovery, and serves the front-end's requests over the engine link
(serving/engine_link.py). The front-end keeps one more started ahead, connected and imported, that
waits (as a standby) for the deployment until the serving one dies. It dials the front-end at $DEJAVU_FRONTEND with the cluster token
($DEJAVU_CLUSTER_TOKEN); the deployment's flags come over that channel, never on a command line.

A `submit` that carries tokens already streamed (the front-end resumes its requests after a
controller died) is re-prefilled over prompt + those tokens and continues from the next one:
greedy and seeded sampling draw the same tokens as an uninterrupted run (seeded sampling draws
from (seed, position)). It exits when the front-end's channel closes, or when the front-end dies.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading

from ..cluster import adopt
from ..cluster.errors import WorkerError
from ..cluster.messages import pack_tokens
from ..engine.llm_engine import RequestError
from ..kvstream.net import parse_host_port
from ..parallel.auth import read_token
from ..parallel.wire import connect
from .async_engine import AsyncEngine, QueueFull
from .engine_link import STATUS_INTERVAL, EngineStarted, Status, Stopping, Update, params_from_wire
from .lifecycle import STOP_SIGNALS, exit_after, on_stop_signals, watch_parent

log = logging.getLogger("dejavu.controller")
FRONTEND_ENV = "DEJAVU_FRONTEND"
STOP_GRACE_S = 10.0  # a controller being stopped that has not exited by then exits anyway


class Resuming:
    """The engine as the AsyncEngine drives it, except that a request arrives as the front-end's log
    entry (prompt ids, prompt text, seed, tokens already streamed)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add_request(self, entry, params):
        ids, text, seed, emitted = entry
        seq = self._engine.add_request(ids, params)
        seq.prompt, seq.seed = text, seed
        if emitted:  # recomputed with the prompt at its prefill; sampling goes on after them
            seq.token_ids += emitted
            seq.logprobs = [None] * len(emitted)  # keeps each new entry at its output position
        return seq


class Core:
    def __init__(self, llm, ch):
        self.llm, self.ch = llm, ch
        self.engine = AsyncEngine(Resuming(llm.engine), max_queue=1 << 30)  # the front-end bounds the queue
        self.streams: dict[int, object] = {}
        self._send_lock = threading.Lock()

    def send(self, msg) -> None:
        with self._send_lock:
            self.ch.send(msg)

    def status(self) -> Status:
        eng, gauges = self.llm.engine, self.engine.metrics.gauges  # block counts: the AsyncEngine's gauges
        used, total = gauges["dejavu_kv_blocks_used"](), gauges["dejavu_kv_blocks_total"]()
        tiers = getattr(eng, "prefix_cache_tiers", lambda: None)()
        return Status(pid=os.getpid(), workers=eng.cluster(), recovering=sorted(getattr(eng, "_needed", ())),
                      fault_tolerance=eng.fault_tolerance(), waiting=self.engine.queue_depth, blocks_used=used,
                      blocks_total=total, prefix_cache=eng.prefix_cache_stats(), prefix_tiers=tiers)

    async def run(self) -> None:
        """Serve the front-end until its channel closes, it says stop, or a stop signal comes."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def signalled():  # the deployment is being stopped: tell the front-end, stop the workers now
            self.begin_stop()
            try:
                self.send(Stopping())
            except OSError:
                pass
            exit_after(STOP_GRACE_S)
            done.set()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, signalled)
        self.send(EngineStarted(pid=os.getpid(), num_blocks=self.llm.engine.num_blocks))
        self.send(self.status())
        pusher = asyncio.create_task(self._push_status())
        # a daemon thread reads the channel: a stop signal must not wait for the front-end to close it
        threading.Thread(target=self._read, args=(loop, done), daemon=True, name="frontend-reader").start()
        try:
            await done.wait()
        finally:
            pusher.cancel()

    def _read(self, loop, done: asyncio.Event) -> None:
        while True:
            try:
                msg = self.ch.recv(None)
            except (ConnectionError, OSError) as e:  # the front-end is gone or done with us
                log.info("front-end channel closed: %s", e)
                msg = None
            try:
                loop.call_soon_threadsafe(self._handle, msg, done)
            except RuntimeError:  # the loop is closed: we are stopping
                return
            if msg is None or msg.t == "stop":
                return

    def _handle(self, msg, done: asyncio.Event) -> None:
        if msg is None:
            done.set()
        elif msg.t == "submit":
            self.streams[msg.rid] = asyncio.create_task(self._serve(msg))
        elif msg.t == "cancel":
            task = self.streams.pop(msg.rid, None)
            if task is not None:
                task.cancel()
        elif msg.t == "stop":
            self.begin_stop()
            done.set()

    def begin_stop(self) -> None:
        if hasattr(self.llm.engine, "begin_stop"):
            self.llm.engine.begin_stop()

    async def _push_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            try:
                self.send(self.status())
            except OSError:
                return
            except Exception:  # noqa: BLE001 - a status that cannot be built now is skipped
                log.exception("building the status failed")

    async def _serve(self, msg) -> None:
        """One request: submitted to the engine, its tokens (past those already streamed) sent back."""
        rid, stream = msg.rid, None
        try:
            params = params_from_wire(msg.params)
            stream = await self.engine.submit((msg.prompt, msg.text, msg.seed, msg.emitted), params)
        except (RequestError, ValueError) as e:
            return self.send(Update(rid=rid, tokens=[], error=str(e), status=400))
        except QueueFull as e:
            return self.send(Update(rid=rid, tokens=[], error=str(e), status=429))
        except RuntimeError as e:  # the engine stopped, or the request failed inside it
            return self.send(Update(rid=rid, tokens=[], error=str(e), status=500))
        pos, sent = 0, len(msg.emitted)  # updates' tokens start at output 0; the front-end has `sent`
        try:
            while True:
                kind, *rest = await stream.updates.get()
                if kind == "error":
                    return self.send(Update(rid=rid, tokens=[], error=rest[0], status=rest[1]))
                new, finished = rest
                seq = stream.seq
                first, pos = max(pos, sent), pos + len(new)
                out = seq.output_ids[first:pos]
                lps = None
                if seq.params.logprobs is not None:
                    _, lps = pack_tokens([[t, e] for t, e in zip(out, seq.logprobs[first:pos])])
                if out or finished:
                    self.send(Update(rid=rid, tokens=out, logprobs=lps, finish=seq.finish_reason if finished else None,
                                     text=seq.text if finished else None))
                sent = max(sent, pos)
                if finished:
                    return
        except asyncio.CancelledError:
            self.engine.abort(stream)
        finally:
            self.streams.pop(rid, None)


def _give_up(signum, frame) -> None:
    """SIGTERM / SIGINT while the engine starts: give up (run() handles them once it serves)."""
    exit_after(STOP_GRACE_S)
    raise KeyboardInterrupt


def _take_deployment():
    """Dial the front-end, wait for the deployment (a standby waits until it is needed), build it."""
    from .. import llm as _llm  # noqa: F401 - imported ahead: a standby takes over without importing
    from ..cli.common import llm_from_args
    from ..cluster.policies import disagg as _disagg  # noqa: F401

    host, port = parse_host_port(os.environ[FRONTEND_ENV])
    ch = connect(host, port, read_token(), {"pid": os.getpid(), "host": socket.gethostname()}, wait=10)
    msg = ch.recv(None)
    if msg.t != "engine_args":
        print(f"dejavu controller: expected the deployment's arguments, got {msg.t!r}", file=sys.stderr)
        return None, ch
    if msg.adopt:
        adopt.expect_workers({r: pid for r, pid in msg.pids or ()})
    return llm_from_args(argparse.Namespace(**msg.args)), ch


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = int(os.environ.get("DEJAVU_PARENT_PID") or 0)
    if parent:
        watch_parent(parent)  # the front-end died: we go too (and our workers after us)
        os.environ[adopt.FRONTEND_PID_ENV] = str(parent)  # our workers outlive us, not the front-end
    try:
        on_stop_signals(_give_up)  # (a stop signal pending since the fork is raised here)
        llm, ch = _take_deployment()
    except (KeyboardInterrupt, ConnectionError):  # stopped (or the front-end went) before serving
        return 0
    except WorkerError as e:  # (the front-end says why it starts the next one; this says what failed)
        print(f"dejavu controller: {e}", file=sys.stderr, flush=True)
        return 1
    if llm is None:
        return 2
    core = Core(llm, ch)
    try:
        asyncio.run(core.run())
    finally:
        core.begin_stop()
        core.engine.shutdown()
        llm.shutdown()
        ch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
