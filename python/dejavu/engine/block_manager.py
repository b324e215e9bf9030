"""KV-cache blocks: reference counts, the free list, and the prefix cache's block names.

With prefix caching a full block is named by a chained hash (block_hashes): its parent block's
name, its token ids, and a salt naming everything else that changes its K/V (the model). A block
whose last reference goes keeps its content and name on the free list, which hands out unnamed
blocks first and then named ones in least-recently-freed order, so a later request whose prompt
starts with the same tokens finds it (lookup) and takes a reference instead of recomputing it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


class OutOfBlocks(RuntimeError):
    pass


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def root_hash(salt: str) -> bytes:
    """The parent name of a sequence's first block: the salt (model identity) alone."""
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"dejavu-prefix").digest()


def block_hashes(token_ids, block_size: int, parent: bytes, first: int, last: int) -> list[bytes]:
    """Names of full blocks first .. last - 1 of `token_ids`; `parent`: block first - 1's name
    (root_hash for block 0). Stable across processes (the disk tier relies on it)."""
    out = []
    for i in range(first, last):
        ids = np.asarray(token_ids[i * block_size:(i + 1) * block_size], dtype="<i8")
        parent = hashlib.blake2b(parent + ids.tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


@dataclass
class PrefixStats:
    """Prefix-cache counters (engine stats, /metrics). Tokens are counted at admission."""
    queried_tokens: int = 0   # prompt tokens of admitted sequences (what could have hit)
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    evictions: int = 0        # named device blocks whose name was dropped to reuse the block
    disk_corrupt: int = 0     # disk-tier blocks that failed their checksum (recomputed)
    offloaded_bytes: int = 0  # copied from the device to the host tier
    restored_bytes: int = 0   # copied back from the host or disk tier

    @property
    def hit_tokens(self) -> int:
        return self.device_hit_tokens + self.host_hit_tokens + self.disk_hit_tokens

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hit_tokens"] = self.hit_tokens
        d["hit_rate"] = self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
        return d


class BlockAllocator:
    def __init__(self, num_blocks: int, first: int = 0):
        """Blocks first .. first + num_blocks - 1 (swapping gives each microbatch its own range)."""
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # Unreferenced blocks, handed out from the front: unnamed ones first, then named ones, oldest first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, first + num_blocks))
        self._ref: dict[int, int] = {}
        self._name: dict[int, bytes] = {}   # block -> its prefix name
        self._block: dict[bytes, int] = {}  # prefix name -> block
        self.evicted: list[tuple[int, bytes]] = []  # named blocks handed out since take_evicted()
        self.record_evictions = False  # keep `evicted` (a lower tier takes them)
        self.stats = PrefixStats()
        self.promised = 0  # free blocks promised to running sequences (admission="reserve")

    @property
    def num_free(self) -> int:
        return len(self._free)

    def promise(self, n: int) -> None:
        """Set aside n more free blocks (negative: give them back) for sequences already running."""
        if not 0 <= self.promised + n <= len(self._free):
            raise ValueError(f"cannot promise {n} more KV blocks: {self.promised} promised, {len(self._free)} free")
        self.promised += n

    @property
    def num_used(self) -> int:
        return len(self._ref)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free) - self.promised

    def allocate(self, n: int, promised: bool = False) -> list[int]:
        """n free blocks; `promised`: blocks promised earlier to the caller, handed out now."""
        if promised:
            self.promise(-n)
        elif n > len(self._free) - self.promised:
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks} "
                              f"({self.promised} of them promised)")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            name = self._name.pop(b, None)
            if name is not None:  # its cached content is overwritten from now on
                del self._block[name]
                if self.record_evictions:
                    self.evicted.append((b, name))
                self.stats.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks) -> None:
        for b in blocks:
            r = self._ref.get(b)
            if r is None:
                raise ValueError(f"block {b} freed twice or never allocated")
            if r > 1:
                self._ref[b] = r - 1
                continue
            del self._ref[b]
            self._free[b] = None
            if b not in self._name:
                self._free.move_to_end(b, last=False)  # nothing to keep: reused first

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, names: list[bytes]) -> list[int]:
        """Blocks holding the longest run of `names` from the first."""
        out = []
        for h in names:
            b = self._block.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of `blocks` sit on the free list (taking them costs free blocks)."""
        return sum(1 for b in blocks if b not in self._ref)

    def acquire(self, blocks: list[int]) -> None:
        """One more reference to each of these cached blocks (lookup's answer)."""
        if self.num_unreferenced(blocks) > len(self._free) - self.promised:
            raise OutOfBlocks(f"cannot take {len(blocks)} cached blocks: {self.promised} of "
                              f"{len(self._free)} free blocks are promised")
        for b in blocks:
            if b in self._ref:
                self._ref[b] += 1
            else:
                del self._free[b]
                self._ref[b] = 1

    def register(self, block: int, name: bytes) -> bool:
        """Name a referenced block whose K/V is computed; False when another block holds that name
        already (two sequences computed the same block at once): this one stays unnamed."""
        if block not in self._ref:
            raise ValueError(f"block {block} is not allocated")
        if name in self._block or block in self._name:
            return self._block.get(name) == block
        self._name[block], self._block[name] = name, block
        return True

    @property
    def num_named(self) -> int:
        """Blocks holding a prefix name (in use or on the free list): the device tier's occupancy."""
        return len(self._name)

    def name_of(self, block: int) -> bytes | None:
        return self._name.get(block)

    def take_evicted(self) -> list[tuple[int, bytes]]:
        """Named blocks handed out since the last call, with their old names (the host tier keeps
        their content: it must copy it before the next step writes them)."""
        out, self.evicted = self.evicted, []
        return out

    def reset_prefix_cache(self) -> None:
        """Forget every name (their content is no longer trusted, e.g. after a worker was replaced)."""
        self._name.clear()
        self._block.clear()
        self.evicted.clear()
