"""A region of a paged KV cache: whole chunks (layers x blocks) or single token slots; and the copy
engine's block copy between two paged caches."""
from __future__ import annotations

from dataclasses import dataclass

from .. import _C


@dataclass(frozen=True)
class Region:
    """layers: local layer indices; blocks: cache block ids; slots: None for whole blocks, else one
    slot per block entry (token-level: "the newest token of these requests").
    Packed order is layer-major, then the given block order, K before V."""
    layers: tuple[int, ...]
    blocks: tuple[int, ...]
    slots: tuple[int, ...] | None = None

    @classmethod
    def chunks(cls, layers, blocks) -> "Region":
        return cls(tuple(int(x) for x in layers), tuple(int(x) for x in blocks))

    @classmethod
    def tokens(cls, layers, blocks, slots) -> "Region":
        if len(blocks) != len(slots):
            raise ValueError(f"token region: {len(blocks)} blocks but {len(slots)} slots")
        return cls(tuple(int(x) for x in layers), tuple(int(x) for x in blocks), tuple(int(x) for x in slots))

    def spans(self, layout) -> list[tuple[int, int]]:
        if self.slots is None:
            return _C.chunk_spans(layout, list(self.layers), list(self.blocks))
        return _C.token_spans(layout, list(self.layers), list(self.blocks), list(self.slots))

    def nbytes(self, layout) -> int:
        per = layout.chunk_bytes() if self.slots is None else 2 * layout.token_bytes()
        return len(self.layers) * len(self.blocks) * per

    def describe(self) -> str:
        kind = "token slots" if self.slots is not None else "blocks"
        return f"{len(self.layers)} layers x {len(self.blocks)} {kind}"

    def layer(self, i: int) -> "Region":
        """The part of this region in its i-th layer (for layer-by-layer streaming)."""
        return Region((self.layers[i],), self.blocks, self.slots)


def dma_copy_blocks(src, dst, src_ids: list[int], dst_ids: list[int], stream) -> int:
    """Blocks src[:, src_ids] -> dst[:, dst_ids] of two caches [layers, blocks, ...] (one of them
    pinned host memory, the other on the current CUDA device), every layer, with the copy engine on
    the CUDA `stream`: one 2-D copy per run of consecutive ids. Returns the copies issued."""
    chunk = dst[0, 0].numel() * dst.element_size()  # one block of one layer
    return _C.cuda_dma_copy_blocks(src.data_ptr(), dst.data_ptr(), list(src_ids), list(dst_ids), dst.shape[0],
                                   src.shape[1], dst.shape[1], chunk, stream.cuda_stream)
