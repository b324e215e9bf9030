"""`dejavu worker`: one process hosting the role objects of one pipeline stage x one TP shard.

It connects to the controller (HELLO with the cluster token), receives its configuration, builds
its roles (cluster/roles/: the stage always; prompt or token under disaggregation; replica with
`--replicate`), says READY (or ERROR with the reason) and then runs what the controller sends, in
order, through the handler table the roles fill. A worker exits when told, when its control
connection closes, or when its parent dies.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import torch

from ..models.preload import PRELOADER
from ..parallel.wire import Channel, connect
from ..serving.lifecycle import on_deployment_gone, quiet_stop_on_signals, run_deployment_cleanups
from ..kvstream.net import parse_host_port
from . import adopt
from .messages import Error, Heartbeat, MessageError, Ready, StepFailed
from .placement import RANK_ENV, env_int, worker_identity
from .roles.stage import StageRole


def _env_rank() -> int | None:
    return env_int(RANK_ENV)  # mpirun, srun, torchrun


class Worker:
    """The roles of this process and the handler table they fill (a later role's entry wins)."""

    def __init__(self, ch: Channel, cfg, rank: int):
        self.epoch = cfg.epoch  # the latest epoch heard of (_serve), kept across controllers (adopt.py)
        self.stage = StageRole(ch, cfg, rank)
        self.roles = [self.stage]
        t0 = time.perf_counter()
        replica = None
        if cfg.replicate:
            from .roles.replica import ReplicaRole

            replica = ReplicaRole(self.stage)
            self.roles.append(replica)
        if cfg.role == "prompt":
            from .roles.prompt import PromptRole

            self.roles.append(PromptRole(self.stage))
        elif cfg.role == "token":
            from .roles.token import TokenRole

            self.roles.append(TokenRole(self.stage, replica))
        self.stage.parts["roles"] = time.perf_counter() - t0  # replica (its servers and ring), prompt, token
        PRELOADER.drop_pinned()  # a standby's pinned memory for a ring no role took
        self.handlers = {}
        for role in self.roles:
            self.handlers.update(role.handlers())

    def ready_info(self) -> dict:
        info = {}
        for role in self.roles:
            info.update(role.ready_info())
        return info

    def close(self) -> None:
        for role in reversed(self.roles):  # the stage (and its torch.distributed group) last
            role.close()


def _parent_exits(parent: int, wait: float = 1.0) -> bool:
    """Whether `parent` is exiting (we are handed to another parent) within `wait` seconds."""
    deadline = time.monotonic() + wait
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _receiver(ch: Channel, stage: StageRole):
    """Messages read on their own thread (so a step's swap-in starts as it arrives), in order."""
    import queue

    inbox: queue.Queue = queue.Queue()

    def loop():
        try:
            while True:
                msg = ch.recv(None)
                try:
                    stage.on_arrival(msg)
                except Exception as e:  # noqa: BLE001 - the main loop reports it
                    inbox.put(e)
                inbox.put(msg)
                if msg.t == "shutdown":
                    return
        except (ConnectionError, OSError) as e:
            inbox.put(ConnectionError(str(e)))
    threading.Thread(target=loop, daemon=True, name="receiver").start()
    return inbox


def _heartbeat(ch: Channel, rank_of, interval: float) -> None:
    """Tell the controller we are alive every `interval` seconds (also while loading weights)."""
    def loop():
        while True:
            time.sleep(interval)
            try:
                ch.send(Heartbeat(rank=rank_of()))
            except OSError:
                return
    threading.Thread(target=loop, daemon=True, name="heartbeat").start()


REJOIN = -1  # _serve: the controller was lost and this worker waits for the next one (adopt.py)


def _serve(ch: Channel, worker: Worker, rank: int, parent: int, rejoin: float = 0.0) -> int:
    """The control loop: each message to its handler, in order, until shutdown."""
    from ..kvstream import StreamError
    from ..models.tp import TPBroken
    from ..parallel.pipe import PipeBroken

    stage = worker.stage
    ch.stamp = lambda: worker.epoch  # what we send carries the latest epoch we heard of (updated below)
    inbox = _receiver(ch, stage) if stage.swap is not None or stage.pipes is not None else None
    try:
        while True:
            msg = ch.recv(None) if inbox is None else inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            if msg.epoch < worker.epoch:  # fencing: from before an epoch we already are in
                print(f"dejavu worker: refused {msg.t!r} of epoch {msg.epoch} (now {worker.epoch})", file=sys.stderr)
                continue
            worker.epoch = msg.epoch
            if msg.t == "fenced":  # our rank went to another worker while we were cut off
                print(f"dejavu worker: fenced: rank {rank} was given to another worker in epoch {worker.epoch}; "
                      f"stopping", file=sys.stderr, flush=True)
                return 5
            if msg.t == "shutdown":
                break
            handler = worker.handlers.get(msg.t)
            if handler is None:
                continue
            try:
                handler(msg)
            except (PipeBroken, StreamError, TPBroken) as e:
                if stage.pipes is None:
                    raise
                # A neighbour, a KV peer or a TP shard died: this step is lost; the controller resets and replays.
                stage.fail_links()
                ch.send(StepFailed(rank=rank, id=getattr(msg, "id", 0), msg=str(e)))
    except MessageError as e:  # the controller sent something this worker cannot read
        try:
            ch.send(Error(rank=rank, msg=str(e)))
        except OSError:
            pass
        return 1
    except ConnectionError:
        if rejoin:
            return REJOIN
        if parent and _parent_exits(parent):
            run_deployment_cleanups()
        return 4  # the controller is gone: nothing to serve
    except Exception as e:  # noqa: BLE001
        try:
            ch.send(Error(rank=rank, msg=f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return 1
    finally:
        ch.close()
    worker.close()
    return 0


def run(controller: str, token: str, rank: int | None = None, standby: bool = False,
        advertise: str | None = None) -> int:
    host, port = parse_host_port(controller)
    rank = rank if rank is not None else _env_rank()  # None: the controller assigns one
    quiet_stop_on_signals()  # a stop signal is not a failure: lifecycle.py
    parent = int(os.environ.get("DEJAVU_PARENT_PID") or 0)
    adopt.watch_deployment(parent)  # its parent, or the front-end of a split deployment
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack (a hung worker)
    # The thread running steps must get the GIL back quickly from the helpers (replication,
    # replica holder, pipes, heartbeats): Python's default 5 ms switch interval can hold a kernel
    # launch back for most of a GPU decode step.
    sys.setswitchinterval(float(os.environ.get("DEJAVU_SWITCH_INTERVAL", "0.0005")))
    hello = {"pid": os.getpid(), "host": socket.gethostname(), **worker_identity(host, port, advertise)}
    hello.update({"standby": True} if standby else {"rank": rank})
    # a worker started by hand may come up before its controller listens
    ch = connect(host, port, token, hello, wait=float(os.environ.get("DEJAVU_CONNECT_WAIT", "60")))
    if standby:
        if os.environ.get("DEJAVU_STANDBY_DEVICE") == "cuda" and torch.cuda.is_available():
            # A warm spare: the CUDA context of every GPU it may be sent to exists before it is needed.
            for i in range(torch.cuda.device_count()):
                torch.zeros(1, device=f"cuda:{i}")
        print(f"dejavu worker: standing by for {controller}", file=sys.stderr, flush=True)
    if standby:
        from .standby import wait_for_config

        cfg = wait_for_config(ch, token)  # holding the weights it is told to in the meantime
    else:
        cfg = ch.recv(timeout=600)
    if cfg.t != "config":
        return 2
    rank = cfg.rank
    ch.stamp = lambda: cfg.epoch  # until it serves (then the latest epoch it heard of: _serve)
    if cfg.shm_prefix:  # the deployment's /dev/shm segments go with it
        from ..kvstream.shm import retire

        on_deployment_gone(lambda: retire(cfg.shm_prefix))
    worker = None
    while True:  # one controller's turn; after the first, the next controller adopts us (adopt.py)
        if cfg.heartbeat_interval:  # (also while the first turn loads the weights)
            _heartbeat(ch, lambda: rank, float(cfg.heartbeat_interval))
        if worker is None:
            try:
                worker = Worker(ch, cfg, rank)
            except Exception as e:  # noqa: BLE001 - reported to the controller, which stops everyone
                ch.send(Error(rank=rank, msg=f"{type(e).__name__}: {e}"))
                return 1
            if cfg.rejoin:
                adopt.arm()
        else:  # weights, cache and listeners kept
            worker.stage.ch = ch
        ch.send(Ready(rank=rank, **worker.ready_info()))
        code = _serve(ch, worker, rank, parent, cfg.rejoin)
        if code != REJOIN:
            return code
        print(f"dejavu worker: rank {rank} lost its controller; waiting for the next one", file=sys.stderr, flush=True)
        # (as the rank it serves: a promoted standby no longer stands by)
        ch = adopt.rejoin(host, port, token, dict(hello, rank=rank, standby=False), worker.epoch, cfg.rejoin)
        if ch is None:
            run_deployment_cleanups()
            return 4
