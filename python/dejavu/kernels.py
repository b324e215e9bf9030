"""The GPU fast path's decode kernels (csrc/kernels) as torch functions.

`paged_attention` in models/layers.py calls these for decode batches on CUDA when the cache's dtype
and head size are supported, and its torch code stays the reference (and the CPU path).
DEJAVU_ATTENTION=torch turns the attention kernels off (for comparisons and bisecting).
A decode step's attention combines its partitions in the block that finishes a row last, and for
small batches (`fuses_kv_write`) it also stores the new token's K/V itself (`decode_attention(k_new=,
v_new=)`): one kernel instead of three. DEJAVU_ATTENTION_FUSE=0 runs the KV write and the combine
as kernels of their own (a baseline).

`add_norm` is a residual add and the LayerNorm / RMSNorm after it in one kernel (fp16/bf16 on
CUDA; DEJAVU_NORM=torch, other dtypes and the CPU use the torch ops). `add_norm_linear` also runs
the linear layer that reads the norm's output, in the same kernel where the linear kernel serves.

`linear` runs the models' linear layers: with at most `SMALL_LINEAR_ROWS` rows of fp16/bf16 input
on CUDA (a decode step at batch 1-4) through our weight-streaming kernel, otherwise (and with
DEJAVU_LINEAR=torch) through torch.nn.functional.linear, its reference.

On compute capability 9.0+ these kernels are launched with programmatic dependent launch (each may
start before the previous one ends and waits for it before reading an activation; csrc/kernels/pdl.h);
DEJAVU_PDL=0 or _C.set_programmatic_launch(0) turns that off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _C

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PARTITION = int(_C.decode_partition)  # keys per thread block of the split over the context


def switched_on(var: str) -> bool:
    """A kernel family is built with CUDA and not turned off by its variable (VAR=torch)."""
    return os.environ.get(var, "auto").lower() != "torch" and _C.cuda_compiled()


def usable(cache: torch.Tensor, head_dim: int) -> bool:
    """True when the kernels serve this cache (CUDA, built with CUDA, supported dtype and head size)."""
    return (cache.is_cuda and cache.dtype in _DTYPES and switched_on("DEJAVU_ATTENTION")
            and _C.decode_attention_supports(head_dim))


def num_parts(max_context: int) -> int:
    """Partitions of the context the attention kernel needs for sequences up to max_context tokens."""
    return max(1, -(-int(max_context) // PARTITION))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [N, heads, D] with each row's heads contiguous (any stride between rows)."""
    d = x.shape[2]
    return x if x.stride(2) == 1 and x.stride(1) == d else x.contiguous()


def _vector_rows(x: torch.Tensor) -> torch.Tensor:
    """_rows(x), each row starting on 16 bytes (the kernels read them as 16-byte vectors)."""
    x = _rows(x)
    return x if (x.data_ptr() | x.stride(0) * x.element_size()) % 16 == 0 else x.contiguous()


_SMS: dict[int, int] = {}
FUSE_ATTENTION = os.environ.get("DEJAVU_ATTENTION_FUSE", "1") != "0"
# Beyond this many (sequence, head) rows the attention kernel of large batches runs, and with the
# KV write inside it a step took 1.3% more GPU time (OPT-1.3B, batch 32, H200; docs/BENCHMARKS.md):
# there the write stays a kernel of its own.
_FUSED_KV_WRITE_MAX_ROWS = int(_C.decode_warps_max_rows)
# A prefill over a cached context whose sequences have at most this many new tokens each runs the
# decode kernel with a query row per token (build_metadata); longer ones loop SDPA per sequence.
# On an H100 the rows took 0.2-0.5x the loop's time at 16 new tokens and 0.75-1.4x at 64
# (benchmarks/context_attention_ab.py, docs/BENCHMARKS.md).
CONTEXT_ROWS_MAX_TOKENS = 32
# The kernel's workspace holds rows x heads x partitions x (head_dim + 2) floats: rows whose
# workspace would exceed this (a large batch over long contexts) take the loop instead.
CONTEXT_ROWS_MAX_WORKSPACE = 256 << 20


def rows_fit(rows: int, heads: int, head_dim: int, parts: int) -> bool:
    """Whether a prefill over a cached context of `rows` new tokens runs as decode-kernel rows."""
    return parts <= 1 or _C.decode_attention_workspace(rows, heads, head_dim, parts) * 4 <= CONTEXT_ROWS_MAX_WORKSPACE


def fuses_kv_write(num_seqs: int, num_heads: int) -> bool:
    """Whether a decode step of this shape stores its new K/V inside the attention kernel."""
    return FUSE_ATTENTION and num_seqs * num_heads <= _FUSED_KV_WRITE_MAX_ROWS
