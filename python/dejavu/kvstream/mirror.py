"""A replica holder's mirror of another worker's paged cache (replica.py): in RAM, or in files
(mode 600, never through a symbolic link) with a `.meta` file giving its shape, so that a
replacement holder can reopen what a holder before it left. Reads, writes and checksums (CRC-32C,
or MACs with a key) go through the C++ ReplicaMirror."""
from __future__ import annotations

import json
import math
import os
import stat

import torch


class ReplicaError(RuntimeError):
    pass


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ReplicaError(f"unknown dtype {name!r}")
    return dt


def _private_file(path: str, create: bool = True) -> int:
    """Opens (creating, unless not `create`) `path` as a regular file of ours, mode 600, never
    through a symbolic link."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReplicaError(f"{path} is not a regular file of ours")
    os.fchmod(fd, 0o600)
    return fd


def _mapped(path: str, numel: int, dtype: torch.dtype, create: bool = True) -> torch.Tensor:
    nbytes = numel * torch.tensor([], dtype=dtype).element_size()
    fd = _private_file(path)
    try:
        if os.fstat(fd).st_size != nbytes:
            if not create:
                raise ReplicaError(f"{path} does not have the {nbytes} bytes its .meta file announces")
            os.ftruncate(fd, nbytes)  # a new (or differently shaped) mirror starts zeroed
    finally:
        os.close(fd)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype)


class Mirror:
    def __init__(self, shape, dtype: torch.dtype, path: str | None = None, key: bytes | None = None,
                 create: bool = True):
        self.shape = tuple(int(x) for x in shape)
        if len(self.shape) != 6 or self.shape[2] != 2 or min(self.shape) <= 0:
            raise ReplicaError(f"bad mirror shape {shape}")
        self.dtype = dtype
        layers, blocks, _, bs = self.shape[:4]
        self.path = path
        if path:
            if create:
                fd = _private_file(path + ".meta")
                with os.fdopen(fd, "w") as f:
                    f.truncate()
                    json.dump({"shape": list(self.shape), "dtype": str(dtype).replace("torch.", "")}, f)
            self.data = _mapped(path + ".kv", math.prod(self.shape), dtype, create).view(self.shape)
            self.chk = _mapped(path + ".chk", blocks * bs, torch.int64, create).view(blocks, bs)
        else:
            # Not zeroed (pages are touched only when written): a slot never written fails its checksum
            # (stored 0) and is zeroed by whoever restores it, so garbage never reaches a cache.
            self.data = torch.empty(self.shape, dtype=dtype)
            self.chk = torch.zeros((blocks, bs), dtype=torch.int64)
        # Writes, reads and checksums go through the C++ mirror (its lock, no interpreter lock).
        from .. import _C

        heads, dim = self.shape[4:]
        self.native = _C.ReplicaMirror(_C.KVLayout(layers, blocks, bs, heads, dim, self.data.element_size()),
                                       self.data.data_ptr(), self.chk.data_ptr())
        if key is not None:
            self.native.set_key(key)

    @classmethod
    def reopen(cls, path: str, key: bytes | None) -> "Mirror":
        """The mirror a holder (now gone) kept in `path`'s files."""
        try:
            with open(path + ".meta") as f:
                meta = json.load(f)
            shape, dtype = meta["shape"], _dtype(meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReplicaError(f"cannot reopen the replica at {path}: {e}") from None
        return cls(shape, dtype, path, key, create=False)

    def remove_files(self) -> None:
        for ext in (".kv", ".chk", ".meta"):
            try:
                os.unlink(self.path + ext)
            except (OSError, TypeError):
                pass

    def put_slots(self, blocks, slots, payload: torch.Tensor) -> None:
        """payload: [layers, len(blocks), 2, heads, head_dim] bytes, as a sender packs them."""
        self._native(self.native.put_slots, list(blocks), list(slots), *self._bytes(payload))

    def put_blocks(self, blocks, payload: torch.Tensor) -> None:
        """payload: [layers, len(blocks), 2, block_size, heads, head_dim] bytes."""
        self._native(self.native.put_blocks, list(blocks), *self._bytes(payload))

    def get_blocks(self, blocks, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' KV packed [layers, blocks, ...] (into `out`, contiguous, when given) and
        their slot checksums [blocks, block_size]."""
        blocks = list(blocks)
        shape = (self.shape[0], len(blocks)) + self.shape[2:]
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        elif tuple(out.shape) != shape or out.dtype != self.dtype or not out.is_contiguous():
            raise ReplicaError(f"get_blocks into {tuple(out.shape)} {out.dtype}: expected {shape} {self.dtype}")
        chk = torch.empty((len(blocks), self.shape[3]), dtype=torch.int64)
        self._native(self.native.get_blocks, blocks, out.data_ptr(), chk.data_ptr())
        return out, chk

    @staticmethod
    def _bytes(payload: torch.Tensor):
        payload = payload.contiguous()
        return payload.data_ptr(), payload.numel() * payload.element_size()

    @staticmethod
    def _native(fn, *args):
        try:
            fn(*args)
        except (IndexError, ValueError) as e:  # the C++ checks: ids out of range, payload size
            raise ReplicaError(str(e)) from None
