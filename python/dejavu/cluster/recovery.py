"""Recovery from worker failures: replace the dead workers (a standby, a warm spare or a new
process, by the policy), reset the survivors, re-form the pipes, restore the replacements' KV from
a replica holder that survived (`--replicas` of them per worker), and resume every request from
its watermark (or from its prompt without replication). A replacement that dies while starting is tried again, up to REPLACE_ATTEMPTS times.
"""
from __future__ import annotations

import logging
import os
import time

from ..kvstream.select import host_id
from .errors import WorkerError
from .placement import free_local_rank, pick_standby
from .standby import StandbyWeights
from .messages import Fenced, Rereplicate, Reset, Restore, RestoreSeq

log = logging.getLogger("dejavu.recovery")

RECOVERY = ("auto", "respawn", "standby", "wait", "off")
REPLACE_ATTEMPTS = 3  # replacement workers tried per failed rank in one recovery


class Failure(Exception):
    """Workers died (or a step failed on a broken link); the controller recovers."""

    def __init__(self, dead: set[int], reason: str):
        super().__init__(reason)
        self.dead, self.reason = set(dead), reason


class Stopped(Exception):
    """The deployment is being stopped (begin_stop); every request ends now."""


def recovery_policy(recovery: str, launcher: str, replicate: bool) -> str:
    """The policy `recovery` stands for ("auto": respawn locally, wait for external workers)."""
    if recovery not in RECOVERY:
        raise ValueError(f"unknown recovery {recovery!r}; use one of {', '.join(RECOVERY)}")
    if recovery == "auto":
        recovery = "wait" if launcher == "external" else "respawn"
    if replicate and recovery == "off":
        raise ValueError("replicate needs recovery (respawn, standby or wait), not 'off'")
    return recovery