_COUNTERS: dict[tuple[int, int, str], torch.Tensor] = {}


def _counters(device: torch.device, stream: int, rows: int, user: str = "attention") -> torch.Tensor:
    """Zeroed uint32 counters of a kernel family (`user`: the attention kernel's in-kernel combine,
    the greedy kernel's slices; or scratch words of any content that a
    kernel family needs per stream, as "greedy parts"): one set per (device, stream, user), since
    launches on one stream never overlap and each launch leaves them at 0 again. Allocated (at least 8192) the first time a
    size is needed, outside any graph capture: capture runs a warm-up step of the same shape first."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    have = _COUNTERS.get((idx, stream, user))
    if have is None or have.numel() < rows:
        have = torch.zeros(max(8192, 1 << (rows - 1).bit_length()), dtype=torch.int32, device=device)
        _COUNTERS[(idx, stream, user)] = have
    return have


def grid_parts(device: torch.device, seqs: int, heads: int, parts: int) -> int:
    """Thread blocks per (sequence, head) along the context: enough for about two per SM."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(parts, -(-2 * _SMS[idx] // max(1, seqs * heads))))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
             slot_offsets: torch.Tensor, ring: torch.Tensor | None = None, ring_rows: torch.Tensor | None = None) -> None:
    """Store new K/V rows ([N, kv_heads, head_dim]) into one layer's cache ([num_blocks, 2,
    block_size, kv_heads, head_dim]); rows whose block is negative are skipped. With `ring` (this
    layer's part of a replication ring in pinned host memory, [rows, 2, kv_heads, head_dim] of the
    cache's dtype) row i also goes to ring row ring_rows[i] (negative: not)."""
    k, v = _rows(k.to(cache.dtype)), _rows(v.to(cache.dtype))
    _, _, bs, kvh, d = cache.shape
    _C.write_kv_cache(cache.data_ptr(), k.data_ptr(), v.data_ptr(), slot_blocks.data_ptr(), slot_offsets.data_ptr(),
                      k.shape[0], kvh, d, bs, k.stride(0), v.stride(0), _DTYPES[cache.dtype], _stream(cache.device),
                      0 if ring is None else ring.data_ptr(), 0 if ring_rows is None else ring_rows.data_ptr())


def decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, parts: int, alibi_slopes: torch.Tensor | None = None,
                     grid: int = 0, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     fuse_combine: bool | None = None, ring: torch.Tensor | None = None,
                     ring_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence (q: [B, H, D]) over the first context_lens[b] cached tokens of its
    sequence. block_tables: [B, max_blocks] int64; context_lens: [B] int64 (0: padding row, output
    zeros); parts >= num_parts(max context); grid: thread blocks per (sequence, head) along the
    context (0: grid_parts()). With k_new and v_new ([B, KVH, D]: the new token's K/V, at position
    context_lens[b] - 1) the kernel stores them into the cache first, as write_kv would, and with
    `ring` / `ring_rows` into the replication ring as well.
    fuse_combine (None: FUSE_ATTENTION): partitions combined by the kernel's last block per row
    rather than by a second kernel. Returns [B, H, D] in the cache's dtype."""
    q = _rows(q.to(cache.dtype))
    b, h, d = q.shape
    kvh, bs = cache.shape[3], cache.shape[2]
    out = torch.empty((b, h, d), dtype=cache.dtype, device=q.device)
    stream = _stream(q.device)
    ws, counters = None, 0
    if parts > 1:
        ws = torch.empty(_C.decode_attention_workspace(b, h, d, parts), dtype=torch.float32, device=q.device)
        if FUSE_ATTENTION if fuse_combine is None else fuse_combine:
            counters = _counters(q.device, stream, b * h).data_ptr()
    slopes = 0
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        slopes = alibi_slopes.data_ptr()
    new = {}
    if k_new is not None:
        k_new, v_new = _vector_rows(k_new.to(cache.dtype)), _vector_rows(v_new.to(cache.dtype))
        new = dict(k_new=k_new.data_ptr(), v_new=v_new.data_ptr(), k_stride=k_new.stride(0), v_stride=v_new.stride(0))
        if ring is not None:
            new.update(ring=ring.data_ptr(), ring_rows=ring_rows.data_ptr())
    _C.paged_decode_attention(out.data_ptr(), q.data_ptr(), cache.data_ptr(), block_tables.data_ptr(),
                              context_lens.data_ptr(), slopes, 0 if ws is None else ws.data_ptr(), b, h, kvh, d, bs,
                              block_tables.stride(0), q.stride(0), parts, grid or grid_parts(q.device, b, h, parts),
                              float(scale), _DTYPES[cache.dtype], stream, counters=counters, **new)
    return out


