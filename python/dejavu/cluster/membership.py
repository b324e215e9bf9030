"""Membership and health: which worker holds which rank, where it is, and whether it lives.

The controller listens for workers (each HELLO checked against the cluster token, parallel.auth),
gives each a rank, its configuration and its local rank, and waits for READY. From then on every
worker's control connection is read on a thread of its own into one inbox; a worker silent for the
heartbeat timeout, or whose connection or process is gone, is a failure (recovery.Failure). After
start-up, replacements and standbys connect at any time (Joined). The epoch counts recoveries:
every message carries it, and a worker's message from an older epoch is ignored.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import secrets
import threading
import time

import torch

from ..kvstream.net import LOOPBACK, WILDCARDS, Address, listen, parse_host_port
from ..parallel.auth import TOKEN_ENV, Acceptor, cluster_prefix
from . import adopt, health, placement
from .errors import WorkerError
from .messages import Config, MessageError, Pipes, ReplicateConfig, Shutdown
from .recovery import Failure, Stopped

log = logging.getLogger("dejavu.pipeline")


@dataclasses.dataclass
class Dead:
    """Internal (never on the wire): a worker's control connection broke."""
    rank: int
    msg: str
    t: str = "dead"


@dataclasses.dataclass
class Joined:
    """Internal (never on the wire): a worker connected after start-up (a replacement or a standby)."""
    ch: object
    hello: object
    t: str = "joined"


def new_rank(m, hello) -> int | None:
    """The rank a worker connecting at start-up takes (no rank given: the lowest one free), or None:
    it is turned away."""
    world = m.c.world
    rank = hello.rank if hello.rank is not None else min(set(range(world)) - set(m.channels))
    if hello.standby or rank in m.channels or hello.adopt:
        log.warning("refused a worker announcing %s while starting: expected a new rank in [0, %d)",
                    "standby" if hello.standby else f"rank {rank}" + (" (rejoining)" if hello.adopt else ""), world)
        return None
    return rank


