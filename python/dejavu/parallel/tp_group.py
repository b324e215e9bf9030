"""Tensor-parallel groups that a worker's death does not take down with it (recovery with --tp > 1).

Each TP group (the shards of one stage) is a torch.distributed world of its own: the process's
default group, of `tp` ranks. There is no deployment-wide world, so a dead shard breaks only its
own group's collectives. A group is formed per epoch: every member joins when it is told the
epoch's neighbours (`pipes`), through a rendezvous store that the controller hosts (no member
hosts it, so none takes it down by dying), under a key prefix naming the group and the epoch. On a reset every member leaves (destroys) its group; the next epoch's `pipes` forms it
again with the replacement, whose weights and KV are the only ones reloaded.

How a survivor gets out of a collective its peer will not finish:
  - the peer died: its sockets close, and gloo's all-reduce fails at once (TPBroken, step_failed);
  - the peer lives but failed the step elsewhere (a broken pipe): it leaves the group as it reports
    the failure, which closes the group's connections and fails the survivor's all-reduce;
  - NCCL: the reset, read on the receiving thread, aborts the communicators (ProcessGroupNCCL's
    abort), so kernels waiting on a dead peer return; the watchdog is told to clean up only;
  - the group's timeout (COLLECTIVE_TIMEOUT_S at most) bounds every other wait (a hung peer on
    another host, fenced rather than killed).
"""
from __future__ import annotations

import datetime
import os
import sys

from ..kvstream.net import listen
from ..models import tp

COLLECTIVE_TIMEOUT_S = 60.0  # at most: a collective or a rendezvous waiting on a peer fails after this


def collective_timeout(worker_timeout: float) -> float:
    """The TP group's timeout: within the controller's own recovery deadline (worker_timeout)."""
    return min(COLLECTIVE_TIMEOUT_S, worker_timeout / 2)


def key_prefix(first_rank: int, epoch: int) -> str:
    """Store keys of one group (named by its first rank) in one epoch: no epoch reads another's."""
    return f"tp/{first_rank}/{epoch}/"


class RendezvousStore:
    """The controller's store for every TP group's rendezvous, bound to the controller's address
    (torch's TCPStore would listen on every interface; a listener handed to it keeps the bind)."""

    def __init__(self, bind: str, timeout: float):
        import torch.distributed as dist

        sock = listen(bind, 0)
        self.port = sock.getsockname()[1]
        self.store = dist.TCPStore(bind, self.port, is_master=True, wait_for_workers=False,
                                   master_listen_fd=sock.detach(), timeout=datetime.timedelta(seconds=timeout))

    def close(self) -> None:
        self.store = None  # the store owns the listener: it closes with it


class TPGroup:
    """One worker's membership in its TP group, epoch after epoch. join/leave run on the worker's
    main thread (between steps); abort may run on any thread."""

    def __init__(self, model, cfg, rank: int, host: str):
        self.model, self.backend = model, cfg.backend
        self.host, self.port = host, cfg.tp_store
        self.ranks = next(g for g in cfg.tp_groups if rank in g)
        self.tp_rank = self.ranks.index(rank)
        self.timeout = datetime.timedelta(seconds=collective_timeout(cfg.timeout))
        self.epoch: int | None = None  # the epoch the group is formed for; None: down
        if self.backend == "nccl":  # a failed collective must not end the process: clean up, report, go on
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")

    def join(self, epoch: int) -> None:
        """Form the group of `epoch` with its other members (each calls this for the same epoch).
        A rendezvous that fails (a member died meanwhile) leaves the group down: the next step
        fails (step_failed) and the next recovery forms it again."""
        import torch.distributed as dist

        if self.epoch == epoch:
            return
        self.leave()
        try:
            store = dist.TCPStore(self.host, self.port, is_master=False, timeout=self.timeout)
            dist.init_process_group(self.backend, store=dist.PrefixStore(key_prefix(self.ranks[0], epoch), store),
                                    rank=self.tp_rank, world_size=len(self.ranks), timeout=self.timeout)
        except (RuntimeError, ValueError, OSError) as e:
            print(f"dejavu worker: tensor-parallel group {self.ranks} of epoch {epoch} not formed: {e}",
                  file=sys.stderr, flush=True)
            return
        tp.parallelize(self.model, dist.group.WORLD)
        self.epoch = epoch

    def check(self) -> None:
        """Raise TPBroken unless the group is formed (a step on a left group is lost at once)."""
        if self.epoch is None:
            raise tp.TPBroken(f"tensor-parallel group {self.ranks} is down until the next epoch")

    def abort(self) -> None:
        """Any thread: NCCL communicators aborted, so a collective waiting on a dead peer returns
        (gloo has no abort: its peers' leave or its timeout free it)."""
        if self.epoch is not None:
            self._abort_nccl()

    def _abort_nccl(self) -> None:
        import torch.distributed as dist

        if self.backend != "nccl" or not dist.is_initialized():
            return
        try:
            dist.distributed_c10d._abort_process_group()
        except (RuntimeError, AttributeError) as e:  # best effort: destroy follows
            print(f"dejavu worker: aborting the tensor-parallel group failed: {e}", file=sys.stderr, flush=True)

    def leave(self) -> None:
        """Destroy the group (main thread, no collective running; NCCL communicators aborted, never
        waited on). Its connections close only once nothing references it (models.tp raises
        TPBroken outside the failed collective's handler, so no traceback does), hence the model
        lets go first: peers still waiting in one of its collectives then fail at once, not at the
        timeout."""
        import torch.distributed as dist

        self.epoch = None
        tp.parallelize(self.model, None)
        if not dist.is_initialized():
            return
        self._abort_nccl()
        try:
            dist.destroy_process_group()
        except RuntimeError as e:
            print(f"dejavu worker: destroying the tensor-parallel group: {e}", file=sys.stderr, flush=True)
