"""Standbys that hold stage weights ready (`--standby-weights host|device|off`).

When a standby registers (a warm spare or a `dejavu worker --standby`), the controller sends it a
`preload`: the stages it would most likely replace, most likely first. A failed rank takes a
standby on another host when there is one (placement.pick_standby), so a standby is most likely
to replace the ranks on hosts other than its own, then those on its own; and among those the
ranks that fewer other standbys hold already. The standby loads them in the background
(models/preload.py) while they fit its memory bound, and a failed rank prefers a standby that
was asked to hold its stage.
"""
from __future__ import annotations

from collections import Counter

from ..models.preload import PRELOADER, WHERE
from .messages import Preload, PreloadStage
from .placement import free_local_rank


class StandbyWeights:
    """The controller's side: what each standby was asked to hold."""

    def __init__(self, where: str):
        if where not in WHERE:
            raise ValueError(f"unknown standby_weights {where!r}; use one of {', '.join(WHERE)}")
        self.where = where
        self.asked: dict[int, list[int]] = {}  # id(its channel) -> ranks, most likely first

    def order(self, c, hello) -> list[int]:
        """The ranks a standby on hello's host would most likely replace, most likely first."""
        covered = Counter(r for ranks in self.asked.values() for r in ranks)
        info = c.worker_info
        here = hello.host_id or hello.host
        return sorted(info, key=lambda r: (covered[r], info[r].get("host_id") == here, r))

    def offer(self, c, ch, hello) -> None:
        """Tell a standby that just registered which stages to hold (nothing before start-up ends)."""
        common = c.members.common
        if self.where == "off" or not common:
            return
        info, here = c.worker_info, hello.host_id or hello.host
        stages, ranks, seen = [], self.order(c, hello), set()
        for r in ranks:
            weights = (tuple(info[r]["layers"]), info[r]["tp_rank"])
            if weights in seen:
                continue  # the same weights as a stage listed already (prompt and token stages may share them)
            seen.add(weights)
            # the GPU Recovery.assign would give it: its launcher's, else r's own on r's host, else a free one
            given = info[r]["local_rank"] if hello.local_rank is None and info[r].get("host_id") == here \
                else hello.local_rank
            live = {q: (info[q]["host_id"], info[q]["local_rank"]) for q in info if q != r}
            stages.append(PreloadStage(rank=r, layers=list(info[r]["layers"]), tp_rank=info[r]["tp_rank"],
                                       local_rank=free_local_rank(here, live, given), kv_bytes=_kv_bytes(c, r)))
        try:
            ch.send(Preload(model=common["model"], dtype=common["dtype"], device=common["device"],
                            seed=common["seed"], tp=common["tp"], where=self.where, stages=stages))
        except OSError:
            return  # gone already: found out when it is picked
        self.asked[id(ch)] = ranks

    def listing(self, standbys: list) -> list[dict]:
        """The registered standbys and the ranks each was asked to hold (/v1/cluster)."""
        return [{"pid": hello.pid, "host": hello.host, "holds": self.asked.get(id(ch), [])} for ch, hello in standbys]

    def holds(self, ch, rank: int) -> bool:
        return rank in self.asked.get(id(ch), ())

    def taken(self, ch) -> None:
        self.asked.pop(id(ch), None)


def _kv_bytes(c, rank: int) -> int:
    """The size of `rank`'s KV cache (its host copy when swapping) when a replacement restores it
    from replicas, else 0."""
    if not c.replication.enabled or not c._holds_decode_kv(rank):
        return 0
    rc = c._rank_config(rank)
    blocks = rc["swap"].host_blocks if rc.get("swap") else rc["num_blocks"]
    return blocks * c.block_bytes([c.worker_info[rank]["layers"]])


def wait_for_config(ch, token: str):
    """A standby's wait for its rank: weights to hold (`preload`) start loading in the background;
    the first other message (its `config`, or `shutdown`) is returned."""
    while True:
        msg = ch.recv(timeout=None)
        if msg.t != "preload":
            return msg
        if msg.device.startswith("cuda"):
            from .warmup import warm_up

            PRELOADER.warm_up = warm_up  # after the weights: a takeover's first steps load no kernels
        PRELOADER.start(msg, token)
