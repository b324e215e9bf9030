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
        self.chosen: dict[int, int] = {}  # with swapping: seq_id -> its microbatch, from its prefill until it joins

    def alloc(self, seq: Sequence) -> BlockAllocator:
        """The allocator of `seq`'s token-side blocks: the shared one, or with swapping its slot's."""
        slot = self.chosen.get(seq.seq_id)
        return self.c.allocator if slot is None else self.c.slots[slot].allocator

    def choose(self, seq: Sequence, need: int, on_way: list[Sequence]) -> bool:
        """With swapping: pick the token microbatch a request about to be prefilled will join (False:
        none has room): the least loaded (running plus `on_way` to it) whose region has `need` free blocks."""
        slots = self.c.slots
        load = [len(sl.running) for sl in slots]
        for s in on_way:
            if s.seq_id in self.chosen:
                load[self.chosen[s.seq_id]] += 1
        fits = [i for i in range(len(slots)) if load[i] < self.mb and slots[i].allocator.can_allocate(need)]
        if not fits:
            return False
        self.chosen[seq.seq_id] = min(fits, key=lambda i: (load[i], -slots[i].allocator.num_free))
        return True

    def free(self, seq: Sequence) -> None:
        """`seq` leaves before joining a microbatch: its token-side blocks go back, its choice is dropped."""
        if seq.block_table:
            self.alloc(seq).free(seq.block_table)
            seq.block_table = []
        self.chosen.pop(seq.seq_id, None)

    def place(self, ready: deque) -> int:
        """Admitted requests join the token microbatch with the fewest sequences, up to a microbatch
        each (with swapping: the one their blocks were taken for, in arrival order); the others stay
        in `ready`, in order. Returns how many joined."""
        c, joined = self.c, 0
        if c.swap:
            keep = deque()
            while ready:
                s = ready.popleft()
                slot = self.chosen[s.seq_id]
                if len(c.slots[slot].running) >= self.mb:
                    keep.append(s)
                    continue
                del self.chosen[s.seq_id]
                self._join(s, slot)
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
