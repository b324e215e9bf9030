"""Shared helpers for DéjàVuLib tests: filled caches and region comparisons."""
import torch

from dejavu.engine.kv_cache import PagedKVCache


def filled_cache(layers=4, blocks=24, block_size=4, heads=2, head_dim=8, dtype=torch.float32, device="cpu", seed=0):
    c = PagedKVCache(layers, blocks, block_size, heads, head_dim, dtype, torch.device(device))
    g = torch.Generator().manual_seed(seed)
    c.tensor.copy_(torch.randn(c.tensor.shape, generator=g).to(dtype))
    return c


def empty_like(c: PagedKVCache, device=None):
    return PagedKVCache(c.num_layers, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim, c.dtype,
                        torch.device(device) if device else c.device)


def region_values(c: PagedKVCache, region):
    t = c.tensor
    if region.slots is None:
        return torch.stack([t[l, b] for l in region.layers for b in region.blocks]).cpu()
    return torch.stack([t[l, b, :, s] for l in region.layers for b, s in zip(region.blocks, region.slots)]).cpu()