SMALL_LINEAR_ROWS = int(_C.small_linear_max_rows)
_HALF = {t: code for t, code in _DTYPES.items() if t != torch.float32}  # what small_linear and add_norm take


# Beyond one row the kernel's per-row input reads and arithmetic grow while cuBLAS's small-M GEMMs
# catch up on large matrices: measured on an H200 (benchmarks/linear_bench.py, docs/BENCHMARKS.md),
# it wins at 1 row on every OPT-1.3B shape and at 2-4 rows only while rows x weight elements stay
# within this many.
_SMALL_LINEAR_MULTI_ROW_ELEMS = 2 * 6144 * 2048


def small_linear_serves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    rows = x.shape[0] if x.dim() == 2 else 0
    return (x.is_cuda and 1 <= rows <= SMALL_LINEAR_ROWS and x.dtype in _HALF
            and (rows == 1 or rows * weight.numel() <= _SMALL_LINEAR_MULTI_ROW_ELEMS)
            and weight.dtype == x.dtype and x.stride(1) == 1 and x.stride(0) % 8 == 0 and weight.shape[1] % 8 == 0
            and weight.is_contiguous() and (x.data_ptr() | weight.data_ptr()) % 16 == 0
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and weight.requires_grad) and switched_on("DEJAVU_LINEAR"))


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False,
                 float_out: bool = False) -> torch.Tensor:
    """The small-batch kernel itself, for inputs small_linear_serves accepts (linear picks it only
    where it beats cuBLAS; benchmarks/linear_bench.py times it on every shape)."""
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32 if float_out else x.dtype, device=x.device)
    _C.small_linear(y.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    x.shape[0], weight.shape[0], weight.shape[1], x.stride(0), int(relu), _HALF[x.dtype],
                    _stream(x.device), out_f32=float_out)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False,
           float_out: bool = False) -> torch.Tensor:
    """F.linear (then ReLU if asked), through the small-batch kernel where it serves. float_out:
    the result converted to fp32 (`.float()`), which the kernel stores directly (an LM head's
    logits: one kernel fewer per decode step)."""
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias, relu,
                      float_out).view(*x.shape[:-1], weight.shape[0])
    if small_linear_serves(x, weight, bias):
        return small_linear(x, weight, bias, relu, float_out)
    y = F.linear(x, weight, bias)
    y = F.relu(y) if relu else y
    return y.float() if float_out else y


def _add_norm_args(h: torch.Tensor, a: torch.Tensor, norm: torch.nn.Module):
    """(h, a, norm weight, norm bias or None, rms) made ready for the add_norm kernels (contiguous,
    aligned), or None where they do not serve (CPU, fp32, wide rows, DEJAVU_NORM=torch)."""
    rms = not isinstance(norm, torch.nn.LayerNorm)
    w, b = norm.weight, None if rms else norm.bias
    hidden = h.shape[-1]
    if not (h.is_cuda and h.dtype in _HALF and a.dtype == h.dtype and a.shape == h.shape and hidden % 8 == 0
            and hidden <= _C.add_norm_max_hidden and w is not None and w.shape == (hidden,) and w.dtype == h.dtype
            and (b is None or b.dtype == h.dtype) and not (torch.is_grad_enabled() and w.requires_grad)
            and switched_on("DEJAVU_NORM")):
        return None
    h, a = h.contiguous(), a.contiguous()
    if (h.data_ptr() | a.data_ptr() | w.data_ptr() | (0 if b is None else b.data_ptr())) % 16:
        return None
    return h, a, w, b, rms


