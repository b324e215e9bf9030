"""The replica role (`--replicate`): hold the replicas of other workers (ReplicaServer), send this
worker's own KV to each of its holders (serving/replication.py Replicators; the first one is the
stage's KV tap), and restore a replacement worker's cache from one of its holders.

With swapping the replicated cache is the host copy, at the controller's logical block ids: every
step's new tokens are written back there, so it always holds the resident and the swapped-out
microbatches alike, and a replacement restores into it (regions then fill from it as usual)."""
from __future__ import annotations

import threading
import time

import torch

from ...models.preload import PRELOADER
from ..messages import Restored


class ReplicaRole:
    def __init__(self, stage):
        from ...engine.kv_cache import PagedKVCache
        from ...kvstream.replica import ReplicaServer
        from ...serving.replication import Replicator, Replicators, replica_src

        cfg = stage.cfg
        self.stage, self.cfg = stage, cfg
        self.server = ReplicaServer(cfg.kv_token, cfg.kv_host, cfg.replicate.dir, prefix=cfg.replicate.prefix)
        swap = stage.swap
        self.cache = PagedKVCache.over(swap.host) if swap is not None else stage.cache
        self.replicator = stage.replicator = Replicators([
            Replicator(stage, replica_src(cfg.worker_name, k), holder=k, cache=self.cache, ring=k == 0 and swap is None)
            for k in range(cfg.replicate.replicas)])

    def handlers(self) -> dict:
        return {"restore": self.restore, "rereplicate": self.rereplicate, "replication": self.set_replication}

    def ready_info(self) -> dict:
        return {"replica_port": self.server.port}

    @torch.inference_mode()
    def restore(self, msg) -> None:
        """A replacement worker: fetch this stage's KV from the replica holder into the cache. A
        slot below a request's watermark whose checksum fails marks the request bad (recomputed).
        A holder on this host gathers the blocks into a shared-memory segment of ours
        (kvstream/replica_local.py); another host's sends them over TCP."""
        from ...kvstream.replica import ReplicaClient, ReplicaError, block_checksums, mac_key
        from ...kvstream.replica_local import new_segment, to_cache
        from ...serving.replication import replica_src

        cache, cfg = self.cache, self.cfg
        src = replica_src(cfg.worker_name, msg.replica)
        t0 = time.perf_counter()
        blocks = msg.blocks
        bad, nbytes, error = [], 0, None
        parts = {}  # seconds per phase (Restored.parts: /v1/cluster's recovery record)
        segment, fetched = None, []  # the segment and the views of it: released after the reply
        try:
            if blocks:
                shape = (cache.num_layers, len(blocks)) + tuple(cache.tensor.shape[2:])
                if msg.local:
                    nbytes = torch.Size(shape).numel() * cache.tensor.element_size()
                    segment = PRELOADER.take_segment(nbytes)  # a standby's, faulted in (and pinned) already
                    if segment is None:
                        segment = new_segment(cfg.kv_token, src, nbytes, "restoring over TCP")
                        if segment is not None and cache.tensor.device.type == "cuda":
                            segment.pin()
                t1 = time.perf_counter()
                parts["segment"] = t1 - t0
                client = ReplicaClient(msg.holder[0], int(msg.holder[1]), cfg.kv_token, timeout=cfg.timeout)
                try:
                    data, chk = client.get_blocks(src, blocks, segment)
                finally:
                    client.close()
                fetched.append(data)
                t2 = time.perf_counter()
                parts["fetch"] = t2 - t1
                x = data.view(cache.dtype).view(shape)
                # Replicas kept on disk carry MACs (replica.py): verified with the key, never trusted as they are.
                key = mac_key(cfg.kv_token, src) if cfg.replicate.dir else None
                good = block_checksums(x, blocks, key) == chk.view(len(blocks), -1)
                # Never let a corrupted slot into the cache (garbage such as NaN would leak through masked
                # attention); those of live requests are recomputed anyway.
                if not bool(good.all()):
                    x.permute(1, 3, 0, 2, 4, 5)[~good] = 0
                ok = good.tolist()
                at = {b: i for i, b in enumerate(blocks)}
                bs = cache.block_size
                for r in msg.seqs:
                    if not all(ok[at[r.blocks[p // bs]]][p % bs] for p in range(r.watermark)):
                        bad.append(r.seq_id)
                t3 = time.perf_counter()
                parts["verify"] = t3 - t2
                if self.stage.swap is not None:
                    self.stage.swap.host_write(blocks)  # no region keeps an older device copy of them
                to_cache(x, cache.tensor, blocks, segment is not None and segment.pinned)
                nbytes = data.numel()
                data = x = None
                if self.stage.device.type == "cuda":
                    torch.cuda.synchronize(self.stage.device)  # in the cache before Restored says so
                parts["copy"] = time.perf_counter() - t3
        except (OSError, ReplicaError) as e:  # (raised before anything is copied into the cache)
            error = f"{type(e).__name__}: {e}"
            bad = [r.seq_id for r in msg.seqs]
        except BaseException:
            _release(segment, fetched)
            raise
        try:
            self.stage.ch.send(Restored(rank=self.stage.rank, bad=bad, bytes=nbytes,
                                        seconds=time.perf_counter() - t0, error=error, parts=parts))
        finally:
            # Unpinning and unmapping a segment of the cache's size takes a while (freeing its
            # pages): on a thread, not before the first step after the recovery.
            threading.Thread(target=_release, args=(segment, fetched), daemon=True, name="restore-release").start()

    def set_replication(self, msg) -> None:
        """Pause / resume (between requests; Controller.set_replication)."""
        self.replicator.paused = not msg.on
        self.replicator.every = max(1, msg.every)

    def rereplicate(self, msg) -> None:
        """One of our holders was replaced: re-seed it with every live block."""
        self.replicator.all[msg.replica].send_blocks(msg.id, msg.blocks)

    def after_admit(self, step_id: int, seqs) -> None:
        """Prompt KV just admitted by the token role goes to the holder as well (positions [0, ntok))."""
        self.replicator.cancel_staged()  # these slots were not written by a step's kernels
        self.replicator.after_step(step_id, [(s.blocks, 0, s.ntok) for s in seqs])

    def close(self) -> None:
        self.server.stop(remove_files=True)  # a clean shutdown: no replica outlives the deployment


def _release(segment, fetched: list) -> None:
    if segment is not None:
        segment.close()
    fetched.clear()  # the last views of the mapping: unmapped here (CPython's munmap runs without the GIL)
