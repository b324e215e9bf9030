"""Prefix caching with disaggregation (docs/prefix-caching.md): the prompt side and the token side
each name their own cache's blocks under the same names. A prefill starts after the prompt side's
cached prefix, and the prompt workers send the token side only the blocks it does not hold: a
request's last len(dst_blocks) blocks (`StepSeq.dst_blocks`, `AdmitSeq.blocks`).

The host and disk tiers are the prompt side's: its evicted named blocks go down to them, and a hit
there is restored into the request's fresh prompt-side blocks before its prefill (Prefill.tiers,
applied by every prompt worker to its layers), so the prefill starts after it and the stream sends
the token side what it lacks, restored blocks included."""
from __future__ import annotations

from ...engine.block_manager import BlockAllocator, blocks_for


class DisaggPrefix:
    def __init__(self, names, block_size: int, prompt_alloc: BlockAllocator, tiers=None):
        # names(seq, full): a scheduler's names of seq's first `full` blocks; None: no prefix caching
        self.names, self.bs, self.prompt_alloc = names, block_size, prompt_alloc
        self.tiers = tiers  # the prompt side's host/disk tiers: the controller's index (PrefixTiers.index)
        prompt_alloc.record_evictions = tiers is not None
        self.prompt_blocks: dict[int, list[int]] = {}  # seq_id -> its prompt-side blocks, during its prefill

    def hits(self, seq, token_alloc: BlockAllocator) -> tuple[list[int], list[int], list[bytes]]:
        """The prompt side's and the token side's blocks holding `seq`'s leading full blocks (never
        the last token's block: its logits are needed), and the names after the prompt side's hits
        that its tiers hold."""
        if self.names is None or seq.params.prompt_logprobs is not None:
            return [], [], []
        names = self.names(seq, (len(seq) - 1) // self.bs)
        ph = self.prompt_alloc.lookup(names)
        rest = names[len(ph):]
        return ph, token_alloc.lookup(names), rest[:self.tiers.lookup(rest)] if self.tiers else []

    def take(self, seq, token_alloc: BlockAllocator) -> bool:
        """Give `seq` its blocks on both sides (hits shared, the rest new); False when either side
        lacks room. Sets num_cached (where the prefill starts, before restores), num_named
        (token-side hits) and restore (tier hits: fresh prompt-side blocks and their names)."""
        need = blocks_for(len(seq), self.bs)
        ph, th, lower = self.hits(seq, token_alloc)
        pa = self.prompt_alloc
        if not (pa.can_allocate(need - len(ph) + pa.num_unreferenced(ph))
                and token_alloc.can_allocate(need - len(th) + token_alloc.num_unreferenced(th))):
            return False
        pa.acquire(ph)
        self.prompt_blocks[seq.seq_id] = blocks = ph + pa.allocate(need - len(ph))
        seq.restore = list(zip(blocks[len(ph):len(ph) + len(lower)], lower))
        token_alloc.acquire(th)
        seq.block_table = th + token_alloc.allocate(need - len(th))
        seq.num_cached, seq.num_named = len(ph) * self.bs, len(th)
        if self.names is not None:
            for alloc, hit in ((pa, ph), (token_alloc, th)):
                alloc.stats.queried_tokens += len(seq)
                alloc.stats.device_hit_tokens += len(hit) * self.bs
        return True

    def ops(self, seqs):
        """A prefill's tier copies (messages.TierOps, None without any): the prompt blocks evicted
        since the last prefill go down, then `seqs`' restores come in (num_cached advanced past them)."""
        return self.tiers and self.tiers.ops(self.prompt_alloc.take_evicted(), seqs)

    @staticmethod
    def sent(seq) -> list[int]:
        """The token-side blocks the prompt workers fill: those after its hits."""
        return seq.block_table[seq.num_named:]

    def release_prompt(self, seq, computed: int) -> None:
        """The prefill is done (`computed` tokens have K/V on the prompt side): name its full blocks
        there and free them, last first (the prefix stays longest)."""
        blocks = self.prompt_blocks.pop(seq.seq_id, [])
        if self.names is not None:
            full = computed // self.bs
            for b, name in zip(blocks[:full], self.names(seq, full)):
                self.prompt_alloc.register(b, name)
        self.prompt_alloc.free(reversed(blocks))

    def drop_prompt(self, seq) -> None:
        """The prefill was abandoned: its prompt-side blocks go back unnamed."""
        blocks = self.prompt_blocks.pop(seq.seq_id, None)
        seq.restore = []
        if blocks:
            self.prompt_alloc.free(blocks)
