"""Layers shared by the model families: attention over the paged KV cache, RoPE, ALiBi, norms.

A forward pass sees a flat batch of N new tokens belonging to B sequences (prefill chunks and
single decode tokens alike). `AttnMetadata` says where each token's K/V goes in the cache and how
to form the padded [B, T] query layout that attention runs on.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


@dataclass
class KVRing:
    """A replication ring (serving/replication.py): host memory ([layers, rows, 2, kv_heads, head_dim],
    pinned for a device cache) into which a decode step also writes each new token's K and V, at the
    rows AttnMetadata.ring_rows names, so the replica sender sends them without a copy of its own."""
    tensor: torch.Tensor
    cache: torch.Tensor  # the whole paged cache ([layers, blocks, 2, block_size, kv_heads, head_dim])

    def layer(self, layer_cache: torch.Tensor) -> torch.Tensor:
        """The ring's part for the layer whose cache view this is."""
        i = (layer_cache.data_ptr() - self.cache.data_ptr()) // (self.cache.stride(0) * self.cache.element_size())
        return self.tensor[i]


@dataclass
class AttnMetadata:
    slot_blocks: torch.Tensor    # [N] cache block of each new token (negative: padding, not stored)
    slot_offsets: torch.Tensor   # [N] slot inside that block
    block_tables: torch.Tensor   # [B, max_blocks] blocks of each sequence (padded with 0)
    q_index: torch.Tensor | None = None        # [B, T] index of each padded query into the N tokens (N = padding)
    out_index: torch.Tensor | None = None      # [N] position of each token in the flattened [B*T] layout
    q_positions: torch.Tensor | None = None    # [B, T] absolute position of each query (0 for padding)
    key_positions: torch.Tensor | None = None  # [S] 0..S-1 with S = max_blocks * block_size
    # Decode batches (one new token per sequence): tokens each sequence attends to, and the
    # partitions of the context the GPU kernel splits it into (kernels.num_parts). None otherwise.
    context_lens: torch.Tensor | None = None   # [B] int64
    num_parts: int = 1
    fresh: bool = False  # prefill with nothing cached before it: attention over the new tokens only
    # Prefills over a cached context (prefix-cache hits, chunked prompts): per sequence, on the host,
    # (index of its first new token, new tokens, tokens cached before them). None otherwise.
    spans: tuple | None = None
    # Prefills over a cached context whose every sequence has few new tokens (CUDA): each new token
    # is a query row of the decode kernel, with its sequence's blocks and its position + 1 keys.
    row_tables: torch.Tensor | None = None   # [N, max_blocks] int64
    row_context: torch.Tensor | None = None  # [N] int64
    ring: KVRing | None = None        # with ring_rows: new K/V also go to these rows of the ring
    ring_rows: torch.Tensor | None = None  # [N] int64 (negative: not replicated through the ring)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> None:
    """Store new K/V rows ([N, kv_heads, head_dim]) into one layer's cache
    ([num_blocks, 2, block_size, kv_heads, head_dim])."""
    cache[meta.slot_blocks, 0, meta.slot_offsets] = k.to(cache.dtype)
    cache[meta.slot_blocks, 1, meta.slot_offsets] = v.to(cache.dtype)
    if meta.ring_rows is not None:  # the torch path (CPU): the same rows the kernel writes on a GPU
        ring = meta.ring.layer(cache)
        rows = meta.ring_rows.to(ring.device)
        keep = rows >= 0
        ring[rows[keep], 0] = k.to(ring.device, ring.dtype)[keep]
        ring[rows[keep], 1] = v.to(ring.device, ring.dtype)[keep]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttnMetadata, scale: float, alibi_slopes: torch.Tensor | None = None,
                    window: int = 0) -> torch.Tensor:
    """Causal attention of the new tokens over everything cached for their sequences.

    q: [N, H, D]; k, v: [N, KVH, D] (written to the cache first). Returns [N, H, D].
    `window` > 0: each query sees only the last `window` keys, itself included (HF's sliding
    window). The torch code is the reference (and the CPU path). On CUDA, decode batches go through
    our kernels (dejavu.kernels) and fresh prefills through SDPA's causal (flash) path; the kernels
    have no window, so windowed layers take the torch path.
    """
    if not window and kernels.usable(cache, q.shape[-1]):
        if meta.context_lens is not None:
            ring = None if meta.ring_rows is None else meta.ring.layer(cache)
            new = {}
            if kernels.fuses_kv_write(q.shape[0], q.shape[1]):  # the KV write inside the attention kernel
                new = dict(k_new=k, v_new=v, ring=ring, ring_rows=meta.ring_rows)
            else:
                kernels.write_kv(cache, k, v, meta.slot_blocks, meta.slot_offsets, ring, meta.ring_rows)
            return kernels.decode_attention(q, cache, meta.block_tables, meta.context_lens, scale, meta.num_parts,
                                            alibi_slopes, **new).to(q.dtype)
        if meta.fresh and alibi_slopes is None:
            kernels.write_kv(cache, k, v, meta.slot_blocks, meta.slot_offsets)
            return _prefill_attention(q, k, v, meta, scale)
        # one call, not a loop (ALiBi has no loop: rows whatever their workspace)
        if meta.row_context is not None and (alibi_slopes is not None or kernels.rows_fit(*q.shape, meta.num_parts)):
            kernels.write_kv(cache, k, v, meta.slot_blocks, meta.slot_offsets)
            return kernels.decode_attention(q, cache, meta.row_tables, meta.row_context, scale, meta.num_parts,
                                            alibi_slopes).to(q.dtype)
        if meta.spans is not None and alibi_slopes is None:
            kernels.write_kv(cache, k, v, meta.slot_blocks, meta.slot_offsets)
            return _context_attention(q, cache, meta, scale)
    write_kv(cache, k, v, meta)
    n, h, d = q.shape
    b, t = meta.q_index.shape
    kvh = cache.shape[3]
    # Queries in padded [B, H, T, D] form (row N of q_ext is a zero pad row).
    q_ext = torch.cat([q, q.new_zeros(1, h, d)], 0)
    qp = q_ext[meta.q_index].transpose(1, 2)
    # Each sequence's keys and values: [B, max_blocks, bs, KVH, D] -> [B, KVH, S, D].
    keys = cache[meta.block_tables, 0].flatten(1, 2).transpose(1, 2)
    vals = cache[meta.block_tables, 1].flatten(1, 2).transpose(1, 2)
    if kvh != h:
        keys = keys.repeat_interleave(h // kvh, dim=1)
        vals = vals.repeat_interleave(h // kvh, dim=1)
    keys = keys.to(q.dtype)
    vals = vals.to(q.dtype)
    visible = meta.key_positions[None, None, :] <= meta.q_positions[:, :, None]  # [B, T, S]
    if window:
        visible &= meta.key_positions[None, None, :] > meta.q_positions[:, :, None] - window
    if alibi_slopes is None:
        mask = visible[:, None]
    else:
        bias = alibi_slopes[None, :, None, None] * meta.key_positions.to(torch.float32)[None, None, None, :]
        mask = bias.to(q.dtype).masked_fill(~visible[:, None], float("-inf"))
    out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b * t, h, d)[meta.out_index]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata,
                      scale: float) -> torch.Tensor:
    """Prefill of sequences with nothing cached before their new tokens: causal attention over
    those tokens alone (no cache gather, no explicit mask, so SDPA may take its flash kernels).
    Padding sits after each sequence's tokens, so causality keeps it out of every real query, and
    its rows may hold any finite values: they repeat a real token's (one gather per input, no
    zero row appended first). Sequences of one length need no padding: the [B, heads, T, D]
    inputs are views of the tokens (of the fused q/k/v output) and the output needs no gather."""
    n, h, d = q.shape
    b, t = meta.q_index.shape
    kvh = k.shape[1]
    uniform = n == b * t  # every sequence has t new tokens: q_index is 0..n-1 in order
    index = None if uniform else meta.q_index.clamp(max=n - 1)

    def padded(x):  # [N, heads, D] -> [B, heads, T, D]
        x = x.view(b, t, x.shape[1], d) if uniform else x[index]
        return x.transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale,
                                         enable_gqa=kvh != h)
    out = out.transpose(1, 2).reshape(b * t, h, d)
    return out if uniform else out[meta.out_index]


