"""The free list of KV-cache blocks."""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, first: int = 0):
        """Blocks first .. first + num_blocks - 1 (swapping gives each microbatch its own range)."""
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = deque(range(first, first + num_blocks))
        self._used: set[int] = set()
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
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free) - self.promised

    def allocate(self, n: int, promised: bool = False) -> list[int]:
        """n free blocks; `promised`: blocks promised earlier to the caller, handed out now."""
        if promised:
            self.promise(-n)
        elif n > len(self._free) - self.promised:
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks} "
                              f"({self.promised} of them promised)")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)