class Recovery:
    def __init__(self, controller, policy: str, spare_workers: int, standby_weights: str = "host"):
        if not isinstance(spare_workers, int) or spare_workers < 0:
            raise ValueError(f"spare_workers must be an integer >= 0, got {spare_workers!r}")
        self.c, self.policy = controller, policy
        # respawn: keep warm spares (started, imported, registered as standbys) to take over at once
        self.spares = spare_workers if policy == "respawn" else 0
        self.weights = StandbyWeights(standby_weights)  # what each standby holds ready (standby.py)
        self.failures: list[dict] = []       # one entry per recovery (see recover)
        self.recomputed_tokens = 0
        self.attempts: dict[int, int] = {}   # replacements started per rank in the current recovery

    def replace(self, rank: int) -> None:
        """Stop a failed worker for good and bring in its replacement (by the recovery policy)."""
        c = self.c
        ch = c.channels.pop(rank, None)
        c._gen[rank] = c._gen.get(rank, 0) + 1  # its messages still queued are ignored
        if ch is not None:
            self.fence(rank, ch)
        p = c.launcher.proc_of.pop(rank, None)
        if p is not None:
            c.launcher.reap(p, wait=False)  # killed now; reaped beside the replacement's start
        elif p is None and c.worker_info.get(rank, {}).get("host_id") == host_id():
            try:  # a hung worker we did not start ourselves (mpirun) on this host: make sure it is gone
                os.kill(int(c.worker_info[rank]["pid"]), 9)
            except (OSError, TypeError, ValueError):
                pass
        c._needed.add(rank)
        self.bring_in(rank)

    def fence(self, rank: int, ch) -> None:
        """The old worker of `rank` may still live (cut off by a partition, hung): it is told it was
        fenced, and its connection stays open until shutdown, so the message reaches it when the
        partition heals (closing would race the notice with a reset)."""
        if ch.send_nowait(Fenced(rank=rank, epoch=self.c._epoch)):
            self.c._fenced.append(ch)
        else:
            ch.close()

    def bring_in(self, rank: int) -> None:
        """Start `rank`'s next replacement by the recovery policy: a standby, a warm spare still
        starting, or a new process; after REPLACE_ATTEMPTS of them in one recovery, give up."""
        c = self.c
        name = c.worker_info[rank]["worker"]
        n = self.attempts[rank] = self.attempts.get(rank, 0) + 1
        if n > REPLACE_ATTEMPTS:
            raise WorkerError(f"worker {name} (rank {rank}) could not be replaced: {REPLACE_ATTEMPTS} replacements "
                              f"died while starting")
        held = lambda ch: self.weights.holds(ch, rank)  # noqa: E731
        while self.policy in ("respawn", "standby") and c._standbys:
            try:  # preferably from another host than the failed worker's
                self.assign(rank, *c._standbys.pop(pick_standby(c._standbys, {c.worker_info[rank]["host_id"]}, held)))
                return
            except OSError:  # that standby is gone: try the next
                c.channels.pop(rank, None)
        if self.policy == "respawn" and c.launcher.spares_starting() >= len(self.unserved()):
            return  # enough warm spares are still starting: each takes a rank when it registers
        if self.policy == "respawn":
            c.launcher.spawn_rank(rank)
        else:
            log.warning("worker %s (rank %d) is down: start `dejavu worker --controller %s --rank %d` (token in "
                        "DEJAVU_CLUSTER_TOKEN) or `dejavu worker --standby`", name, rank, c.controller_addr, rank)

    def unserved(self) -> list[int]:
        """Ranks being replaced that have neither a connection nor a process of their own yet."""
        c = self.c
        return sorted(r for r in c._needed if r not in c.channels and r not in c.launcher.proc_of)

    def respawn_unserved(self) -> None:
        """While recovering: ranks waiting for warm spares that died meanwhile get other replacements."""
        c = self.c
        if self.policy != "respawn":
            return
        unserved = self.unserved()
        for rank in unserved[c.launcher.spares_starting():]:
            self.bring_in(rank)

    def assign(self, rank: int, ch, hello) -> None:
        c = self.c
        c.launcher.take_spare(hello.pid, rank)
        self.weights.taken(ch)
        c.channels[rank] = ch
        c._place(rank, hello)
        live = {r: (c.worker_info[r]["host_id"], c.worker_info[r]["local_rank"]) for r in c.channels if r != rank}
        c.worker_info[rank]["local_rank"] = free_local_rank(hello.host_id or hello.host, live, hello.local_rank)
        ch.send(c._config_for(rank, epoch=c._epoch))
        c._start_reader(rank, ch)

    def recover(self, dead: set[int], reason: str) -> None:
        """Replace dead workers, re-form the pipes, restore their KV from the replicas, and resume
        every request from its watermark (or from its prompt without replication)."""
        c = self.c
        if c._stopping:
            raise Stopped()
        self.attempts = {}
        t0 = time.monotonic()
        # detect_s: since the dead ranks were last heard from (detection, plus up to one heartbeat interval)
        heard = [c._last_seen[r] for r in dead if r in c._last_seen]
        event = {"at": time.time(), "reason": reason, "ranks": sorted(dead),
                 "workers": [c.worker_info[r]["worker"] for r in sorted(dead)],
                 "detect_s": t0 - max(heard) if heard else 0.0}
        log.warning("recovering: %s", reason)
        drop = c._abandon_inflight()
        c.reset_prefix_cache()  # a replaced worker's cached blocks are gone
        c._epoch += 1
        c.dispatch.new_epoch()
        resetting = set()
        for r in sorted(dead):
            self.replace(r)
        for r in sorted(set(c.channels) - dead):
            try:
                c.channels[r].send(Reset(epoch=c._epoch, drop_keys=drop))
                resetting.add(r)
            except OSError:
                dead.add(r)
                self.replace(r)
        deadline = time.monotonic() + c.timeout
        while c._needed or resetting:
            try:
                msg = c._next_message(deadline, "recovering from a failure")
            except Failure as f:
                # Another worker died meanwhile, or a replacement did (then the next one is tried).
                for r in sorted(f.dead):
                    dead.add(r)
                    resetting.discard(r)
                    self.replace(r)
                event["reason"] += f"; {f.reason}"
                continue
            t = msg.t
            if t == "reset_done" and msg.epoch == c._epoch:
                resetting.discard(msg.rank)
                event["reset_s"] = time.monotonic() - t0  # the last survivor's reset
            elif t == "joined":
                ch, hello = msg.ch, msg.hello
                if hello.standby or hello.rank is None:
                    # not a rank whose own replacement process is starting (it takes that one)
                    waiting = sorted(r for r in c._needed if r not in c.channels and r not in c.launcher.proc_of)
                    if waiting:  # else it stays a standby (membership.on_joined listed it)
                        c._standbys.remove((ch, hello))
                        self.assign(waiting[0], ch, hello)
                else:
                    self.assign(hello.rank, ch, hello)
            elif t == "ready" and msg.rank in c._needed:
                c._needed.discard(msg.rank)
                c._on_ready(msg)
                event["ready_s"] = time.monotonic() - t0  # the last replacement's READY
                event["weights_s"] = max(event.get("weights_s", 0.0), msg.load_s)
                _merge_parts(event, "ready_parts", msg.parts)
                event["weights_from"] = msg.weights or "load"  # host / device: a standby's preload
        event["respawn_s"] = time.monotonic() - t0
        event["ranks"] = sorted(dead)  # including those found dead while recovering
        event["workers"] = [c.worker_info[r]["worker"] for r in sorted(dead)]
        for r in range(c.world):
            c.channels[r].send(c._pipes_msg(r))
        t1 = time.monotonic()
        bad = self.restore_kv(dead, event) if c.replication.enabled else set()
        event["kv_fetch_s"] = time.monotonic() - t1
        c._after_recovery(dead)
        recomputed = 0
        kv_lost = any(c._holds_decode_kv(r) for r in dead)
        for s in c._token_side():
            n = len(s) - 1  # tokens whose KV existed before the failure (the newest one's comes next)
            if not kv_lost:  # a prompt worker or a link failed: the decode caches are intact
                s.num_cached = min(s.num_cached, n)
                continue
            w = c.replication.watermark_of(s) if c.replication.enabled and s.seq_id not in bad else 0
            if not c.replication.enabled:
                # The paper's baseline: start over from the prompt (tokens already streamed to the client
                # are regenerated identically and not sent again).
                s.token_ids = s.token_ids[:s.num_prompt_tokens]
            s.num_cached = w
            c.replication.watermark[s.seq_id] = (w, s.preemptions)
            recomputed += max(0, n - w)
        self.recomputed_tokens += recomputed
        event.update(total_s=time.monotonic() - t0, recomputed_tokens=recomputed, bad_replicas=len(bad),
                     replicated=c.replication.enabled)
        self.failures.append(event)
        if c._token_side():  # the first step after it is timed (dispatch.py)
            c.dispatch.resumed = (time.monotonic(), event)
        c.launcher.spawn_spares(self.spares)  # top the warm spares up again
        log.warning("recovered from the failure of %s in %.2fs (respawn %.2fs, KV %.2fs); %d tokens recomputed",
                    ", ".join(event["workers"]), event["total_s"], event["respawn_s"], event["kv_fetch_s"], recomputed)

    def recover_from(self, f: Failure) -> None:
        """recover; a failure in its last phases (a replacement dying while its KV is restored)
        starts the next recovery, up to REPLACE_ATTEMPTS in a row."""
        for _ in range(REPLACE_ATTEMPTS):
            try:
                return self.recover(f.dead, f.reason)
            except Failure as again:
                f = again
        raise WorkerError(f"recovery failed {REPLACE_ATTEMPTS} times in a row; last: {f.reason}")

    def reseed(self, rank: int, replicas: list[int], blocks: list[int]) -> None:
        """`rank`'s holders `replicas` were replaced: it re-seeds them (after its own restore, if any).
        Not waited for: until a new holder is re-seeded its empty slots fail their checksums, so a
        second failure meanwhile recomputes those requests instead of using a bad replica."""
        for j in replicas:
            try:
                self.c.channels[rank].send(Rereplicate(id=self.c._epoch, blocks=blocks, replica=j))
            except OSError as e:  # died before its death was noticed: a failure like any other
                raise Failure({rank}, f"worker {rank} is unreachable: {e}") from None

    def restore_kv(self, dead: set[int], event: dict) -> set[int]:
        """Replacements fetch their stage's KV from a holder that survived (the first of them; with
        --replicate-dir, else the first holder's replacement, which reopens its files); holders that
        were replaced are re-seeded (in the background, asked once the restores are done: their
        traffic would compete with the restores for the host's memory bandwidth). Returns the
        requests that cannot use their replica; the recovery's record `event` gets the fetch's path
        (kv_local) and size (kv_bytes)."""
        c = self.c
        seqs = c._token_side()
        blocks = sorted({b for s in seqs for b in s.block_table})
        bad: set[int] = set()
        waiting: dict[tuple[str, int], bool] = {}
        reseeds = []  # (rank, its holders to re-seed)
        for r in sorted(dead):
            holders = c.holder_ranks(r)
            if not holders:
                continue
            k = next((k for k, h in enumerate(holders) if h not in dead), None)
            if k is None and not c.replication.dir:
                bad.update(s.seq_id for s in seqs)  # every replica died with its holders: recomputed (and re-sent)
                continue
            k = k or 0
            local = c.worker_info[r].get("host_id") == c.worker_info[holders[k]].get("host_id")  # shared memory
            event["kv_local"] = local and event.get("kv_local", True)
            c.channels[r].send(Restore(holder=c.address(holders[k], "replica_port"), blocks=blocks, replica=k,
                                       local=local, seqs=[RestoreSeq(seq_id=s.seq_id, blocks=s.block_table,
                                                        watermark=c.replication.watermark_of(s)) for s in seqs]))
            waiting[("restored", r)] = True
            reseeds.append((r, [j for j, h in enumerate(holders) if h in dead and j != k]))
        for r in range(c.world):
            if r not in dead:
                reseeds.append((r, [j for j, h in enumerate(c.holder_ranks(r)) if h in dead]))
        deadline = time.monotonic() + c.timeout
        try:
            while waiting:
                msg = c._next_message(deadline, "restoring KV from replicas")
                key = (msg.t, getattr(msg, "rank", None))
                if key not in waiting:
                    continue
                del waiting[key]
                bad.update(msg.bad)
                event["kv_bytes"] = event.get("kv_bytes", 0) + msg.bytes
                _merge_parts(event, "restore_parts", msg.parts)
                if msg.error:
                    log.warning("worker %d could not fetch its replica: %s", msg.rank, msg.error)
        except Failure as f:
            # Another worker died meanwhile: the next recovery re-seeds only the holders it replaces,
            # so the live workers re-seed this one's now.
            for r, replicas in reseeds:
                if r not in f.dead:
                    try:
                        self.reseed(r, replicas, blocks)
                    except Failure as g:
                        f.dead |= g.dead
            raise
        for r, replicas in reseeds:
            self.reseed(r, replicas, blocks)
        return bad


def _merge_parts(event: dict, key: str, parts: dict | None) -> None:
    """event[key]: the slowest replacement's seconds per phase (a recovery waits for the slowest)."""
    if parts:
        mine = event.setdefault(key, {})
        for k, v in parts.items():
            mine[k] = round(max(mine.get(k, 0.0), float(v)), 4)
