"""The prefill attention CUDA prefills take against the torch path over the paged cache: of fresh
sequences (SDPA over the new tokens, models/layers.py causal_attention), for batches of one prompt
length (inputs as views, no gathers) and of several (padded by a gather); and over a cached context
(prefix-cache hits, chunked prompts: _context_attention)."""
import pytest
import torch

from conftest import needs_cuda
from dejavu import kernels
from dejavu.engine.model_runner import build_metadata
from dejavu.models.layers import _context_attention, causal_attention, paged_attention, write_kv


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("lens", [(6, 6, 6), (5, 1, 9, 3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_fresh_prefill_attention_equals_the_paged_path(device, lens, heads, kv_heads, monkeypatch):
    g = torch.Generator().manual_seed(sum(lens) + heads + kv_heads)
    d, bs = 16, 4
    items, at = [], 0
    for n in lens:  # each sequence's own blocks, nothing cached before its tokens
        blocks = -(-n // bs)
        items.append((torch.randint(3, 100, (n,), generator=g).tolist(), 0, list(range(at, at + blocks))))
        at += blocks
    _, _, meta, _ = build_metadata(items, bs, torch.device(device))
    assert meta.fresh and tuple(meta.q_index.shape) == (len(lens), max(lens))
    n = sum(lens)
    # q, k and v as views of one fused projection output, as the models' fused q/k/v gives them
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g).to(device)
    q = qkv[:, :heads * d].view(n, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(n, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(n, kv_heads, d)
    out = causal_attention(q, k, v, meta, scale=d ** -0.5)
    monkeypatch.setenv("DEJAVU_ATTENTION", "torch")  # the reference: write the cache, attend over it
    cache = torch.zeros(at, 2, bs, kv_heads, d, device=device)
    ref = paged_attention(q, k, v, cache, meta, scale=d ** -0.5)
    assert out.shape == (n, heads, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # each token attends to its own sequence's tokens up to itself: the first token's output is its value
    first = 0
    for m in lens:
        torch.testing.assert_close(out[first], v[first].repeat_interleave(heads // kv_heads, 0), rtol=1e-5, atol=1e-5)
        first += m


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("spec", [((5, 3), (0, 7), (12, 1)), ((8, 8), (4, 2))])  # (cached, new) per sequence
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_context_prefill_attention_equals_the_paged_path(device, spec, heads, kv_heads, monkeypatch):
    g = torch.Generator().manual_seed(len(spec) + heads + kv_heads)
    d, bs = 16, 4
    items, at = [], 0
    for cached, n in spec:  # the first `cached` tokens' K/V are in the cache already
        blocks = -(-(cached + n) // bs)
        items.append((torch.randint(3, 100, (n,), generator=g).tolist(), cached, list(range(at, at + blocks))))
        at += blocks
    _, _, meta, _ = build_metadata(items, bs, torch.device(device))
    n = sum(x[1] for x in spec)
    assert not meta.fresh and len(meta.spans) == len(spec)
    q, k, v = (torch.randn(n, hh, d, generator=g).to(device) for hh in (heads, kv_heads, kv_heads))
    cache = torch.randn(at, 2, bs, kv_heads, d, generator=g).to(device)
    filled = cache.clone()
    write_kv(filled, k, v, meta)
    out = _context_attention(q, filled, meta, scale=d ** -0.5)
    monkeypatch.setenv("DEJAVU_ATTENTION", "torch")
    ref = paged_attention(q, k, v, cache, meta, scale=d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(filled, cache)  # the reference wrote the same new K/V


@needs_cuda
@pytest.mark.parametrize("spec", [((5, 3), (0, 7), (12, 1)), ((40, 1), (33, 16), (70, 32)),
                                  ((300, 4), (129, 2), (12, 1))])  # (cached, new)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("alibi", [False, True])
def test_context_prefill_as_decode_rows_equals_the_paged_path(spec, heads, kv_heads, alibi, monkeypatch):
    """Few new tokens a sequence: each is a query row of the decode kernel (meta.row_context)."""
    g = torch.Generator().manual_seed(len(spec) + heads + kv_heads)
    d, bs = 64, 16
    items, at = [], 0
    for cached, n in spec:
        blocks = -(-(cached + n) // bs)
        items.append((torch.randint(3, 100, (n,), generator=g).tolist(), cached, list(range(at, at + blocks))))
        at += blocks
    _, _, meta, _ = build_metadata(items, bs, torch.device("cuda"))
    assert meta.row_context is not None and meta.row_tables.shape[0] == sum(x[1] for x in spec)
    longer = build_metadata(items + [([5] * 33, 4, [at, at + 1, at + 2])], bs, torch.device("cuda"))[2]
    assert longer.row_context is None and longer.spans is not None  # over CONTEXT_ROWS_MAX_TOKENS: the loop
    n = sum(x[1] for x in spec)
    q, k, v = (torch.randn(n, hh, d, generator=g).cuda() for hh in (heads, kv_heads, kv_heads))
    cache = torch.randn(at, 2, bs, kv_heads, d, generator=g).cuda()
    slopes = torch.tensor([0.5 ** (i + 1) for i in range(heads)]).cuda() if alibi else None
    filled = cache.clone()
    out = paged_attention(q, k, v, filled, meta, scale=d ** -0.5, alibi_slopes=slopes)
    monkeypatch.setenv("DEJAVU_ATTENTION", "torch")
    ref = paged_attention(q, k, v, cache, meta, scale=d ** -0.5, alibi_slopes=slopes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(filled, cache)
    monkeypatch.delenv("DEJAVU_ATTENTION")
    monkeypatch.setattr(kernels, "CONTEXT_ROWS_MAX_WORKSPACE", 0)  # rows too large for the workspace bound
    if meta.num_parts > 1:
        assert not kernels.rows_fit(n, heads, d, meta.num_parts)
        # the loop over the sequences; ALiBi, which has none, keeps the rows
        got = paged_attention(q, k, v, cache.clone(), meta, scale=d ** -0.5, alibi_slopes=slopes)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
