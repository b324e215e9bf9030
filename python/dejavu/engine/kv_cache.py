"""The paged KV cache of one worker: one tensor, laid out for whole-block moves.

Layout: [num_layers, num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]. One (layer, block)
chunk is contiguous, so DéjàVuLib moves whole blocks (or one layer's blocks) as large spans.
"""
from __future__ import annotations

import torch

from .block_manager import BlockAllocator


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.tensor = torch.zeros((num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim),
                                  dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @classmethod
    def over(cls, tensor: torch.Tensor) -> PagedKVCache:
        """A cache object over an existing tensor of this layout (a swap host copy), not a new one."""
        c = cls.__new__(cls)
        c.num_layers, c.num_blocks, _, c.block_size, c.num_kv_heads, c.head_dim = tensor.shape
        c.dtype, c.device, c.tensor = tensor.dtype, tensor.device, tensor
        c.allocator = BlockAllocator(c.num_blocks)
        return c

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def layout(self):
        """The C++ core's description of this cache (for DéjàVuLib's span arithmetic)."""
        from .. import _C

        return _C.KVLayout(self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                           self.tensor.element_size())

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