class Membership:
    """The workers of one controller `c` (which supplies the layout: rank_config, world, tp, and
    the hooks it reacts with)."""

    def __init__(self, controller, cluster_address: str | None, hb_interval: float, hb_timeout: float):
        self.c = controller
        self.hb_interval, self.hb_timeout = hb_interval, hb_timeout
        # The cluster token: the operator's (external workers started with it), else a new one.
        self.token = os.environ.get(TOKEN_ENV) or secrets.token_hex(16)
        bind, port = parse_host_port(cluster_address) if cluster_address else (LOOPBACK, 0)
        self.listener = listen(bind, port)
        self.bind, self.tp_store = bind, None
        self.port = self.listener.getsockname()[1]
        self.accept = Acceptor(self.listener, self.token, controller.world)  # HELLOs, each on a thread of its own
        # what workers dial (those started here, when the controller listens on every interface)
        self.controller_addr = str(Address(LOOPBACK if bind in WILDCARDS else bind, self.port))
        self.channels: dict = {}               # rank -> its control channel
        self.worker_info: dict[int, dict] = {}  # rank -> where it is, its role, its listeners' ports
        self.ipc: dict[int, dict] = {}         # CUDA IPC handles of token workers' caches
        self.inbox: queue.Queue = queue.Queue()
        self.gen: dict[int, int] = {}          # rank -> its reader's generation (a replaced worker's is stale)
        self.last_seen: dict[int, float] = {}
        self.standbys: list = []               # (channel, hello) of workers standing by
        self.needed: set[int] = set()          # ranks being replaced
        self.fenced: list = []                 # channels of replaced workers that may still live (recovery.fence)
        self.epoch = 0
        self.started = False
        self.common: dict = {}                 # every worker's Config fields that do not depend on its rank

    # ------------------------------------------------------------------ start-up
    def rendezvous(self, spec, device, dtype, seed) -> None:
        """Every rank connects, is placed and configured, and reports READY. Taking over from a
        controller that died (adopt.pending), each rank's live worker rejoins instead (adopt.py)."""
        c, adopting = self.c, adopt.pending()
        wait = adopt.ADOPT_WAIT_S if adopting else c.timeout
        deadline, epochs = time.monotonic() + wait, []
        while len(self.channels) < c.world:
            health.check_procs(self)
            if adopting:
                adopt.check_missing(self)
            try:
                ch, hello = self.accept.get(min(0.25, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise WorkerError(f"only {len(self.channels)} of {c.world} workers "
                                      f"{'rejoined' if adopting else 'connected'} within {wait}s") from None
                continue
            if hello.standby and c.ft:  # an external standby started with the workers: kept for later
                self.standbys.append((ch, hello))
                continue
            rank = adopt.rejoining_rank(self, hello) if adopting else new_rank(self, hello)
            if rank is None:  # refused; the deployment goes on starting
                adopt.turn_away(ch, hello)
                continue
            epochs.append(hello.epoch)
            self.admit(rank, ch, hello)
        self.settle(spec, device, dtype, seed)
        if adopting:  # above every worker's epoch: the old controller's messages are stale from now on
            self.epoch, deadline = max(epochs) + 1, time.monotonic() + c.timeout
        else:
            for rank, ch in self.channels.items():
                ch.send(self.config_for(rank))
        for ch, hello in self.standbys:  # standbys started with the workers
            c.recovery.weights.offer(c, ch, hello)
        for rank, ch in self.channels.items():
            self.start_reader(rank, ch)
        ready, resetting = set(), adopt.reset_workers(self) if adopting else set()
        while len(ready) < c.world or resetting:
            msg = self.next_message(deadline, "adopting workers" if adopting else "starting")
            if msg.t == "ready":
                ready.add(msg.rank)
                self.on_ready(msg)
            elif msg.t == "reset_done" and msg.epoch == self.epoch:
                resetting.discard(msg.rank)
        self.begin_serving()
        workers = ", ".join(f"{i['worker']} (pid {i['pid']}) layers {i['layers']}"
                            for _, i in sorted(self.worker_info.items()))
        if adopting:
            log.warning("adopted %d live workers in epoch %d: %s", c.world, self.epoch, workers)
        else:
            log.info("%d workers ready (TP %d): %s", c.world, c.tp, workers)

    def admit(self, rank: int, ch, hello) -> None:
        """`rank`'s worker is in (its HELLO): its channel, role, layers and where it is."""
        c = self.c
        self.channels[rank] = ch
        rc = c._rank_config(rank)
        stage = (rank - rc["first_rank"]) // c.tp
        self.worker_info[rank] = {"pid": hello.pid, "host": hello.host, "role": rc["role"], "stage": stage,
                                  "tp_rank": rank % c.tp, "worker": rc["worker_name"], "layers": rc["layers"][stage]}
        self.place(rank, hello)

    def settle(self, spec, device, dtype, seed) -> None:
        """Every rank is in: local ranks, replica holders, the Config fields they share."""
        c = self.c
        hosts = {r: i["host_id"] for r, i in self.worker_info.items()}
        for r, lr in placement.local_ranks(hosts, {r: i["local_rank"] for r, i in self.worker_info.items()}).items():
            self.worker_info[r]["local_rank"] = lr
        self.place_holders()
        self.common = self.common_config(spec, device, dtype, seed)
        if c.ft and c.tp > 1:  # each TP group forms anew every epoch, through a store here (parallel/tp_group.py)
            from ..parallel.tp_group import RendezvousStore

            self.tp_store = RendezvousStore(self.bind, c.timeout)
            self.common["tp_store"] = self.tp_store.port

    def begin_serving(self) -> None:
        """Every worker is ready: the pipes, later joiners and warm spares (fault tolerance), the hook."""
        c = self.c
        self.started = True
        if c.ft:
            for rank in range(c.world):
                self.channels[rank].send(self.pipes_msg(rank))
            threading.Thread(target=self._acceptor, daemon=True, name="controller-accept").start()
            c.launcher.spawn_spares(c.recovery.spares)
        c._after_ready()

    def common_config(self, spec, device, dtype, seed) -> dict:
        """Every worker's Config fields that do not depend on its rank."""
        c = self.c
        backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= c.world else "gloo"
        master = str(Address(self.worker_info[0]["addr"], self.worker_info[0]["dist_port"]))
        return {"model": spec, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                "seed": seed, "tp": c.tp, "block_size": c.block_size, "master": master,
                "world": c.world, "backend": backend, "timeout": c.timeout,
                "tp_groups": c._tp_groups(), "kv_token": self.token, "pipes": c.ft,
                "heartbeat_interval": self.hb_interval if c.ft else 0}

    def config_for(self, rank: int, epoch: int = 0) -> Config:
        c = self.c
        rc = c._rank_config(rank)
        rep = None
        if c.replication.enabled and rc["role"] != "prompt":
            rep = ReplicateConfig(dir=c.replication.dir, prefix=cluster_prefix(self.token),
                                  replicas=c.replication.replicas)
        info = self.worker_info[rank]
        # Under a split front-end, workers outlive their controller and rejoin the next (adopt.py).
        rejoin = adopt.REJOIN_S if c.ft and os.environ.get(adopt.FRONTEND_PID_ENV) else 0.0
        return Config(**self.common, rank=rank, **rc, replicate=rep, epoch=epoch, kv_host=info["addr"],
                      local_rank=info["local_rank"], rejoin=rejoin)

    def place(self, rank: int, hello) -> None:
        """Where `rank`'s worker is (its HELLO): the address its peers dial, its host."""
        self.worker_info[rank].update(pid=hello.pid, host=hello.host, addr=hello.addr or LOOPBACK,
                                      host_id=hello.host_id or hello.host, local_rank=hello.local_rank,
                                      dist_port=hello.dist_port)

    def place_holders(self) -> None:
        """Each stage's replica holder on another host whenever one exists (unless replicate_to says)."""
        c = self.c
        first = min(r for r in range(c.world) if c._holds_decode_kv(r))
        c.replication.place([self.worker_info[first + s * c.tp]["host_id"] for s in range(c.pp)])

    def address(self, rank: int, port_key: str) -> list:
        """[host, port] where peers reach `rank`'s listener `port_key` (pipe_port, replica_port, kv_port)."""
        return [self.worker_info[rank]["addr"], self.worker_info[rank][port_key]]

    def on_ready(self, msg) -> None:
        info = self.worker_info[msg.rank]
        for k in ("kv_port", "pipe_port", "replica_port", "load_s", "weights"):
            if getattr(msg, k) is not None:
                info[k] = getattr(msg, k)
        if msg.ipc is not None:
            self.ipc[msg.rank] = msg.ipc

    def pipes_msg(self, rank: int) -> Pipes:
        """Rank's neighbours in its pipeline (and its replica holders) for the current epoch."""
        c = self.c
        rc = c._rank_config(rank)
        stage = (rank - rc["first_rank"]) // c.tp
        nxt = rank + c.tp if stage < rc["pp"] - 1 else None
        holders = [self.address(h, "replica_port") for h in c.holder_ranks(rank)]
        return Pipes(epoch=self.epoch, prev=rank - c.tp if stage > 0 else None,
                     next=self.address(nxt, "pipe_port") + [nxt] if nxt is not None else None,
                     holders=holders or None)

    # ------------------------------------------------------------------ reading the workers
    def start_reader(self, rank: int, ch) -> None:
        gen = self.gen[rank] = self.gen.get(rank, 0) + 1
        ch.stamp = lambda: self.epoch  # every message to a worker carries the current epoch
        self.last_seen[rank] = time.monotonic()
        threading.Thread(target=self._reader, args=(rank, ch, gen), daemon=True, name=f"worker{rank}-reader").start()

    def _reader(self, rank, ch, gen) -> None:
        try:
            while True:
                try:
                    msg = ch.recv(None)
                except MessageError as e:  # refused: the worker is cut off (and replaced) like a dead one
                    log.warning("worker %d sent a malformed message (%s): closing its connection", rank, e)
                    ch.close()
                    raise ConnectionError(f"malformed message: {e}") from None
                if gen != self.gen.get(rank):
                    continue  # a replaced (fenced) worker: read until it goes, heed nothing
                self.last_seen[rank] = time.monotonic()
                if msg.t == "hb":
                    continue
                if msg.epoch < self.epoch and msg.t not in ("ready", "error"):
                    continue  # refused: sent before the worker heard of the last recovery (stale)
                if hasattr(msg, "rank"):
                    msg.rank = rank  # a worker speaks for its own rank only
                self.inbox.put((rank, gen, msg))
        except (ConnectionError, OSError) as e:
            if not self.c._closed:
                self.inbox.put((rank, gen, Dead(rank=rank, msg=str(e))))

    def _acceptor(self) -> None:
        """After start-up: replacement workers and standbys connect at any time."""
        while not self.c._closed:
            try:
                ch, hello = self.accept.get(1.0)
            except TimeoutError:
                continue
            self.inbox.put((None, None, Joined(ch=ch, hello=hello)))

    def next_message(self, deadline: float, doing: str):
        """The next message the caller must see (the controller's classify handles the rest); checks
        processes and heartbeats while none comes."""
        c = self.c
        while True:
            if c._stopping:
                raise Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"workers did not answer within {c.timeout}s while {doing}")
            try:
                item = self.inbox.get(timeout=min(left, 0.25 if c.ft else 1.0))
            except queue.Empty:
                health.check_procs(self)
                health.check_heartbeats(self)
                continue
            msg = c.dispatch.classify(item, doing)
            if msg is not None:
                return msg

    def drain(self, doing: str) -> None:
        """Handle every message already in the inbox (while no request runs)."""
        try:
            while True:
                self.c.dispatch.classify(self.inbox.get_nowait(), doing)
        except queue.Empty:
            pass

    def check_dead(self, msg: Dead, doing: str) -> None:
        if self.c._stopping:
            raise Stopped()
        if self.c.ft and self.started:
            raise Failure({msg.rank}, f"worker {msg.rank} disconnected: {msg.msg}")
        raise WorkerError(f"worker {msg.rank} disconnected while {doing}: {msg.msg}")

    def on_joined(self, msg: Joined) -> bool:
        """A connection after start-up: a standby joins the pool; a replacement for a rank we wait
        for is taken (returned to the recovery loop); anything else is turned away."""
        ch, hello = msg.ch, msg.hello
        if hello.standby or hello.rank is None:  # after start-up a worker without a rank stands by
            self.standbys.append((ch, hello))
            log.info("standby worker registered (pid %s on %s)", hello.pid, hello.host)
            if not self.needed:  # (while recovering it is most likely given a rank at once)
                self.c.recovery.weights.offer(self.c, ch, hello)  # the stages it would most likely replace
            return bool(self.needed)
        if hello.rank in self.needed and hello.rank not in self.channels and not hello.adopt:
            return True
        adopt.turn_away(ch, hello)
        log.warning("turned away a worker announcing rank %s: no such rank is being replaced", hello.rank)
        return False

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Tell every worker and standby to exit (the launcher then stops the processes: close)."""
        standbys = list(self.standbys)
        while True:  # standbys that registered while nothing read the inbox
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[2].t == "joined":
                standbys.append((item[2].ch, item[2].hello))
        while True:  # and those accepted that nothing took yet
            try:
                standbys.append(self.accept.joined.get_nowait())
            except queue.Empty:
                break
        for ch, _ in standbys + [(ch, None) for ch in self.channels.values()]:
            try:
                ch.send(Shutdown())
            except OSError:
                pass

    def close(self) -> None:
        for ch in list(self.channels.values()) + self.fenced:
            ch.close()
        self.accept.close()
        self.listener.close()
        if self.tp_store is not None:
            self.tp_store.close()

    def cluster(self) -> list[dict]:
        return [{"rank": r, **info} for r, info in sorted(self.worker_info.items())]
