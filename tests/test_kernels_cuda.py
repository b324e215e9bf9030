"""The GPU fast path: decode kernels against the torch reference, CUDA graphs against eager and HF
(skipped without a GPU; METHOD.md tolerances by dtype)."""
import pytest
import torch

from conftest import needs_cuda
from dejavu import LLM, SamplingParams, kernels
from dejavu.engine.model_runner import build_metadata
from dejavu.models.layers import alibi_slopes, paged_attention
from hf_models import TINY, hf_greedy, save_hf_model

pytestmark = needs_cuda

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def reference(q, cache, tables, ctx, scale, slopes):
    """Per sequence, in float64: softmax(q.k * scale + slope * key_position) @ v over its context."""
    b, h, d = q.shape
    bs, kvh = cache.shape[2], cache.shape[3]
    out = torch.zeros(b, h, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(ctx[i])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = tables[i, pos // bs]
        k = cache[blocks, 0, pos % bs].double().repeat_interleave(h // kvh, dim=1)  # [n, h, d]
        v = cache[blocks, 1, pos % bs].double().repeat_interleave(h // kvh, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        if slopes is not None:
            s = s + slopes.double()[:, None] * pos.double()[None, :]
        out[i] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads,alibi", [(64, 8, 8, False), (80, 4, 4, True), (128, 8, 2, False),
                                                         (16, 4, 4, True), (32, 4, 1, False), (96, 6, 3, False)])
@pytest.mark.parametrize("wide", [False, True])
def test_decode_attention_matches_reference(dtype, head_dim, heads, kv_heads, alibi, wide):
    """wide: enough (sequence, head) rows for the kernel of large batches (the other of small ones)."""
    g = torch.Generator(device="cuda").manual_seed(head_dim * 7 + heads)
    bs, num_blocks = 16, 160
    cache = torch.randn(num_blocks, 2, bs, kv_heads, head_dim, generator=g, device="cuda").to(dtype)
    # Contexts from one key to several partitions, and a padding row (0).
    ctx = torch.tensor([1, 15, 127, 128, 129, 256, 257, 700, 0, 1100] * (14 if wide else 1), device="cuda")
    b = ctx.numel()
    max_blocks = -(-int(ctx.max()) // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g, device="cuda")[:max_blocks] for _ in range(b)])
    q = torch.randn(b, heads, head_dim, generator=g, device="cuda").to(dtype)
    slopes = alibi_slopes(heads).cuda() if alibi else None
    scale = head_dim ** -0.5
    ref = reference(q, cache, tables, ctx, scale, slopes)
    need = kernels.num_parts(int(ctx.max()))
    # Exactly the partitions needed, more (as a graph captured for a longer context), and grids
    # smaller than the partitions (blocks stride over them).
    for parts, grid in ((need, 0), (need + 3, 0), (need, 1), (need + 3, 2)):
        out = kernels.decode_attention(q, cache, tables, ctx, scale, parts, slopes, grid=grid)
        rtol, atol = TOL[dtype]
        if alibi and dtype == torch.float32:
            # A score's fp32 rounding grows with slope * key position (~275 at 1100 keys): a few
            # 1e-5 relative in the softmax weights, which the fp64 reference does not have.
            rtol, atol = 5e-5, 5e-5
        torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=rtol, atol=atol)
        assert torch.all(out[8::10] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_attention_reads_the_row_the_kv_write_just_stored(dtype, fused):
    """The attention kernel loads its first key/value rows before it waits for the kernel before it
    (programmatic launch) and loads the new token's row again after the wait. Each round poisons
    the new token's slot with NaN, stores its K/V (write_kv, or fused: the attention kernel itself)
    and attends right after it on the same stream, eagerly and from a CUDA graph; a stale row would
    make the output NaN or wrong, and the fused kernel must leave the new rows in the cache."""
    g = torch.Generator(device="cuda").manual_seed(5)
    heads, d, bs = 8, 64, 16
    ctx = torch.tensor([1, 17, 128, 129, 300, 640], device="cuda")
    b = ctx.numel()
    cache = torch.randn(b * 40, 2, bs, heads, d, generator=g, device="cuda").to(dtype)
    tables = torch.randperm(b * 40, generator=g, device="cuda").view(b, 40)  # no block shared, as in a real step
    pos = ctx - 1
    blocks = tables.gather(1, (pos // bs)[:, None]).squeeze(1)
    offs = pos % bs
    parts = kernels.num_parts(int(ctx.max()))
    q = torch.empty(b, heads, d, device="cuda", dtype=dtype)
    k = torch.empty_like(q)
    v = torch.empty_like(q)

    def step():
        if fused:
            return kernels.decode_attention(q, cache, tables, ctx, d ** -0.5, parts, k_new=k, v_new=v)
        kernels.write_kv(cache, k, v, blocks, offs)
        return kernels.decode_attention(q, cache, tables, ctx, d ** -0.5, parts)

    def fresh():
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        cache[blocks, 0, offs] = float("nan")
        cache[blocks, 1, offs] = float("nan")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fresh()
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            captured = step()
    torch.cuda.current_stream().wait_stream(side)
    rtol, atol = TOL[dtype]
    for r in range(6):
        fresh()
        if r % 2:
            graph.replay()
            out = captured
        else:
            out = step()
        ref = reference(q, cache, tables, ctx, d ** -0.5, None)
        assert not torch.isnan(out).any(), f"round {r}: a stale (NaN) row was read"
        assert torch.equal(cache[blocks, 0, offs], k) and torch.equal(cache[blocks, 1, offs], v)
        torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,alibi,wide", [(8, 8, False, False), (8, 2, False, True), (4, 4, True, False),
                                                       (32, 8, False, True)])
def test_fused_attention_step_equals_write_then_attend(dtype, heads, kv_heads, alibi, wide):
    """One kernel (KV write inside, partitions combined by each row's last block) against the two
    or three kernels it replaces: the same output and the same cache, bit for bit, for both
    attention kernels (wide: the one of large batches), GQA, ALiBi, padding rows, more partitions
    than needed and grids smaller than the partitions, with K/V as strided views of a fused q/k/v
    output, and a replication ring in pinned host memory (some rows not replicated); the combine
    counters are back at 0 after every launch."""
    g = torch.Generator(device="cuda").manual_seed(heads * 31 + kv_heads)
    d, bs = 64, 16
    lens = [1, 16, 17, 128, 129, 300, 0, 700] * (20 if wide else 1)
    ctx = torch.tensor(lens, device="cuda")
    b = ctx.numel()
    max_blocks = -(-max(lens) // bs)
    num_blocks = b * max_blocks + 4
    base = torch.randn(num_blocks, 2, bs, kv_heads, d, generator=g, device="cuda").to(dtype)
    tables = torch.randperm(num_blocks, generator=g, device="cuda")[:b * max_blocks].view(b, max_blocks)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g, device="cuda").to(dtype)
    q = qkv[:, :heads * d].view(b, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(b, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(b, kv_heads, d)
    pos = (ctx - 1).clamp(min=0)
    blocks = torch.where(ctx > 0, tables.gather(1, (pos // bs)[:, None]).squeeze(1), -1)
    offs = pos % bs
    slopes = alibi_slopes(heads).cuda() if alibi else None
    need = kernels.num_parts(max(lens))
    ring_rows = torch.randperm(2 * b, generator=g, device="cuda")[:b]
    ring_rows[::3] = -1
    for parts, grid in ((need, 0), (need + 2, 0), (need, 2)):
        ref_cache, cache = base.clone(), base.clone()
        ref_ring, ring = (torch.zeros(2 * b, 2, kv_heads, d, dtype=dtype, pin_memory=True) for _ in range(2))
        kernels.write_kv(ref_cache, k, v, blocks, offs, ref_ring, ring_rows)
        ref = kernels.decode_attention(q, ref_cache, tables, ctx, d ** -0.5, parts, slopes, grid=grid,
                                       fuse_combine=False)
        out = kernels.decode_attention(q, cache, tables, ctx, d ** -0.5, parts, slopes, grid=grid, k_new=k, v_new=v,
                                       fuse_combine=True, ring=ring, ring_rows=ring_rows)
        torch.cuda.synchronize()
        assert torch.equal(cache, ref_cache), f"parts {parts}, grid {grid}: the caches differ"
        assert torch.equal(ring, ref_ring) and ring.count_nonzero() > 0, f"parts {parts}, grid {grid}: the rings differ"
        assert torch.equal(out, ref), f"parts {parts}, grid {grid}: the outputs differ"
        assert torch.all(out[ctx == 0] == 0)
        assert all(int(c.count_nonzero()) == 0 for c in kernels._COUNTERS.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_stores_rows_and_skips_padding(dtype):
    cache = torch.zeros(8, 2, 4, 2, 32, dtype=dtype, device="cuda")
    k = torch.randn(5, 2, 32, device="cuda").to(dtype)
    v = torch.randn(5, 2, 32, device="cuda").to(dtype)
    blocks = torch.tensor([3, 3, 0, -1, 7], device="cuda")
    offs = torch.tensor([0, 3, 2, 1, 1], device="cuda")
    kernels.write_kv(cache, k, v, blocks, offs)
    ref = torch.zeros_like(cache)
    keep = blocks >= 0
    ref[blocks[keep], 0, offs[keep]] = k[keep]
    ref[blocks[keep], 1, offs[keep]] = v[keep]
    assert torch.equal(cache, ref)
    # A non-contiguous source (BLOOM's fused q/k/v view) is stored the same way.
    fused = torch.randn(5, 2, 3, 32, device="cuda").to(dtype)
    kernels.write_kv(cache, fused[:, :, 1], fused[:, :, 2], blocks, offs)
    assert torch.equal(cache[3, 0, 3], fused[1, :, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 1])
def test_write_kv_stores_rows_into_the_ring_aligned_or_not(dtype, shift):
    """The KV write stores 16-byte vectors where every address allows it and falls back to elements
    where one does not (shift 1: each source row starts one element past 16 bytes): the cache and
    the replication ring (pinned host memory) hold the same rows either way, rows with no ring row
    left untouched."""
    g = torch.Generator(device="cuda").manual_seed(7 + shift)
    kvh, d, n = 2, 64, 6
    cache = torch.zeros(8, 2, 4, kvh, d, dtype=dtype, device="cuda")
    src = torch.randn(n, 2 * kvh * d + 8, generator=g, device="cuda").to(dtype)
    k = src[:, shift:shift + kvh * d].view(n, kvh, d)
    v = src[:, shift + kvh * d:shift + 2 * kvh * d].view(n, kvh, d)
    blocks = torch.tensor([3, 3, 0, -1, 7, 5], device="cuda")
    offs = torch.tensor([0, 3, 2, 1, 1, 0], device="cuda")
    ring_rows = torch.tensor([4, -1, 0, 2, 1, 3], device="cuda")
    ring = torch.zeros(5, 2, kvh, d, dtype=dtype, pin_memory=True)
    kernels.write_kv(cache, k, v, blocks, offs, ring, ring_rows)
    torch.cuda.synchronize()
    ref, ref_ring = torch.zeros_like(cache), torch.zeros_like(ring)
    keep = blocks >= 0
    ref[blocks[keep], 0, offs[keep]] = k[keep]
    ref[blocks[keep], 1, offs[keep]] = v[keep]
    live = (blocks >= 0) & (ring_rows >= 0)
    ref_ring[ring_rows[live].cpu(), 0] = k[live].cpu()
    ref_ring[ring_rows[live].cpu(), 1] = v[live].cpu()
    assert torch.equal(cache, ref)
    assert torch.equal(ring, ref_ring) and ring.count_nonzero() > 0


def test_paged_attention_decode_kernel_matches_torch_path(monkeypatch):
    """The layer-level switch: the same decode batch through the kernels and through the torch code."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(40, 2, 16, 2, 64, generator=g).cuda()
    items = [([5], 30, [3, 9]), ([6], 300, list(range(10, 29))), ([7], 0, [39])]
    ids, pos, meta, _ = build_metadata(items, 16, torch.device("cuda"))
    assert meta.context_lens is not None and meta.num_parts == kernels.num_parts(301)
    q = torch.randn(3, 4, 64, generator=g).cuda()
    k = torch.randn(3, 2, 64, generator=g).cuda()
    v = torch.randn(3, 2, 64, generator=g).cuda()
    fast_cache = cache.clone()
    fast = paged_attention(q, k, v, fast_cache, meta, scale=0.125)
    monkeypatch.setenv("DEJAVU_ATTENTION", "torch")
    slow = paged_attention(q, k, v, cache, meta, scale=0.125)
    assert torch.equal(fast_cache, cache)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(TINY))
def test_fast_path_greedy_equals_eager_and_hf(family, tmp_path):
    """fp32: CUDA graphs + kernels, the eager torch path and HF give the same greedy tokens, for
    batches that grow and shrink (requests of several lengths, so graph buckets change)."""
    hf = save_hf_model(family, tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 3)]
    lens = [6, 20, 11, 3, 30]
    fast = LLM(model=str(tmp_path), device="cuda", dtype="float32", block_size=4, max_num_seqs=8)
    assert fast.engine.runner.graphs is not None
    outs = fast.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens])
    eager = LLM(model=str(tmp_path), device="cuda", dtype="float32", block_size=4, max_num_seqs=8, cuda_graphs=False)
    assert eager.engine.runner.graphs is None
    ref = eager.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens])
    for p, n, o, r in zip(prompts, lens, outs, ref):
        assert o.token_ids == r.token_ids
        assert o.token_ids == hf_greedy(hf, p, n)
    assert fast.engine.num_chained > 0  # steps queued before the host read the tokens before them


@pytest.mark.parametrize("graphs", [True, False])
def test_overlapped_graph_steps_equal_synchronous_ones(tmp_path, graphs):
    """fp16 decode through CUDA graphs (or eager steps) with each step's input id taken on the device
    from the step before (overlapped) and from the host (not): the same tokens, with stop tokens that
    end sequences while a step is queued for them, and a late request that changes the bucket."""
    hf = save_hf_model("llama", tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (2, 9, 30, 4)]
    runs = []
    for overlap in (False, True):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", block_size=4, max_num_seqs=8,
                  cuda_graphs=graphs, overlap_steps=overlap)
        assert (llm.engine.runner.graphs is not None) == graphs and llm.engine.overlap == overlap
        free = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
        params = []
        for i, o in enumerate(free):
            t = o.token_ids
            new = [x for j, x in enumerate(t) if j >= 3 + 2 * i and x not in t[:j]]
            params.append(SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=new[:1]))
        runs.append(([o.token_ids for o in free], [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]))
        assert (llm.engine.num_chained > 0) == overlap
        # chained steps mostly run from the inputs the step before left on the device
        if graphs:
            assert (llm.engine.runner.graphs.num_advanced > 0) == overlap
        assert llm.engine.cache.allocator.num_used == 0
    assert runs[0] == runs[1]


def test_graph_step_events_time_each_replay(tmp_path):
    """DecodeGraphs.step_events (benchmarks): one pair of timing events around each replayed decode
    step, in stream order and each step a positive time; the tokens are those of a run without them."""
    save_hf_model("llama", tmp_path)
    prompts = [[5, 9, 12], [7, 3, 4, 8, 2]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", block_size=4, max_num_seqs=4)
    graphs = llm.engine.runner.graphs
    ref = [o.token_ids for o in llm.generate(prompts, params)]
    graphs.step_events = []
    runs = graphs.num_advanced
    got = [o.token_ids for o in llm.generate(prompts, params)]
    events, graphs.step_events = graphs.step_events, None
    torch.cuda.synchronize()
    assert got == ref and graphs.num_advanced > runs
    assert len(events) == 9  # every decode step (the first token comes from the prefill)
    assert all(a.elapsed_time(b) > 0 for a, b in events)
    # each step starts after the one before it ended
    assert all(b.elapsed_time(c) >= 0 for (_, b), (c, _) in zip(events, events[1:]))


# ---------------------------------------------------------------------- greedy_step_end
@pytest.mark.parametrize("rows,vocab,pad", [(1, 50272, 0), (3, 32003, 5), (5, 7, 1), (2, 1, 0), (4, 4096, 64),
                                             (64, 50272, 0), (3, 2049, 3)])
def test_greedy_step_end_is_torch_argmax(rows, vocab, pad):
    """Fresh random fp32 logits (a strided view where pad > 0) with planted ties (across the blocks
    a row is split over, from 2049 logits on), a row of -inf, a NaN, and a row whose largest value
    is its last: the kernel's tokens, on the device and in pinned memory, are torch.argmax's. Three
    launches in a row on fresh logits: the split rows' counters are left at 0 for the next."""
    g = torch.Generator(device="cuda").manual_seed(rows * 131 + vocab)
    for _ in range(3):
        logits = torch.randn(rows, vocab + pad, device="cuda", generator=g)[:, :vocab]
        if vocab > 10:
            logits[0, vocab - 3] = logits[0, 7] = logits[0].max() + 1  # a tie: the first index wins
        if rows > 2:
            logits[1] = float("-inf")
            logits[2, vocab // 2] = float("nan")
            logits[-1, vocab - 1] = logits[-1].max() + 1
        tokens = torch.full((rows + 2,), -7, dtype=torch.int64, device="cuda")
        host = torch.full((rows + 2,), -7, dtype=torch.int64).pin_memory()
        kernels.greedy_step_end(logits, tokens, host)
        torch.cuda.synchronize()
        ref = torch.argmax(logits, dim=-1)
        assert torch.equal(tokens[:rows], ref) and torch.equal(host[:rows], ref.cpu())
        assert tokens[rows:].tolist() == [-7, -7] and host[rows:].tolist() == [-7, -7]  # nothing past the rows
    if kernels._C.greedy_part_words(rows, vocab):
        stream = torch.cuda.current_stream().cuda_stream
        assert int(kernels._counters(logits.device, stream, rows, "greedy")[:rows].abs().sum()) == 0


def test_greedy_step_end_advances_graph_inputs():
    """With the graph input fields: a live row's next id, position, slot, context length and ring row
    from its token and block table; padding rows untouched; a position past the table gets slot -1."""
    bucket, max_blocks, bs, vocab = 4, 3, 4, 100
    g = torch.Generator().manual_seed(9)
    tables = torch.randint(0, 50, (bucket, max_blocks), generator=g)
    pos = torch.tensor([2, 3, 11, 0])  # row 1 crosses into its second block; row 2 runs off the table
    blk = torch.stack([tables[i, pos[i] // bs] for i in range(bucket)])
    blk[3] = -1  # padding
    fields = torch.cat([torch.tensor([5, 6, 7, 0]), pos, blk, pos % bs, pos + 1, torch.tensor([8, 9, 10, -1]),
                        tables.reshape(-1)]).cuda()
    before = fields.clone().cpu()
    logits = torch.randn(bucket, vocab, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    tokens = torch.empty(bucket, dtype=torch.int64, device="cuda")
    kernels.greedy_step_end(logits, tokens, None, fields, bucket, max_blocks, bs)
    torch.cuda.synchronize()
    tok = torch.argmax(logits, -1).cpu()
    f = fields.cpu()
    want = before.clone()
    for r in range(3):
        p = int(pos[r]) + 1
        want[r], want[bucket + r], want[4 * bucket + r] = tok[r], p, p + 1
        want[2 * bucket + r] = int(tables[r, p // bs]) if p // bs < max_blocks else -1
        want[3 * bucket + r], want[5 * bucket + r] = p % bs, -1
    assert torch.equal(f, want)
    assert f[2 * bucket + 2] == -1 and f[2 * bucket + 1] == tables[1, 1]


@pytest.mark.parametrize("live,first,ring_size", [(3, 8, 20), (3, 8, 12), (3, 8, 11), (4, 0, 8), (4, 4, 8),
                                                   (4, 3, 10), (1, 0, 1), (3, 5, 0)])
def test_greedy_step_end_advances_ring_rows_as_the_sender_reserves_them(live, first, ring_size):
    """With a ring of ring_size rows: the live rows (the bucket's first `live`, at ring rows
    first..first+live-1) move on to the rows ReplicaSender::ring_stage reserves next (kvstream/ring_rows.h's
    next_ring_row: consecutive, or from 0 where they would run past the end); padding rows keep -1;
    ring_size 0 leaves -1 (no ring). The other fields advance as without a ring."""
    from dejavu._C import next_ring_row

    bucket, max_blocks, bs, vocab = 4, 3, 4, 100
    tables = torch.arange(bucket * max_blocks).view(bucket, max_blocks) + 20
    pos = torch.tensor([2, 3, 5, 6])
    blk = torch.stack([tables[i, pos[i] // bs] for i in range(bucket)])
    blk[live:] = -1
    rows = torch.tensor([first + i if i < live else -1 for i in range(bucket)])
    fields = torch.cat([torch.tensor([5, 6, 7, 8]), pos, blk, pos % bs, pos + 1, rows, tables.reshape(-1)]).cuda()
    before = fields.clone().cpu()
    logits = torch.randn(bucket, vocab, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    tokens = torch.empty(bucket, dtype=torch.int64, device="cuda")
    kernels.greedy_step_end(logits, tokens, None, fields, bucket, max_blocks, bs, ring_size)
    torch.cuda.synchronize()
    f, tok, want = fields.cpu(), torch.argmax(logits, -1).cpu(), before.clone()
    nxt = next_ring_row(first, live, ring_size)
    for r in range(live):
        p = int(pos[r]) + 1
        want[r], want[bucket + r], want[4 * bucket + r] = tok[r], p, p + 1
        want[2 * bucket + r], want[3 * bucket + r] = int(tables[r, p // bs]), p % bs
        want[5 * bucket + r] = nxt + r if nxt >= 0 else -1
    assert torch.equal(f, want)
    if ring_size:
        assert 0 <= nxt and nxt + live <= ring_size and (nxt == 0 or nxt == first + live)


def test_greedy_step_end_rejects_bad_arguments():
    logits = torch.randn(3, 10, device="cuda")
    tokens = torch.empty(3, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="fp32"):
        kernels.greedy_step_end(logits.half(), tokens)
    with pytest.raises(ValueError, match="tokens must be contiguous int64"):
        kernels.greedy_step_end(logits, tokens[:2])
    with pytest.raises(ValueError, match="a bucket of 2 needs"):
        kernels.greedy_step_end(logits, tokens, None, torch.zeros(5, dtype=torch.int64, device="cuda"), 2, 3, 4)
    from dejavu import _C
    with pytest.raises(RuntimeError, match="rows <= bucket"):
        _C.greedy_step_end(logits.data_ptr(), 3, 10, 10, tokens.data_ptr(), 0,
                           torch.zeros(100, dtype=torch.int64, device="cuda").data_ptr(), 2, 3, 4)
    with pytest.raises(RuntimeError, match="stride >= vocab"):
        _C.greedy_step_end(logits.data_ptr(), 3, 10, 5, tokens.data_ptr())
    wide = torch.randn(1, 50272, device="cuda")
    if _C.greedy_part_words(1, 50272):
        with pytest.raises(RuntimeError, match="needs counters and parts"):
            _C.greedy_step_end(wide.data_ptr(), 1, 50272, 50272, tokens.data_ptr())


# ---------------------------------------------------------------------- small_linear (decode GEMV)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,k_in,x_pad", [(2048, 2048, 0), (333, 136, 8), (6144, 8192, 0), (50, 4104, 24),
                                              (37, 8192, 8), (100, 4096, 0), (77, 16384, 0), (2048, 8192, 0)])
def test_small_linear_matches_reference(dtype, rows, n_out, k_in, x_pad):
    """Shapes: OPT-1.3B's, an odd row count with a K that leaves the unrolled loop a remainder, a
    large K, a strided x; K split over 2 or 4 warps (4096, 8192, 16384 inputs), with a row count
    that leaves a block's last row empty; OPT-1.3B's fc2 (2048 x 8192: split over 2 warps, the
    widest split whose blocks fit on the device in one wave). Fresh random inputs; the output poisoned first; fp64
    reference."""
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + n_out)
    big = torch.randn(rows, k_in + x_pad, device="cuda", dtype=dtype, generator=g)
    x = big[:, :k_in]
    w = (torch.randn(n_out, k_in, device="cuda", dtype=dtype, generator=g) / k_in ** 0.5)
    b = torch.randn(n_out, device="cuda", dtype=dtype, generator=g)
    for bias in (None, b):
        for relu in (False, True):
            y = torch.full((rows, n_out), float("nan"), device="cuda", dtype=dtype)
            from dejavu import _C

            _C.small_linear(y.data_ptr(), x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(), rows,
                            n_out, k_in, x.stride(0), int(relu), kernels._HALF[dtype],
                            torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
            ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
            if relu:
                ref = ref.clamp_min(0)
            assert not torch.isnan(y).any()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < (2e-3 if dtype == torch.float16 else 1e-2), err
            if kernels.small_linear_serves(x, w, bias):  # through the torch face: the same values
                assert torch.equal(kernels.linear(x, w, bias, relu=relu), y)
                # fp32 outputs (an LM head's logits): the dtype's outputs converted, bit for bit
                y32 = kernels.linear(x, w, bias, relu=relu, float_out=True)
                assert y32.dtype == torch.float32 and torch.equal(y32, y.float())


def test_linear_falls_back_where_the_kernel_does_not_serve():
    w = torch.randn(64, 32, device="cuda", dtype=torch.float16)
    for x, why in [(torch.randn(5, 32, device="cuda", dtype=torch.float16), "5 rows"),
                   (torch.randn(2, 32, device="cuda", dtype=torch.float32), "fp32"),
                   (torch.randn(2, 40, device="cuda", dtype=torch.float16)[:, 1:33], "misaligned, odd stride")]:
        wx = w.to(x.dtype)
        assert not kernels.small_linear_serves(x, wx, None), why
        torch.testing.assert_close(kernels.linear(x, wx), torch.nn.functional.linear(x, wx), rtol=0, atol=0)
    x = torch.randn(3, 32, device="cuda", dtype=torch.float16)
    assert kernels.small_linear_serves(x, w, None)
    y = kernels.linear(x.view(3, 1, 32), w)  # leading dims are flattened and restored
    assert y.shape == (3, 1, 64)


# ---------------------------------------------------------------------- add_norm (residual add + norm)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 2048, 8192])
@pytest.mark.parametrize("kind", ["layernorm", "layernorm_nobias", "rmsnorm"])
def test_add_norm_matches_reference(dtype, hidden, kind):
    from dejavu.models.layers import RMSNorm

    g = torch.Generator(device="cuda").manual_seed(hidden + len(kind))
    if kind == "rmsnorm":
        norm = RMSNorm(hidden, 1e-6)
    else:
        norm = torch.nn.LayerNorm(hidden, eps=1e-5, bias=kind == "layernorm")
    norm = norm.to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, device="cuda", dtype=dtype, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(hidden, device="cuda", dtype=dtype, generator=g))
    for rows in (1, 3, 17):
        h = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g) * 3
        a = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g)
        with torch.inference_mode():
            s, y = kernels.add_norm(h, a, norm)
        assert torch.equal(s, h + a)  # the residual stream is exactly torch's
        x = s.double()
        if kind == "rmsnorm":
            ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
        else:
            ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
            ref = ref * norm.weight.double() + (0 if norm.bias is None else norm.bias.double())
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert not torch.isnan(y).any() and err < (2e-3 if dtype == torch.float16 else 1e-2), (rows, err)
        with torch.inference_mode():  # and the torch path it replaces agrees to the same tolerance
            torch_y = norm(h + a)
        assert ((torch_y.double() - y.double()).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 1e-2)


def test_add_norm_falls_back_to_torch():
    norm = torch.nn.LayerNorm(100).to("cuda", torch.float16)  # 100 is not a multiple of 8
    h = torch.randn(2, 100, device="cuda", dtype=torch.float16)
    a = torch.randn(2, 100, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        s, y = kernels.add_norm(h, a, norm)
        assert torch.equal(s, h + a) and torch.equal(y, norm(h + a))
        norm32 = torch.nn.LayerNorm(64).to("cuda")
        h32, a32 = torch.randn(2, 64, device="cuda"), torch.randn(2, 64, device="cuda")
        s, y = kernels.add_norm(h32, a32, norm32)  # fp32: the torch ops, bit for bit
        assert torch.equal(y, norm32(h32 + a32))


# ---------------------------------------------------------------------- add + norm + linear in one kernel
def _norm(kind: str, hidden: int, dtype: torch.dtype, g: torch.Generator) -> torch.nn.Module:
    from dejavu.models.layers import RMSNorm

    norm = RMSNorm(hidden, 1e-6) if kind == "rmsnorm" else torch.nn.LayerNorm(hidden, eps=1e-5, bias=kind == "layernorm")
    norm = norm.to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, device="cuda", dtype=dtype, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(hidden, device="cuda", dtype=dtype, generator=g))
    return norm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layernorm", "layernorm_nobias", "rmsnorm"])
@pytest.mark.parametrize("hidden,n_out", [(2048, 6144), (576, 1728), (64, 333), (4096, 100), (8192, 37)])
def test_add_norm_linear_equals_add_norm_then_linear(dtype, kind, hidden, n_out, monkeypatch):
    """The add and the norm as the linear kernel's prologue give bit for bit what add_norm then
    linear give: the residual sum and the output (bias or none, ReLU or none), for 1-4 rows and K
    split over 1, 2 or 4 warps (4096 and 8192 inputs). Where it serves, the fused kernel must be
    the one that ran (add_norm and linear are made to fail); where not, the fallback answers."""
    g = torch.Generator(device="cuda").manual_seed(hidden + n_out + len(kind))
    norm = _norm(kind, hidden, dtype, g)
    w = torch.randn(n_out, hidden, device="cuda", dtype=dtype, generator=g) / hidden ** 0.5
    b = torch.randn(n_out, device="cuda", dtype=dtype, generator=g)
    fused_any = False
    for rows in (1, 2, 3, 4):
        h = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g) * 3
        a = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g)
        for bias in (None, b):
            for relu in (False, True):
                with torch.inference_mode():
                    s_ref, x_ref = kernels.add_norm(h, a, norm)
                    y_ref = kernels.linear(x_ref, w, bias, relu=relu)
                    with monkeypatch.context() as m:
                        # the kernel's prologue takes up to 4 rows (the models fuse 1: NORM_LINEAR_MAX_ROWS)
                        m.setattr(kernels, "NORM_LINEAR_MAX_ROWS", 4)
                        fused = kernels.norm_linear_serves(h, a, norm, w, bias)
                        if fused:
                            def refuse(*args, **kw):
                                raise AssertionError("the fused kernel should have served this call")
                            m.setattr(kernels, "add_norm", refuse)
                            m.setattr(kernels, "linear", refuse)
                        s, y = kernels.add_norm_linear(h, a, norm, w, bias, relu=relu)
                fused_any |= fused
                assert torch.equal(s, s_ref), (rows, bias is None, relu)
                assert torch.equal(y, y_ref), (rows, bias is None, relu)
    assert fused_any  # every shape here has at least its one-row case fused


def test_add_norm_linear_rejects_bad_prologues():
    """The C++ checks name the problem: rows too wide for the shared-memory copy, misalignment."""
    from dejavu import _C

    dt = kernels._HALF[torch.float16]
    stream = torch.cuda.current_stream().cuda_stream
    h = torch.randn(4, 8192, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 8192, device="cuda", dtype=torch.float16)
    y = torch.empty(4, 16, device="cuda", dtype=torch.float16)
    nw = torch.ones(8192, device="cuda", dtype=torch.float16)
    s = torch.empty_like(h)
    with pytest.raises(RuntimeError, match="bytes of input rows"):  # 4 x 8192 fp16 = 64 KiB
        _C.small_linear(y.data_ptr(), 0, w.data_ptr(), 0, 4, 16, 8192, 8192, 0, dt, stream, norm_h=h.data_ptr(),
                        norm_a=h.data_ptr(), norm_weight=nw.data_ptr(), sum_out=s.data_ptr())
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        _C.small_linear(y.data_ptr(), 0, w.data_ptr(), 0, 1, 16, 8192, 8192, 0, dt, stream,
                        norm_h=h.data_ptr() + 2, norm_a=h.data_ptr(), norm_weight=nw.data_ptr(), sum_out=s.data_ptr())
    with pytest.raises(RuntimeError, match="needs h, a, weight and sum_out"):
        _C.small_linear(y.data_ptr(), 0, w.data_ptr(), 0, 1, 16, 8192, 8192, 0, dt, stream, norm_h=h.data_ptr(),
                        norm_a=h.data_ptr(), norm_weight=nw.data_ptr())
    with pytest.raises(RuntimeError, match="needs h, a, weight and sum_out"):  # a norm weight alone is a prologue
        _C.small_linear(y.data_ptr(), 0, w.data_ptr(), 0, 1, 16, 8192, 8192, 0, dt, stream, norm_weight=nw.data_ptr())
    with pytest.raises(RuntimeError, match="x is null"):  # no prologue and no input
        _C.small_linear(y.data_ptr(), 0, w.data_ptr(), 0, 1, 16, 8192, 8192, 0, dt, stream)
    with pytest.raises(RuntimeError, match="w must be 16-byte aligned"):
        _C.small_linear(y.data_ptr(), 0, w.data_ptr() + 2, 0, 1, 16, 8192, 8192, 0, dt, stream,
                        norm_h=h.data_ptr(), norm_a=h.data_ptr(), norm_weight=nw.data_ptr(), sum_out=s.data_ptr())


def _greedy_tokens_either_way(family, tmp_path, monkeypatch, switch: str, fn: str, seed: int, counts=None):
    """fp16 greedy tokens through CUDA graphs with kernels.<switch> off and on: ({on: tokens},
    {on: whether _C.<fn> ran}, counting only the calls `counts(kwargs)` accepts). The lengths
    leave one sequence decoding alone: the models fuse one-row steps."""
    from dejavu import _C

    hf = save_hf_model(family, tmp_path)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (2, 9, 33)]
    launches = []
    plain = getattr(_C, fn)

    def counting(*args, **kw):
        launches.append(counts is None or counts(kw))
        return plain(*args, **kw)

    monkeypatch.setattr(_C, fn, counting)
    outs, ran = {}, {}
    for on in (False, True):
        monkeypatch.setattr(kernels, switch, on)
        launches.clear()
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", block_size=4, max_num_seqs=4)
        assert llm.engine.runner.graphs is not None
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 8, 4)]
        outs[on] = [o.token_ids for o in llm.generate(prompts, params)]
        llm.shutdown()
        ran[on] = any(launches)  # (counted as the graphs were captured and on eager steps)
    return outs, ran


@pytest.mark.parametrize("family", ["opt", "opt-gelu", "llama"])
def test_add_norm_linear_keeps_greedy_tokens(family, tmp_path, monkeypatch):
    """fp16 decode through CUDA graphs: the same greedy tokens with the norm inside the linear
    kernels (DEJAVU_NORM_LINEAR) and without, and with it on the prologue kernels did run."""
    outs, ran = _greedy_tokens_either_way(family, tmp_path, monkeypatch, "NORM_LINEAR", "small_linear", seed=5,
                                          counts=lambda kw: kw.get("norm_h", 0) != 0)
    assert ran == {False: False, True: True}
    assert outs[True] == outs[False]


# ---------------------------------------------------------------------- programmatic dependent launch
def _kernel_chain(x: torch.Tensor, ws: list[torch.Tensor], norm: torch.nn.LayerNorm) -> list[torch.Tensor]:
    """add_norm -> linear (ReLU) -> linear, up to 3 x len(ws) // 2 kernels, each reading the last
    one's output (and the residual stream two kernels back)."""
    outs, h, a = [], x, torch.zeros_like(x)
    for w1, w2 in zip(ws[::2], ws[1::2]):
        # (one kernel at batch 1: the add and norm as the linear kernel's prologue)
        h, y = kernels.add_norm_linear(h, a, norm, w1, relu=True)
        a = kernels.linear(y, w2)
        outs += [h, a]
    return outs


@pytest.mark.parametrize("rows", [1, 3])
def test_programmatic_launch_changes_no_bits(rows):
    """Launched with programmatic dependent launch (on compute capability 9.0+ each kernel starts
    before the previous one ends and waits for it before it reads an activation), the decode
    kernels give bit for bit what they give launched one after the other: a chain of 60 kernels,
    eager and captured in a CUDA graph, against the same chain with it off."""
    from dejavu import _C

    g = torch.Generator(device="cuda").manual_seed(rows)
    hidden, ffn = 2048, 8192  # OPT-1.3B's: the weight rows span more than what is loaded before the wait
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16, generator=g)
    ws = []
    for _ in range(20):
        ws += [torch.randn(ffn, hidden, device="cuda", dtype=torch.float16, generator=g) / hidden ** 0.5,
               torch.randn(hidden, ffn, device="cuda", dtype=torch.float16, generator=g) / ffn ** 0.5]
    norm = torch.nn.LayerNorm(hidden, device="cuda", dtype=torch.float16)
    results = {}
    try:
        for mode in (0, 1):
            _C.set_programmatic_launch(mode)
            assert _C.programmatic_launch() == bool(mode)
            eager = _kernel_chain(x, ws, norm)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    captured = _kernel_chain(x, ws, norm)
            torch.cuda.current_stream().wait_stream(side)
            for c in captured:
                c.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            results[mode] = (eager, captured)
    finally:
        _C.set_programmatic_launch(-1)
    off_eager, off_graph = results[0]
    for name, outs in (("eager", results[1][0]), ("graph", results[1][1]), ("graph, off", off_graph)):
        for i, (a, b) in enumerate(zip(outs, off_eager)):
            assert torch.equal(a, b), f"{name}: kernel group {i} differs"


def test_programmatic_launch_is_active_where_the_device_has_it():
    """The build's kernels run code compiled for the device (sm_90a on Hopper), not the generic
    PTX JIT-compiled, so programmatic launch is in use on a 9.0+ device when the setting is on: a
    build that lost it would still pass every bit-for-bit test, only slower."""
    from dejavu import _C

    major, _ = torch.cuda.get_device_capability()
    try:
        _C.set_programmatic_launch(1)
        assert _C.programmatic_launch_active() == (major >= 9)
        _C.set_programmatic_launch(0)
        assert not _C.programmatic_launch_active()
    finally:
        _C.set_programmatic_launch(-1)


def test_programmatic_launch_keeps_greedy_tokens(tmp_path):
    """fp16 decode through CUDA graphs: the same greedy tokens with programmatic launch on and off."""
    from dejavu import _C

    hf = save_hf_model("llama", tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (2, 9, 33)]
    outs = {}
    try:
        for mode in (0, 1):
            _C.set_programmatic_launch(mode)
            llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", block_size=4, max_num_seqs=4)
            assert llm.engine.runner.graphs is not None
            outs[mode] = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))]
            llm.shutdown()
    finally:
        _C.set_programmatic_launch(-1)
    assert outs[1] == outs[0]
