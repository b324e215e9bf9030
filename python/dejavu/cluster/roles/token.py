"""The token role (disaggregation): a stage of the token pipeline. It receives prompts' KV (into a
TCP store it runs, from shared memory, or written straight into its cache by CUDA IPC), admits it
into its cache (or, swapping, into the host copy), then decodes with the stage role's steps."""
from __future__ import annotations

import os
import time

import torch

from ..messages import Admitted


class TokenRole:
    def __init__(self, stage, replica=None):
        from ...kvstream import KVStreamer, TcpReplicaServer

        self.stage, self.cfg, self.replica = stage, stage.cfg, replica
        self.streamer = KVStreamer(stage.cache, pool_bytes=self.cfg.kv_pool_bytes)
        self.kv_server = TcpReplicaServer(self.cfg.kv_token, host=self.cfg.kv_host)
        stage.reset_hooks.append(self.drop)

    def handlers(self) -> dict:
        return {"admit": self.admit}

    def ready_info(self) -> dict:
        info = {"kv_port": self.kv_server.port}
        stage = self.stage
        if stage.device.type == "cuda" and stage.swap is None:  # same-host prompt workers may write into this cache
            from ...kvstream.ipc import export_tensor

            info["ipc"] = export_tensor(stage.cache.tensor)
        return info

    @torch.inference_mode()
    def admit(self, msg) -> None:
        """Move arrived prompt KV from the receive store into this worker's cache."""
        from ...kvstream import Region
        from ...kvstream.shm import ShmDest

        stage, cache = self.stage, self.stage.cache
        shm = ShmDest(self.cfg.shm_prefix)
        nbytes = 0
        t0 = time.perf_counter()
        if stage.swap is not None:  # into the host copy, where the microbatch's swap-ins read it
            stage.swap.host_write([b for s in msg.seqs for b in s.blocks])
        if self.cfg.worker_name in msg.delivered:
            # Written straight into this cache by the prompt workers (CUDA IPC), already complete.
            chunk = self.streamer.layout.chunk_bytes()
            nbytes = sum(len(s.blocks) for s in msg.seqs) * cache.num_layers * chunk
            self._admitted(msg, nbytes, t0)
            return
        for s in msg.seqs:
            for i in range(cache.num_layers):
                key = f"{s.key}.L{stage.layer_start + i}.{self.cfg.worker_name}"
                region = Region.chunks([i], s.blocks)
                n = region.nbytes(self.streamer.layout)
                buf = self.streamer.pool.alloc(n)
                try:
                    if shm.size(key) >= 0:  # a same-host prompt worker left it in shared memory
                        got = shm.size(key)
                        shm.get(key, buf.tensor).wait(self.cfg.timeout)
                    else:                   # else it came over TCP into the receive store
                        got = self.kv_server.get_into(key, buf.tensor)
                        self.kv_server.server.erase(key)
                    if got != n:
                        raise RuntimeError(f"KV chunk {key} has {got} bytes, expected {n}")
                    if stage.swap is not None:
                        host = stage.swap.host[i]  # [host blocks, 2, block_size, kv_heads, head_dim]
                        x = buf.tensor[:n].view(host.dtype).view((len(s.blocks),) + tuple(host.shape[1:]))
                        host.index_copy_(0, torch.tensor(s.blocks), x)
                    else:
                        self.streamer.scatter(region, buf.tensor).wait(self.cfg.timeout)
                finally:
                    buf.free()
                nbytes += n
        if stage.device.type == "cuda":
            torch.cuda.synchronize(stage.device)
        self._admitted(msg, nbytes, t0)

    def _admitted(self, msg, nbytes: int, t0: float) -> None:
        self.stage.ch.send(Admitted(id=msg.id, rank=self.stage.rank, bytes=nbytes, seconds=time.perf_counter() - t0))
        if self.replica is not None:
            self.replica.after_admit(msg.id, msg.seqs)

    def drop(self, msg) -> None:
        """A reset: forget KV pushed for prefills that will be redone."""
        prefixes = [k + "." for k in msg.drop_keys]
        if prefixes:
            for key in self.kv_server.server.keys():
                if any(key.startswith(p) for p in prefixes):
                    self.kv_server.server.erase(key)
            from ...kvstream.shm import SHM_DIR

            base = self.cfg.shm_prefix
            for name in os.listdir(SHM_DIR):
                if name.startswith(base) and any(name[len(base):].startswith(p) for p in prefixes):
                    try:
                        os.unlink(os.path.join(SHM_DIR, name))
                    except OSError:
                        pass

    def close(self) -> None:
        self.kv_server.stop()
