"""The front-end of a split `dejavu serve` (pipeline and disaggregated deployments): the HTTP server
runs here, the controller (the engine core: workers, dispatch, replication, recovery) in a process
of its own (serving/engine_core.py), as vLLM V1 splits its API server from EngineCore.

`RemoteEngine` is the LLMEngine face the AsyncEngine drives: it checks each request as the engine
would, keeps it in its log of admitted requests (prompt, parameters, seed, the tokens streamed so
far) and sends it to the controller over the engine link (serving/engine_link.py: a token-checked
channel of typed msgpack records). When the controller process dies (its channel closes, its
process exits, or it sends no status for `--controller-timeout` seconds), the front-end kills what is
left of it, hands the deployment to a standby controller (a process started ahead, imported and
connected) or a new one, and submits every unfinished request again with the tokens it already
streamed; the new controller re-prefills prompt + those tokens and goes on, so a client sees a
pause, then exactly the tokens of a failure-free run (greedy, or seeded sampling).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from ..engine.llm_engine import LLMEngine
from ..engine.sequence import Status as SeqStatus
from ..kvstream.auth import TOKEN_ENV, new_cluster_token
from ..kvstream.net import LOOPBACK, Address, listen
from ..cluster import adopt
from ..cluster.adopt import local_workers
from ..cluster.errors import WorkerError
from ..cluster.launch import free_port
from ..cluster.messages import unpack_tokens
from ..parallel.auth import Acceptor
from .engine_core import FRONTEND_ENV
from .engine_link import Cancel, EngineArgs, Stop, Submit, params_to_wire
from .lifecycle import spawn_blocked

log = logging.getLogger("dejavu.frontend")

# Seconds without a status before a controller counts as hung (`--controller-timeout`). Statuses are
# pushed every 0.25 s from the controller's event loop, not its engine thread, so a long step does not
# delay them: 3 s is 12 missed pushes, room for scheduler stalls of a loaded host.
CONTROLLER_SILENCE = 3.0
RESTART_ATTEMPTS = 3       # controllers started in a row before the front-end gives up


class _Blocks:
    """The controller's KV block counts as its last status gave them (AsyncEngine's gauges)."""

    def __init__(self, eng):
        self._eng = eng

    @property
    def num_used(self) -> int:
        return self._eng.status.blocks_used

    @property
    def num_blocks(self) -> int:
        return self._eng.status.blocks_total


class RemoteEngine(LLMEngine):
    def __init__(self, args: dict, config, tokenizer, model_config, timeout: float):
        self.model, self.tokenizer, self.model_config = None, tokenizer, model_config
        self.config = config.engine
        self.max_model_len = min(self.config.max_model_len or model_config.max_position, model_config.max_position)
        self.block_size = self.config.block_size
        self.num_generated = 0
        self.args, self.timeout = args, timeout
        self.silence = float(args.get("controller_timeout") or CONTROLLER_SILENCE)
        if not args.get("cluster_address"):  # a fixed address: workers dial it again to rejoin the next controller
            args["cluster_address"] = str(Address(LOOPBACK, free_port()))
        self.token = os.environ.get(TOKEN_ENV) or new_cluster_token()
        self.listener = listen(LOOPBACK, 0)
        self.address = str(Address(LOOPBACK, self.listener.getsockname()[1]))
        self.accept = Acceptor(self.listener, self.token, 1)
        self.table: dict[int, object] = {}  # the log of admitted, unfinished requests: rid -> Sequence
        self.inbox: queue.Queue = queue.Queue()
        self.allocator = _Blocks(self)
        self.restarts: list[dict] = []  # one entry per controller started after one died
        self.past = {"recoveries": [], "recomputed_tokens": 0}  # worker recoveries of controllers gone
        self.proc: subprocess.Popen | None = None
        self.standby: subprocess.Popen | None = None  # the next controller, started ahead
        self.joined: dict[int, object] = {}  # pid -> channel of a controller process not given work yet
        self.ch = None
        self.gen = 0
        self.lost: str | None = None    # why the current controller is gone (None: it is up)
        self.stopping = False
        self._start_controller()

    # ------------------------------------------------------------------ the controller process
    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ, DEJAVU_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1", **{TOKEN_ENV: self.token,
                   FRONTEND_ENV: self.address})
        with spawn_blocked():  # a stop signal to the group waits for its handlers (lifecycle.py)
            return subprocess.Popen([sys.executable, "-m", "dejavu.serving.engine_core"], env=env)

    def _start_controller(self, adopt: bool = False) -> None:
        """Give the deployment to the standby controller (or a new process), wait until it serves (and
        its first status), then start the next standby. `adopt`: it takes over the live workers of
        the one that died instead of starting new ones."""
        p, self.standby = self.standby, None
        if p is None or p.poll() is not None:
            p = self._spawn()
        self.proc = p
        deadline = time.monotonic() + self.timeout
        while p.pid not in self.joined:  # connections of our controller processes, by pid
            self._check_starting(p, deadline)
            try:
                ch, hello = self.accept.get(0.5)
            except TimeoutError:
                continue
            self.joined[hello.pid] = ch
        ch = self.joined.pop(p.pid)
        pids = [[w["rank"], w["pid"]] for w in local_workers(self.status.workers)] if adopt else None
        ch.send(EngineArgs(args=self.args, adopt=adopt, pids=pids))
        started = status = None
        while status is None:
            self._check_starting(p, deadline)
            try:
                msg = ch.recv(0.5)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                self._check_starting(p, deadline, wait=5)
                raise WorkerError("the controller closed its channel while starting") from None
            if msg.t == "engine_started":
                started = msg
            elif msg.t == "status" and started is not None:
                status = msg
        self.num_blocks, self.status = started.num_blocks, status
        self.ch, self.lost, self.gen = ch, None, self.gen + 1
        self.last_status = time.monotonic()
        threading.Thread(target=self._read, args=(ch, self.gen), daemon=True, name="controller-reader").start()
        self.standby = self._spawn()  # imported and connected, it waits for a deployment to take over

    def _check_starting(self, p: subprocess.Popen, deadline: float, wait: float = 0) -> None:
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is not None:
            raise WorkerError(f"the controller process (pid {p.pid}) exited with status {p.returncode} while starting")
        if time.monotonic() > deadline:
            raise WorkerError(f"the controller process did not start within {self.timeout}s")

    def _read(self, ch, gen: int) -> None:
        try:
            while True:
                msg = ch.recv(None)
                if msg.t == "status":
                    if gen == self.gen:  # (not a late one of a controller being replaced)
                        self.status, self.last_status = msg, time.monotonic()
                elif msg.t == "stopping":  # a stop signal reached it: the whole deployment stops
                    self.stopping = True  # its exit that follows is not a failure
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    self.inbox.put((gen, msg))
        except (ConnectionError, OSError) as e:
            self.inbox.put((gen, f"its channel closed ({e})"))

    def _check_controller(self) -> None:
        """Notice a lost controller; unless the deployment is stopping, start the next one."""
        if self.lost is None and self.proc.poll() is not None:
            self.lost = f"it exited with status {self.proc.returncode}"
        if self.lost is None and time.monotonic() - self.last_status > self.silence:
            self.lost = f"no status for {self.silence:g}s"
        if self.lost is None or self.stopping:
            return
        old, why, t0 = self.proc.pid, self.lost, time.monotonic()
        ft = self.status.fault_tolerance  # (its last status: the next controller's count from zero)
        self.past["recoveries"] += ft.get("recoveries", [])
        self.past["recomputed_tokens"] += ft.get("recomputed_tokens", 0)
        log.warning("the controller (pid %d) is lost: %s; starting a new one", old, why)
        self._end_controller()
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            # the workers rejoin; if they do not (or one of them died too), the next controller starts new ones
            adopted = attempt == 1 and adopt.adoptable(self.status)
            if not adopted:
                adopt.retire_workers(self.status.workers)
            try:
                self._start_controller(adopt=adopted)
                break
            except WorkerError as e:
                self._end_controller()
                if attempt == RESTART_ATTEMPTS:
                    raise WorkerError(f"{RESTART_ATTEMPTS} controllers in a row failed to start; last: {e}") from None
                log.warning("a new controller failed to start (%s): trying again", e)
        for seq in self.table.values():
            self._submit(seq)
        self.restarts.append({"at": time.time(), "reason": why, "old_pid": old, "pid": self.proc.pid,
                              "adopted": adopted, "requests": len(self.table), "restart_s": time.monotonic() - t0})
        log.warning("controller pid %d took over in %.2fs; %d request(s) resumed", self.proc.pid,
                    self.restarts[-1]["restart_s"], len(self.table))

    def _end_controller(self) -> None:
        """Make sure the old controller is gone (a hung one must not act again) and reap it."""
        if self.ch is not None:
            self.ch.close()
        self.gen += 1  # what its reader still queues is ignored
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    # ------------------------------------------------------------------ requests
    def _enqueue(self, seq) -> None:
        self.table[seq.seq_id] = seq
        self._submit(seq)

    def _submit(self, seq) -> None:
        if self.lost is not None:
            return  # the next controller gets it from the log
        msg = Submit(rid=seq.seq_id, prompt=seq.token_ids[:seq.num_prompt_tokens], text=seq.prompt,
                     params=params_to_wire(seq.params), seed=seq.seed, emitted=seq.output_ids)
        try:
            self.ch.send(msg)
        except OSError as e:
            self.lost = f"sending failed ({e})"

    def _finish(self, seq, reason: str) -> None:
        seq.finish_reason, seq.status = reason, SeqStatus.FINISHED
        self.table.pop(seq.seq_id, None)

    def abort(self, seq) -> None:
        if seq.finished:
            return
        self._finish(seq, "abort")
        if self.lost is None:
            try:
                self.ch.send(Cancel(rid=seq.seq_id))
            except OSError as e:
                self.lost = f"sending failed ({e})"

    def has_unfinished(self) -> bool:
        return bool(self.table)

    @property
    def waiting(self) -> range:  # AsyncEngine.queue_depth counts it
        return range(self.status.waiting)

    def step(self, wait: float = 0.05) -> list:
        self._check_controller()
        updated: dict[int, object] = {}
        try:
            item = self.inbox.get(timeout=wait)
            while True:
                self._apply(item, updated)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        return list(updated.values())

    def idle_check(self) -> None:
        self.step(wait=0)  # the idle engine loop waits for requests itself

    def _apply(self, item, updated: dict) -> None:
        gen, msg = item
        if gen != self.gen:
            return  # from a controller that is gone
        if isinstance(msg, str):
            self.lost = self.lost or msg
            return
        seq = self.table.get(msg.rid) if msg.t == "update" else None
        if seq is None:
            return  # aborted meanwhile
        if msg.error is not None:
            seq.error = msg.error
            self._finish(seq, "error")
        else:
            for e in unpack_tokens(msg.tokens, msg.logprobs):
                if isinstance(e, list):
                    seq.logprobs.append(e[1])
                    e = e[0]
                seq.token_ids.append(e)
                self.num_generated += 1
            if msg.finish is not None:
                seq.text = msg.text or ""
                self._finish(seq, msg.finish)
        updated[seq.seq_id] = seq

    # ------------------------------------------------------------------ what /v1/cluster and /metrics show
    @property
    def _needed(self) -> set:
        return set(self.status.recovering)

    def cluster(self) -> list[dict]:
        me = {"rank": None, "role": "frontend", "pid": os.getpid(), "host": socket.gethostname(), "state": "up"}
        ctl = {"rank": None, "role": "controller", "pid": self.proc.pid, "host": socket.gethostname(),
               "state": "up" if self.lost is None else "restarting", "restarts": len(self.restarts)}
        standby = self.standby
        spare = [{"rank": None, "role": "standby-controller", "pid": standby.pid, "host": socket.gethostname(),
                  "state": "up"}] if standby is not None and standby.poll() is None else []
        return [me, ctl] + spare + list(self.status.workers)

    def fault_tolerance(self) -> dict:
        """The controller's, with the worker recoveries of the controllers before it."""
        ft = dict(self.status.fault_tolerance, controller_restarts=self.restarts)
        ft["recoveries"] = self.past["recoveries"] + ft.get("recoveries", [])
        ft["failures"] = len(ft["recoveries"])
        ft["recomputed_tokens"] = self.past["recomputed_tokens"] + ft.get("recomputed_tokens", 0)
        return ft

    def prefix_cache_stats(self) -> dict | None:
        return self.status.prefix_cache

    def prefix_cache_tiers(self) -> dict | None:
        return self.status.prefix_tiers

    # ------------------------------------------------------------------ stopping
    def begin_stop(self) -> None:
        self.stopping = True
        if self.lost is None:
            try:
                self.ch.send(Stop())
            except OSError:
                pass

    def shutdown(self) -> None:
        """Stop the controller (it stops its workers) and wait for it; kill it if it hangs."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.begin_stop()
            self.ch.close()  # the controller shuts its engine down when its channel closes
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        if self.standby is not None:  # it holds nothing yet
            self.standby.kill()
            self.standby.wait()
        for ch in self.joined.values():
            ch.close()
        self.accept.close()
        self.listener.close()


class FrontEnd:
    """What ApiServer needs of an LLM (engine, tokenizer, shutdown), the engine in another process."""

    def __init__(self, args, config):
        from ..chat_template import tokenizer_for
        from ..models.loader import resolve

        config.validate()  # bad flags fail here, before any process starts
        source = resolve(config.model)
        self.tokenizer = tokenizer_for(source, config)
        plain = (type(None), bool, int, float, str)
        wire = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and
                (isinstance(v, plain) or isinstance(v, list) and all(isinstance(x, plain) for x in v))}
        self.engine = RemoteEngine(wire, config, self.tokenizer, source.config, config.parallel.worker_timeout)

    def shutdown(self) -> None:
        self.engine.shutdown()