def _context_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Prefill over a cached context (the new K/V already in the cache): per sequence, SDPA of its
    new tokens over its keys gathered in block order with a bottom-right causal mask (a CausalBias,
    not a dense mask, so SDPA may take its flash kernels). The padded torch path would build
    [B, heads, T, S] masks and run every sequence at the batch's longest context."""
    from torch.nn.attention.bias import causal_lower_right

    out = torch.empty_like(q)
    bs, h, kvh = cache.shape[2], q.shape[1], cache.shape[3]
    for i, (first, n_new, start) in enumerate(meta.spans):
        ctx = start + n_new
        kv = cache[meta.block_tables[i, :-(-ctx // bs)]]  # [blocks, 2, bs, KVH, D]
        keys, vals = (kv[:, j].flatten(0, 1)[:ctx].transpose(0, 1).to(q.dtype) for j in (0, 1))  # [KVH, ctx, D]
        if kvh != h:
            keys, vals = keys.repeat_interleave(h // kvh, 0), vals.repeat_interleave(h // kvh, 0)
        qi = q[first:first + n_new].transpose(0, 1)  # [H, T, D]
        o = F.scaled_dot_product_attention(qi[None], keys[None], vals[None], attn_mask=causal_lower_right(n_new, ctx),
                                           scale=scale)
        out[first:first + n_new] = o[0].transpose(0, 1)
    return out


_prefill_attention = causal_attention  # what attention() runs for a fresh prefill on CUDA


@contextlib.contextmanager
def prefill_attention(impl):
    """Within the block, fresh prefills run `impl` (causal_attention's signature) instead of
    causal_attention: benchmarks/prefill_attention_ab.py compares implementations this way."""
    global _prefill_attention
    before, _prefill_attention = _prefill_attention, impl
    try:
        yield
    finally:
        _prefill_attention = before


# ---------------------------------------------------------------------- position encodings
def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for rotate-half RoPE (HF Llama convention), computed in fp32 from the
    inverse frequencies (hf_config.rope_inv_freq: scaling applied there)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D]; cos/sin: [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes as in BLOOM (geometric, with interleaved extras for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")  # never on meta, even when built there


# ---------------------------------------------------------------------- linear layers
class Linear(nn.Linear):
    """nn.Linear whose decode-sized calls on the GPU go through our kernel (kernels.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------- fused projections
class FusedLinears:
    """Linear layers over the same input (q/k/v, gate/up) whose weights are views into one
    matrix, so one GEMM computes them all (at decode batch sizes each GEMM is a weight read, and
    small ones run far below the memory bandwidth). The layers keep their own parameters (state
    dicts, loading and tensor-parallel slicing see no difference). `fuse()` must run before the
    weights are filled, as `materialize` does (DecoderLM.fuse_projections); until then, or once
    the model was moved after it (the views no longer alias the matrix), the layers run apart."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self.weight = self.bias = None

    def fuse(self) -> None:
        linears = self.linears
        self.sizes = [lin.weight.shape[0] for lin in linears]  # a tensor-parallel shard's, once cut (models/tp.py)
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fused linears must all have a bias or none")
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
        at = 0
        for lin, n in zip(linears, self.sizes):
            lin.weight.data = self.weight[at:at + n]
            if self.bias is not None:
                lin.bias.data = self.bias[at:at + n]
            at += n

    @property
    def fused(self) -> bool:
        """Whether the layers' weights are views into the one matrix (fuse() ran and still holds)."""
        return self.weight is not None and self.linears[0].weight.data_ptr() == self.weight.data_ptr()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.fused:
            return tuple(lin(x) for lin in self.linears)
        return kernels.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def after_add_norm(self, h: torch.Tensor, a: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, tuple]:
        """(h + a, self(norm(h + a))): the residual add, the norm and the projections in one kernel
        at decode sizes on the GPU (kernels.add_norm_linear)."""
        if not self.fused:
            h, x = kernels.add_norm(h, a, norm)
            return h, self(x)
        h, y = kernels.add_norm_linear(h, a, norm, self.weight, self.bias)
        return h, y.split(self.sizes, dim=-1)


# ---------------------------------------------------------------------- norms and activations
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}") from None
