"""The controller's side of `--replicate`: which worker holds whose replica, and each request's
watermark (the leading tokens whose KV every stage's holder has acknowledged).

A step (or an admission) is expected on a set of ranks; once every one of them reported it
replicated (messages.Replicated), its tokens count towards the watermarks of its sequences, unless
a sequence was preempted since. The worker's side is serving/replication.py (Replicator).
"""
from __future__ import annotations

from ..cluster.messages import Replication as ReplicationMsg
from .placement import holder_ring


class Replication:
    def __init__(self, enabled: bool, stages: int, ring: list[int] | None = None, directory: str | None = None):
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
        self.ring, self.ring_given = ring, ring_given
        self.paused = False
        self.watermark: dict[int, tuple[int, int]] = {}  # seq id -> (tokens replicated on every stage, preemptions)
        self.pending: dict[int, dict] = {}               # step id -> ranks yet to acknowledge, (seq, tokens, preemptions)
        self.bytes: dict[int, int] = {}                  # per rank: bytes its replicator sent

    def place(self, stage_hosts: list[str]) -> None:
        """Once workers are placed: each stage's holder on another host where one exists
        (placement.holder_ring), unless replicate_to chose the holders."""
        if self.enabled and not self.ring_given:
            self.ring = holder_ring(stage_hosts)

    def holder_rank(self, rank: int, rc: dict, tp: int) -> int | None:
        """The rank holding `rank`'s replica (same TP rank of the ring's next stage), or None;
        `rc` is the rank's placement (role, first_rank)."""
        if not self.enabled or rc["role"] == "prompt":
            return None
        stage = (rank - rc["first_rank"]) // tp
        return rc["first_rank"] + self.ring[stage] * tp + rank % tp

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
            self.pending[step_id] = {"ranks": set(ranks), "seqs": [(s, n, s.preemptions) for s, n in seqs]}

    def watermark_of(self, s) -> int:
        """Leading tokens of `s` whose KV every stage's holder has (none since a preemption), at most
        all but the newest token."""
        w, pre = self.watermark.get(s.seq_id, (0, s.preemptions))
        return min(w, len(s) - 1) if pre == s.preemptions else 0

    def on_replicated(self, msg) -> None:
        """A worker's holder applied step `id`: once every stage has, the step's tokens count."""
        self.bytes[msg.rank] = msg.bytes
        st = self.pending.get(msg.id)
        if st is None:
            return
        st["ranks"].discard(msg.rank)
        if st["ranks"]:
            return
        del self.pending[msg.id]
        for s, n, pre in st["seqs"]:
            if not s.finished and s.preemptions == pre:
                w, _ = self.watermark.get(s.seq_id, (0, pre))
                self.watermark[s.seq_id] = (max(w, n), pre)