def add_norm(h: torch.Tensor, a: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + a, norm(h + a)) for a LayerNorm or the models' RMSNorm (`eps`, `weight`, `bias`)."""
    args = _add_norm_args(h, a, norm)
    if args is not None:
        h, a, w, b, rms = args
        hidden = h.shape[-1]
        s, y = torch.empty_like(h), torch.empty_like(h)
        _C.add_norm(s.data_ptr(), y.data_ptr(), h.data_ptr(), a.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(),
                    h.numel() // hidden, hidden, float(norm.eps), int(rms), _HALF[h.dtype], _stream(h.device))
        return s, y
    s = h + a
    return s, norm(s)


NORM_LINEAR = os.environ.get("DEJAVU_NORM_LINEAR", "1") != "0"
# Rows add_norm_linear fuses. The kernel takes up to 4, but each block normalises its rows one
# after another, and at 4 rows that cost more than the add_norm kernel it replaces (SmolLM2 shapes,
# batch 4, H200: 1.088x the GPU time; batch 1: 0.987x; OPT-1.3B batch 1: 0.940x; docs/BENCHMARKS.md).
NORM_LINEAR_MAX_ROWS = 1


def _norm_linear_args(h: torch.Tensor, a: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor,
                      bias: torch.Tensor | None):
    """_add_norm_args(h, a, norm) where add_norm_linear runs these as one kernel, else None."""
    if not (NORM_LINEAR and h.dim() == 2 and h.shape[0] <= NORM_LINEAR_MAX_ROWS
            and h.numel() * h.element_size() <= _C.small_linear_norm_max_bytes):
        return None
    args = _add_norm_args(h, a, norm)
    return args if args is not None and small_linear_serves(args[0], weight, bias) else None


def norm_linear_serves(h: torch.Tensor, a: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> bool:
    """Whether add_norm_linear runs these as one kernel."""
    return _norm_linear_args(h, a, norm, weight, bias) is not None


def add_norm_linear(h: torch.Tensor, a: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + a, linear(norm(h + a), weight, bias) [then ReLU]): at decode sizes on the GPU one kernel,
    the linear kernel with the add and the norm as its prologue (each thread block normalises the
    few rows itself); elsewhere add_norm then linear, which it equals bit for bit.
    DEJAVU_NORM_LINEAR=0 keeps them apart (a baseline)."""
    args = _norm_linear_args(h, a, norm, weight, bias)
    if args is not None:
        h, a, w, b, rms = args
        rows, hidden = h.shape
        s = torch.empty_like(h)
        y = torch.empty((rows, weight.shape[0]), dtype=h.dtype, device=h.device)
        _C.small_linear(y.data_ptr(), 0, weight.data_ptr(), 0 if bias is None else bias.data_ptr(), rows,
                        weight.shape[0], hidden, hidden, int(relu), _HALF[h.dtype], _stream(h.device),
                        norm_h=h.data_ptr(), norm_a=a.data_ptr(), norm_weight=w.data_ptr(),
                        norm_bias=0 if b is None else b.data_ptr(), sum_out=s.data_ptr(), eps=float(norm.eps),
                        rms=int(rms))
        return s, y
    s, x = add_norm(h, a, norm)
    return s, linear(x, weight, bias, relu)


# Per-row fields of a graph bucket's decode inputs before its block tables (engine/cuda_graphs.py's
# layout, which greedy_step_end advances): ids, positions, slot blocks, slot offsets, context
# lengths, ring rows.
STEP_FIELDS = int(_C.step_fields)


def greedy_serves(logits: torch.Tensor) -> bool:
    """True where greedy_step_end runs as a kernel (CUDA fp32 logits, not DEJAVU_GREEDY=torch)."""
    return (logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
            and switched_on("DEJAVU_GREEDY"))


def greedy_step_end(logits: torch.Tensor, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None,
                    fields: torch.Tensor | None = None, bucket: int = 0, max_blocks: int = 0,
                    block_size: int = 0, ring_size: int = 0) -> None:
    """Each row's argmax of `logits` [rows, vocab] fp32 (torch.argmax's, ties to the first) into
    `tokens` [>= rows] int64 on the device, and into pinned `host_tokens` as well; with `fields`, the
    decode inputs of a graph bucket (engine/cuda_graphs.py's layout) advanced for the next step,
    with `ring_size` > 0 their replication ring rows too (kernels/greedy.h). One kernel; greedy_serves(logits) must hold. torch.argmax is the reference."""
    rows, vocab = logits.shape
    if not greedy_serves(logits):
        raise ValueError("greedy_step_end: needs fp32 CUDA logits with unit column stride (and DEJAVU_GREEDY not torch)")
    for name, t in (("tokens", tokens), ("host_tokens", host_tokens), ("fields", fields)):
        if t is not None and (t.dtype != torch.int64 or not t.is_contiguous() or t.numel() < rows):
            raise ValueError(f"greedy_step_end: {name} must be contiguous int64 with at least {rows} elements")
    if fields is not None and fields.numel() < (STEP_FIELDS + max_blocks) * bucket:
        raise ValueError(f"greedy_step_end: fields holds {fields.numel()} words, a bucket of {bucket} needs "
                         f"{(STEP_FIELDS + max_blocks) * bucket}")
    stream = _stream(logits.device)
    counters = parts = 0
    words = _C.greedy_part_words(rows, vocab)
    if words:  # the row is split over blocks: the last one of a row combines their bests
        counters = _counters(logits.device, stream, rows, "greedy").data_ptr()
        parts = _counters(logits.device, stream, words, "greedy parts").data_ptr()
    _C.greedy_step_end(logits.data_ptr(), rows, vocab, logits.stride(0), tokens.data_ptr(),
                       0 if host_tokens is None else host_tokens.data_ptr(), 0 if fields is None else fields.data_ptr(),
                       bucket, max_blocks, block_size, ring_size, counters, parts, stream)
