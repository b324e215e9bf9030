"""The controller's side of `--replicate`: which workers hold whose replicas (`replicas` holders
per worker, `--replicas`), and each request's watermark (the leading tokens whose KV every holder
of every stage has acknowledged).

A step (or an admission) is expected on a set of ranks; once every one of them reported it
replicated to each of its holders (messages.Replicated, `holder` saying which), its tokens count
towards the watermarks of its sequences, unless a sequence was preempted since. The watermark is
the least of all holders', so a worker that dies together with some of its holders resumes from
any holder left. The worker's side is serving/replication.py (Replicator).
"""
from __future__ import annotations

from ..cluster.messages import Replication as ReplicationMsg
from .placement import holder_rings


class Replication:
    def __init__(self, enabled: bool, stages: int, ring: list[int] | None = None, directory: str | None = None,
                 replicas: int = 1):
        self.enabled, self.dir = bool(enabled), directory
        # the stages that hold decode KV (the pipeline, or the token pipeline); stage i replicates to ring[i]
        ring_given = ring is not None
        ring = ring if ring is not None else [(i + 1) % stages for i in range(stages)]
        if self.enabled:
            if stages < 2:
                raise ValueError("replicate needs at least 2 stages holding KV (each replicates to another)")
            if len(ring) != stages or any(not 0 <= h < stages or h == i for i, h in enumerate(ring)):
                raise ValueError(f"replicate_to must name, for each of the {stages} stages, another stage in "
                                 f"[0, {stages}); got {ring}")
            if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas < stages:
                raise ValueError(f"replicas must be an integer in [1, {stages - 1}] (holders per worker, each "
                                 f"another of the {stages} stages), got {replicas!r}")
        self.replicas = replicas if self.enabled else 1
        # rings[k][i]: the stage holding stage i's k-th replica (ring: the first holders)
        self.ring, self.ring_given = ring, ring_given
        self.rings = [ring] + (holder_rings(["h"] * stages, self.replicas, ring)[1:] if self.enabled else [])
        self.paused = False
        self.watermark: dict[int, tuple[int, int]] = {}  # seq id -> (tokens replicated on every stage, preemptions)
        self.pending: dict[int, dict] = {}               # step id -> ranks yet to acknowledge, (seq, tokens, preemptions)
        self.bytes: dict[tuple[int, int], int] = {}      # per (rank, holder): bytes its replicator sent

    def place(self, stage_hosts: list[str]) -> None:
        """Once workers are placed: each stage's holders on other hosts where they exist
        (placement.holder_rings), the first ones as replicate_to says when given."""
        if self.enabled:
            self.rings = holder_rings(stage_hosts, self.replicas, self.ring if self.ring_given else None)
            self.ring = self.rings[0]

    def holder_ranks(self, rank: int, rc: dict, tp: int) -> list[int]:
        """The ranks holding `rank`'s replicas, first to last (same TP rank of each holder stage);
        none for a prompt worker. `rc` is the rank's placement (role, first_rank)."""
        if not self.enabled or rc["role"] == "prompt":
            return []
        stage = (rank - rc["first_rank"]) // tp
        return [rc["first_rank"] + ring[stage] * tp + rank % tp for ring in self.rings]

    def command(self, on: bool, every: int) -> ReplicationMsg:
        """Pause or resume (checked here; sent by the controller to every replicating worker)."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not self.enabled:
            raise ValueError("this deployment does not replicate (replicate=True)")
        return ReplicationMsg(on=bool(on), every=every)

    def expect(self, step_id: int, ranks, seqs) -> None:
        """Step `step_id` leaves each (sequence, n) with n tokens of KV on `ranks`: once all of them
        report it replicated, n counts towards the sequence's watermark."""
        if self.enabled and not self.paused:
            self.pending[step_id] = {"ranks": {(r, k) for r in ranks for k in range(self.replicas)},
                                     "seqs": [(s, n, s.preemptions) for s, n in seqs]}

    def watermark_of(self, s) -> int:
        """Leading tokens of `s` whose KV every stage's holder has (none since a preemption), at most
        all but the newest token."""
        w, pre = self.watermark.get(s.seq_id, (0, s.preemptions))
        return min(w, len(s) - 1) if pre == s.preemptions else 0

    def on_replicated(self, msg) -> None:
        """One of a worker's holders applied step `id`: once every holder of every stage has, the
        step's tokens count."""
        self.bytes[(msg.rank, msg.holder)] = msg.bytes
        st = self.pending.get(msg.id)
        if st is None:
            return
        st["ranks"].discard((msg.rank, msg.holder))
        if st["ranks"]:
            return
        del self.pending[msg.id]
        for s, n, pre in st["seqs"]:
            if not s.finished and s.preemptions == pre:
                w, _ = self.watermark.get(s.seq_id, (0, pre))
                self.watermark[s.seq_id] = (max(w, n), pre)
