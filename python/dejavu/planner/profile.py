"""`dejavu profile`: measure what the planner and the simulator need, on this machine.

Stages run real prefill and decode steps over a paged
cache (the engine's model code and metadata, random weights of the model's shapes unless the
model has weights) for a grid of microbatch sizes and prompt lengths / contexts, for four stages:
one middle layer, the first layer (+ embeddings), the last layer (+ final norm, LM head, sampling's
logits) and all layers; least squares fits time = a + c*b + d*sum(len) (+ e*sum(len^2) for
prefill) for each, and a stage of k layers is one layer + (k-1) per-layer costs + the ends it holds. Also: weight bytes and KV bytes per token (exact, from the
model's shapes), host<->device and prompt->token copy bandwidth, and the controller's round trip
per pipeline step (a real one-worker pipeline, unless --no-overhead).

Threads and contention: a CPU worker of a W-worker deployment gets cores / W threads and shares
memory bandwidth with the others; with --workers W the profile runs with that many threads while
W-1 helper processes run the same steps, so the times are the ones those workers will see.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from .model import Fit, PlanError, Profile, stage_layers


def _fit(rows: list[tuple[int, int, int, float]], quadratic: bool) -> Fit:
    """rows: (b, sum_len, sum_len_sq, seconds). Non-negative least squares by dropping terms that
    come out negative (tiny models can measure noise as a negative slope)."""
    names = ["a", "c", "d"] + (["e"] if quadratic else [])
    cols = {"a": [1.0] * len(rows), "c": [float(r[0]) for r in rows], "d": [float(r[1]) for r in rows],
            "e": [float(r[2]) for r in rows]}
    y = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    active = list(names)
    while True:
        X = torch.tensor([cols[n] for n in active], dtype=torch.float64).T
        scale = X.abs().max(dim=0).values.clamp_min(1e-30)
        sol = torch.linalg.lstsq(X / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
        neg = [n for n, v in zip(active, sol.tolist()) if v < 0 and n != "a"]
        if not neg:
            break
        active.remove(neg[0])
    coef = dict(zip(active, sol.tolist()))
    return Fit(a=coef.get("a", 0.0), c=coef.get("c", 0.0), d=coef.get("d", 0.0), e=coef.get("e", 0.0))


def _time(fn, device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _stage_rows(src, device, dtype, layers: tuple[int, int], batches, prompt_lens, contexts, block_size, repeat,
                seed):
    from ..engine.kv_cache import PagedKVCache
    from ..engine.model_runner import build_metadata
    from ..models.loader import load_model

    model = load_model(src, device, dtype, seed=seed, layer_range=layers)
    cfg = model.cfg
    longest = max(max(prompt_lens), max(contexts)) + 1
    per_seq = -(-longest // block_size)
    nb = max(batches) * per_seq
    cache = PagedKVCache(layers[1] - layers[0], nb, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    hidden = cfg.hidden_size
    first, last = layers[0] == 0, layers[1] == cfg.num_layers
    prompt_rows, token_rows = [], []

    def run(items):
        ids, pos, meta, idx = build_metadata(items, block_size, device)
        x = ids if first else torch.randn(ids.numel(), hidden, dtype=dtype, device=device)
        h = model(x, pos, meta, cache.tensor)
        if last:
            model.compute_logits(h[idx])

    with torch.inference_mode():
        for b in batches:
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
            for n in prompt_lens:
                items = [([5] * n, 0, tables[i][:-(-n // block_size)]) for i in range(b)]
                prompt_rows.append((b, b * n, b * n * n, _time(lambda: run(items), device, repeat)))
            for ctx in contexts:
                items = [([5], ctx, tables[i][:ctx // block_size + 1]) for i in range(b)]
                token_rows.append((b, b * ctx, 0, _time(lambda: run(items), device, repeat)))
    return prompt_rows, token_rows


def _load_loop(model: str, dtype: str, batches, prompt_lens, contexts, seed: int, stop) -> None:
    """Another worker of the deployment: runs the same kind of steps until told to stop."""
    from ..models.loader import parse_dtype, resolve

    torch.set_num_threads(1)
    dev = torch.device("cpu")
    src = resolve(model)
    while not stop.is_set():
        _stage_rows(src, dev, parse_dtype(dtype, dev), (0, src.config.num_layers), batches, prompt_lens, contexts,
                    16, 1, seed)


def _start_load(model, dtype, batches, prompt_lens, contexts, n: int, seed: int) -> list:
    """CPU workers share the host's memory bandwidth and caches: measure with the deployment's
    other workers busy too (n processes running the same steps), as they will be."""
    if n <= 0:
        return []
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_load_loop, args=(model, dtype, batches, prompt_lens, contexts, seed, stop),
                         daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let them load their weights and start stepping
    return [stop, *procs]


def _stop_load(load: list) -> None:
    if not load:
        return
    stop, *procs = load
    stop.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def _bandwidths(device, dtype) -> tuple[float, float]:
    """(host<->device bytes/s through pinned memory, prompt->token copy bytes/s on this host)."""
    n = 64 << 20
    if device.type == "cuda":
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        pcie = n / _time(lambda: dev.copy_(host, non_blocking=True), device, 5)
        other = torch.empty_like(dev)
        link = n / _time(lambda: other.copy_(dev), device, 5)
        return pcie, link
    a = torch.empty(n, dtype=torch.uint8)
    b = torch.empty_like(a)
    bw = n / _time(lambda: b.copy_(a), device, 5)
    return bw, bw


def _stage_link(device, dtype, hidden: int, tokens: int = 4096, repeat: int = 5) -> float:
    """Bytes/s of hidden states from one pipeline stage to the next as the fault-tolerant pipes
    carry them (parallel/pipe.py: device -> pinned host -> TCP loopback -> pinned host -> device),
    `repeat` prefill-sized messages back to back (the sends are asynchronous, so this is the
    link's throughput, not one message's latency)."""
    import threading

    from ..parallel.pipe import StagePipes

    cuda = device.type == "cuda"
    a, b = StagePipes("profile", 0, timeout=60), StagePipes("profile", 1, timeout=60)
    try:
        a.configure(0, None, ("127.0.0.1", b.port, 1))
        b.configure(0, 0, None)
        h = torch.randn(tokens, hidden, device=device).to(dtype)
        got: list = []

        def receive(n):
            for i in range(n):
                buf = torch.empty((tokens, hidden), dtype=dtype, pin_memory=cuda)
                got.append(b.recv(i, buf).to(device, non_blocking=True))
            if cuda:
                torch.cuda.synchronize(device)

        for n in (1, repeat):  # the first message connects and warms up; the second round is timed
            got.clear()
            rx = threading.Thread(target=receive, args=(n,))
            t0 = time.perf_counter()
            rx.start()
            for i in range(n):
                a.send(i, h)
            rx.join(120)
            if rx.is_alive() or len(got) != n:
                raise PlanError("the stage-link measurement did not complete")
            dt = time.perf_counter() - t0
        if not torch.equal(got[-1], h):
            raise PlanError("the stage-link measurement received different bytes")
        return repeat * h.numel() * h.element_size() / dt
    finally:
        a.close()
        b.close()


def _overhead(prof: Profile, model: str, device: str, dtype: str, seed: int, batch: int, context: int,
              via: str = "engine") -> float:
    """Seconds a pipeline step takes beyond its stages' compute (controller, messages, scheduling,
    the hidden-state hop): real decode steps of one microbatch through a two-worker pipeline minus
    the two stages' profiled times. via="http": the steps are driven through the HTTP server by
    `dejavu bench serve` in another process, so the server's and the client's CPU time on this
    host count too (what a same-host `dejavu serve` + load generator pays)."""
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    if via not in ("engine", "http"):
        raise PlanError(f"overhead via {via!r}: use engine or http")
    llm = LLM(model=model, device=device, dtype=dtype, seed=seed, pp=2, microbatch_size=batch)
    try:
        prompts = [[7] * context] * batch
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        if via == "http":
            step = _http_steps(llm, model, batch, context, 33) / 33
        else:
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=33, ignore_eos=True))
            step = (time.perf_counter() - t0) / 33
    finally:
        llm.shutdown()
    a, b = stage_layers(prof.num_layers, 2)
    stages = (prof.stage_time("decode", a, True, False, batch, batch * (context + 16)) +
              prof.stage_time("decode", b, False, True, batch, batch * (context + 16)))
    prof.samples["overhead"] = {"via": via, "step_s": step, "stages_s": stages}  # what the estimate came from
    return max(0.0, step - stages)


def _http_steps(llm, model: str, batch: int, context: int, tokens: int) -> float:
    """Seconds for `batch` streamed requests of `context` + `tokens` through the HTTP API, driven
    by a `dejavu bench serve` process (second of two runs)."""
    import subprocess
    import tempfile

    from ..serving.api import ApiServer

    srv = ApiServer(llm, model)
    port = srv.start_background()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            with open(trace, "w") as f:
                json.dump([[context, tokens]] * batch, f)
            for _ in range(2):
                out = os.path.join(tmp, "out.json")
                subprocess.run([sys.executable, "-m", "dejavu", "bench", "serve", "--url", f"http://127.0.0.1:{port}",
                                "--trace", trace, "--num-requests", str(batch), "--json", out],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
                with open(out) as f:
                    duration = json.load(f)["duration_s"]
    finally:
        srv.stop()
    return duration


def run(model: str, device: str, dtype: str, batches: list[int], prompt_lens: list[int], contexts: list[int],
        workers: int, repeat: int, seed: int, overhead: bool, memory_gib: float, json_path: str | None,
        overhead_via: str = "engine") -> Profile:
    from ..llm import parse_device
    from ..models import build_model
    from ..models.loader import parse_dtype, resolve

    if not batches or not prompt_lens or not contexts or min(batches + prompt_lens + contexts) <= 0:
        raise PlanError("--batches, --prompt-lens and --contexts need positive integers")
    if workers <= 0:
        raise PlanError(f"--workers must be > 0, got {workers}")
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    src = resolve(model)
    cfg = src.config
    L = cfg.num_layers
    with torch.device("meta"):
        full = build_model(cfg, None)
    esize = torch.tensor([], dtype=dt).element_size()
    weight_bytes = sum(p.numel() for p in full.parameters()) * esize
    kv_tok = L * 2 * cfg.num_kv_heads * cfg.head_dim * esize
    print(f"[profile] {model}: {L} layers, {weight_bytes / 2**20:.1f} MiB weights, {kv_tok} B KV/token, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    load = _start_load(model, dtype, batches, prompt_lens, contexts, workers - 1, seed) if dev.type == "cpu" else []
    rows = {}
    ranges = {"one": (1, 2), "first": (0, 1), "last": (L - 1, L), "all": (0, L)} if L >= 3 else {
        "one": (0, 1), "all": (0, L)}
    for name, r in ranges.items():
        rows[name] = _stage_rows(src, dev, dt, r, batches, prompt_lens, contexts, 16, repeat, seed)
    _stop_load(load)
    pcie, link = _bandwidths(dev, dt)
    stage_link = _stage_link(dev, dt, cfg.hidden_size)
    prof = Profile(model=model, device=dev.type, num_layers=L, weight_bytes=weight_bytes, kv_bytes_per_token=kv_tok,
                   prompt_one=_fit(rows["one"][0], True), prompt_all=_fit(rows["all"][0], True),
                   token_one=_fit(rows["one"][1], False), token_all=_fit(rows["all"][1], False),
                   prompt_first=_fit(rows["first"][0], True) if "first" in rows else None,
                   prompt_last=_fit(rows["last"][0], True) if "last" in rows else None,
                   token_first=_fit(rows["first"][1], False) if "first" in rows else None,
                   token_last=_fit(rows["last"][1], False) if "last" in rows else None,
                   pcie_bytes_per_s=pcie, kv_link_bytes_per_s=link, stage_link_bytes_per_s=stage_link,
                   hidden_bytes_per_token=cfg.hidden_size * esize,
                   card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   dtype=str(dt).replace("torch.", ""), memory_bytes=int(memory_gib * 2**30),
                   samples={**{f"{k}_{name}": rows[name][i] for name in rows for i, k in enumerate(("prompt", "token"))},
                            "threads": torch.get_num_threads()})
    if overhead:
        prof.step_overhead_s = _overhead(prof, model, device, dtype, seed, batches[len(batches) // 2], contexts[0],
                                         overhead_via)
    print(f"[profile] prefill of 1 x {prompt_lens[-1]} tokens: {prof.prompt_time(1, 1, prompt_lens[-1]) * 1e3:.2f} ms; "
          f"decode of {batches[-1]} at context {contexts[-1]}: {prof.token_time(1, batches[-1], contexts[-1]) * 1e3:.2f} ms; "
          f"step overhead {prof.step_overhead_s * 1e3:.2f} ms; copy {link / 1e9:.1f} GB/s; "
          f"stage pipes {stage_link / 1e9:.2f} GB/s", file=sys.stderr)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(prof.to_json(), f, indent=1)
    return prof
