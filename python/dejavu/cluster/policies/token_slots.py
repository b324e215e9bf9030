"""Where a disaggregated request decodes: the token microbatch it joins, and the allocator of its
token-side blocks (with swapping, each microbatch has blocks of its own: the slot is chosen when the
prefill starts, so the prompt KV lands in that slot's blocks; without, blocks are shared and a
request joins the least loaded microbatch once its KV is admitted)."""
from __future__ import annotations

from collections import deque

from ...engine.block_manager import BlockAllocator
from ...engine.sequence import Sequence


class TokenSlots:
    def __init__(self, controller, microbatch: int):
        self.c, self.mb = controller, microbatch

    def alloc(self, seq: Sequence) -> BlockAllocator:
        """The allocator of `seq`'s token-side blocks: the shared one, or with swapping its slot's."""
        slot = getattr(seq, "token_slot", None)
        return self.c.allocator if slot is None else self.c.slots[slot].allocator

    def choose(self, need: int, on_way: list[Sequence]) -> int:
        """With swapping: the token microbatch a request about to be prefilled will join (-1: none
        has room): the least loaded (running plus `on_way` to it) whose region has `need` free blocks."""
        slots = self.c.slots
        load = [len(sl.running) for sl in slots]
        for s in on_way:
            if getattr(s, "token_slot", None) is not None:
                load[s.token_slot] += 1
        fits = [i for i in range(len(slots)) if load[i] < self.mb and slots[i].allocator.can_allocate(need)]
        return min(fits, key=lambda i: (load[i], -slots[i].allocator.num_free)) if fits else -1

    def place(self, ready: deque) -> int:
        """Admitted requests join the token microbatch with the fewest sequences, up to a microbatch
        each (with swapping: the one their blocks were taken for, in arrival order); the others stay
        in `ready`, in order. Returns how many joined."""
        c, joined = self.c, 0
        if c.swap:
            keep = deque()
            while ready:
                s = ready.popleft()
                if len(c.slots[s.token_slot].running) >= self.mb:
                    keep.append(s)
                    continue
                self._join(s, s.token_slot)
                joined += 1
            ready.extend(keep)
            return joined
        while ready:
            slot = min(range(len(c.slots)), key=lambda i: len(c.slots[i].running))
            if len(c.slots[slot].running) >= self.mb:
                break
            self._join(ready.popleft(), slot)
            joined += 1
        return joined

    def _join(self, s: Sequence, slot: int) -> None:
        self.c.slots[slot].running.append(s)
        self.c.dispatch.slot_of[s.seq_id] = slot
