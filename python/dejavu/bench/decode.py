"""`dejavu bench decode`: the engine's decode step against the weight-read floor and HF's `generate`.

For each batch size, one run of the same random prompts through: our engine with its GPU fast path
(decode kernels + CUDA graphs), our engine eager (the same kernels, no graphs), and HF transformers
(`generate`, plus forward passes over the prompts for its prefill time). Reported per batch:
prefill time (the median of 3 runs alternating with HF's forward pass, after an untimed one of
each), ms per decode step (engine step, host work included, greedy steps overlapped with the
host's work; "sync", the same with each step waiting for its tokens before the next is queued;
and "GPU ms", the step's graph replayed alone, i.e. without the scheduler, sampling and copies on
the host), decode tokens/s, the ratio to the floor and to HF, and whether the greedy tokens agree
with HF's (and where each sequence parts from HF's).

The floor is the time to read the weights once: weight bytes / the device's bandwidth, measured in
the same run as a device-to-device copy of 1 GiB counted as 2 GiB of traffic (read + write).
"""
from __future__ import annotations

import tempfile
import time

import torch

from ..engine.block_manager import blocks_for
from . import write_json
from .decode_replicate import REPLICATE_PATHS, _with_replication
from .decode_runs import _advanced_steps, time_batch, _paired, _paired_line, attention_ms, replay_ms
from .decode_swap import _with_both, _with_swap
from .generate import _sync, random_hf_model


def device_bandwidth(dev: torch.device, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Bytes per second of memory traffic of a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The index of the first new token where two greedy sequences differ (None: equal)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _with_pdl(llm, batch: list[list[int]], max_tokens: int, pairs: int) -> dict:
    """The batch decoded `pairs` times with the decode kernels' programmatic dependent launch off
    and on, alternating (off, on, off, ...), the CUDA graphs captured again for each setting; then
    the setting goes back to the environment's."""
    from .. import _C

    runner = llm.engine.runner
    runs = {0: [], 1: []}
    gpu = {0: [], 1: []}
    try:
        for _ in range(pairs):
            for mode in (0, 1):
                _C.set_programmatic_launch(mode)
                if runner.graphs is not None:
                    runner.graphs = runner.graphs.recapture(runner.graphs.ring)
                runs[mode].append(time_batch(llm, batch, max_tokens)[1])
                if runner.graphs is not None:
                    gpu[mode].append(replay_ms(runner.graphs, len(batch)))
    finally:
        _C.set_programmatic_launch(-1)
        if runner.graphs is not None:
            runner.graphs = runner.graphs.recapture(runner.graphs.ring)
    off_ms, on_ms, ratio, pair_ratios = _paired(runs[0], runs[1])
    out = {"pdl_off_ms_per_step": off_ms, "pdl_on_ms_per_step": on_ms, "pdl_ratio": ratio,
           "pdl_pair_ratios": pair_ratios}
    if gpu[0]:
        out.update(pdl_off_gpu_ms=sum(gpu[0]) / pairs, pdl_on_gpu_ms=sum(gpu[1]) / pairs)
    return out


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per token, after that
    step's forward pass (generate synchronises with the device every step to test for stopping)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


PREFILL_RUNS = 3


def hf_forward_s(hf, ids: torch.Tensor) -> float:
    """Seconds of one HF forward pass over the prompts `ids` ([B, T] on the model's device)."""
    with torch.no_grad():
        _sync(ids.device)
        t0 = time.perf_counter()
        hf(input_ids=ids, attention_mask=torch.ones_like(ids))
        _sync(ids.device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _prefills(llm, hf, prompts: torch.Tensor, runs: int = PREFILL_RUNS) -> tuple[float, float | None]:
    """Median seconds of `runs` prefills of the batch (prompts: [B, T] on the CPU) through our
    engine (its first token) and, given `hf`, of HF's forward pass over the same prompts,
    alternating, after one untimed run of each at this batch size (its first run also pays for new
    shapes: cuBLAS heuristics, allocator growth)."""
    batch = prompts.tolist()
    ids = prompts.to(llm.device) if hf is not None else None
    ours, theirs = [], []
    for i in range(runs + 1):
        t = time_batch(llm, batch, 1)[0]
        h = hf_forward_s(hf, ids) if hf is not None else None
        if i:
            ours.append(t)
            theirs.append(h)
    return median(ours), median(theirs) if hf is not None else None


def time_hf(hf, ids: torch.Tensor, max_tokens: int) -> tuple[float, list[list[int]]]:
    """HF's decode step (the time between the first and the last token of one generate call, per
    step; subtracting a separately timed prefill from generate's total could come out at or below
    zero on a busy machine) and its greedy tokens. Its prefill is timed by _prefills."""
    from transformers import LogitsProcessorList

    dev = ids.device
    mask = torch.ones_like(ids)
    clock = _StepClock()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
        _sync(dev)
    steps = len(clock.stamps) - 1
    step = (clock.stamps[-1] - clock.stamps[0]) / steps if steps > 0 else float("nan")
    return step, out[:, ids.shape[1]:].tolist()


BLOCK_SIZE = 16  # KV block size of engine_and_hf's engine (the default), which its cache is sized by


def engine_and_hf(bench: str, model: str, device: str, dtype: str, seed: int, max_batch: int, prompt_len: int,
                  max_tokens: int, cuda_graphs: bool = True):
    """A random model (random_hf_model) as our engine, sized for max_batch prompts of prompt_len
    tokens plus max_tokens new ones, and as HF's model on the device (greedy, no EOS), with
    max_batch random prompts [max_batch, prompt_len] on the CPU: (device, dtype, hf, llm, prompts)."""
    from ..llm import LLM

    dev, dt, src, hf = random_hf_model(bench, model, device, dtype, seed)
    per_seq = blocks_for(prompt_len + max_tokens, BLOCK_SIZE)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm = LLM(model=d, device=str(dev), dtype=dtype, max_num_seqs=max_batch, block_size=BLOCK_SIZE,
                  kv_cache_blocks=max_batch * per_seq + 1, max_num_batched_tokens=max(max_batch * prompt_len, 8192),
                  cuda_graphs=cuda_graphs, enable_prefix_caching=False)  # prefills repeat their prompts
    hf = hf.to(dev)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, src.config.vocab_size, (max_batch, prompt_len), generator=g)
    return dev, dt, hf, llm, prompts


def add_engine_args(ap, batch: str) -> None:
    """The arguments of a benchmark script built on engine_and_hf: --model, --device, --dtype (bench
    decode's random OPT-1.3B in fp16 on CUDA), --batch (comma-separated, parsed into a list; default
    `batch`) and --prompt-len (512)."""
    ap.add_argument("--model", default="random:opt-1.3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", default=batch, type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-len", type=int, default=512)


def run(model: str, device: str, dtype: str, batches: list[int], prompt_len: int, max_tokens: int, seed: int,
        hf_baseline: bool, json_path: str | None, replicate: bool = False, pairs: int = 2,
        replicate_every: int = 1, replica_holder: str = "thread", replicate_skip: str = "none",
        replicate_paths: tuple[str, ...] = REPLICATE_PATHS, compare_pdl: bool = False,
        swap_stream: bool = False, swap_driver: str = "step") -> dict:
    from .. import _C

    dev, dt, hf, llm, prompts = engine_and_hf("decode", model, device, dtype, seed, max(batches), prompt_len,
                                              max_tokens)
    per_seq = blocks_for(prompt_len + max_tokens, BLOCK_SIZE)  # (the swap streams' shadow microbatches)
    bw = device_bandwidth(dev) if dev.type == "cuda" else 0.0
    wbytes = weight_bytes(llm.model)
    floor_ms = 1e3 * wbytes / bw if bw else 0.0
    result = {"model": model, "device": str(dev), "dtype": str(dt).replace("torch.", ""), "prompt_len": prompt_len,
              "max_tokens": max_tokens, "weight_bytes": wbytes, "copy_bandwidth_GBps": bw / 1e9,
              "floor_ms": floor_ms, "cuda_graphs": llm.engine.runner.graphs is not None,
              "replicate_every": replicate_every if replicate else None,
              "replica_holder": replica_holder if replicate else None,
              "replicate_skip": replicate_skip if replicate else None,
              "replicate_paths": list(replicate_paths) if replicate else None,
              # the setting, on a device that has it (the kernels' own check is on their build too)
              "programmatic_launch": (_C.programmatic_launch() and dev.type == "cuda"
                                      and torch.cuda.get_device_capability(dev)[0] >= 9),
              "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "rows": []}
    # Warm-up at the measured prompt length: kernels, allocator, cuBLAS heuristics, HF's generate.
    time_batch(llm, prompts[:1].tolist(), 4)
    if hf_baseline:
        time_hf(hf, prompts[:1].to(dev), 4)
    print(f"{result['card']}, {result['dtype']}, {model}: weights {wbytes / 1e9:.2f} GB, copy bandwidth "
          f"{bw / 1e9:.0f} GB/s (read+write) -> floor {floor_ms:.3f} ms/step")
    print(f"{'batch':>5} {'prefill ms':>10} {'HF prefill':>10} {'ms/step':>8} {'sync':>8} {'GPU ms':>8} {'attn ms':>8} "
          f"{'eager':>8} {'HF':>8} "
          f"{'tok/s':>9} {'x floor':>7} {'x HF':>6} {'same as HF':>10}")
    for b in batches:
        graphs = llm.engine.runner.graphs  # (replication through the ring captures them again)
        batch = prompts[:b].tolist()
        advanced = _advanced_steps(llm)
        pre, hpre = _prefills(llm, hf if hf_baseline else None, prompts[:b])
        _, step, ours_ids = time_batch(llm, batch, max_tokens)
        row = {"batch": b, "prefill_ms": 1e3 * pre, "prefill_runs": PREFILL_RUNS, "ms_per_step": 1e3 * step, "tok_s": b / step}
        if graphs is not None:  # steps that ran from the inputs the step before left on the device
            row["advanced_steps"] = _advanced_steps(llm) - advanced
        if llm.engine.overlap:  # the baseline: each step waits for its tokens before the next is queued
            llm.engine.overlap = False
            row["sync_ms_per_step"] = 1e3 * time_batch(llm, batch, max_tokens)[1]
            llm.engine.overlap = True
        if graphs is not None:
            row["gpu_ms_per_step"] = replay_ms(graphs, b)
            row["attention_ms_per_step"] = attention_ms(graphs, b)
            llm.engine.runner.graphs = None
            row["eager_ms_per_step"] = 1e3 * time_batch(llm, batch, max_tokens)[1]
            llm.engine.runner.graphs = graphs
        if floor_ms:
            row["x_floor"] = row["ms_per_step"] / floor_ms
        if hf_baseline:
            hstep, hf_ids = time_hf(hf, prompts[:b].to(dev), max_tokens)
            row.update(hf_prefill_ms=1e3 * hpre, hf_ms_per_step=1e3 * hstep, speedup_vs_hf=hstep / step,
                       prefill_vs_hf=hpre / pre, identical_sequences=f"{sum(a == c for a, c in zip(ours_ids, hf_ids))}/{b}",
                       hf_first_difference=[first_difference(a, c) for a, c in zip(ours_ids, hf_ids)])
        if replicate:
            row.update(_with_replication(llm, batch, max_tokens, pairs, replicate_every, replica_holder,
                                         replicate_skip, tuple(replicate_paths)))
        if compare_pdl:
            row.update(_with_pdl(llm, batch, max_tokens, pairs))
        if swap_stream:
            row.update(_with_swap(llm, batch, max_tokens, pairs, b * per_seq, swap_driver))
        if swap_stream and replicate:  # both streams at once, against neither
            row.update(_with_both(llm, batch, max_tokens, pairs, b * per_seq, replicate_paths[0], replicate_every,
                                  replica_holder, swap_driver))
        result["rows"].append(row)
        f = lambda k, w=8, p=3: f"{row[k]:>{w}.{p}f}" if k in row else f"{'-':>{w}}"  # noqa: E731
        print(f"{b:>5} {f('prefill_ms', 10, 1)} {f('hf_prefill_ms', 10, 1)} {f('ms_per_step')} {f('sync_ms_per_step')} "
              f"{f('gpu_ms_per_step')} {f('attention_ms_per_step')} {f('eager_ms_per_step')} {f('hf_ms_per_step')} "
              f"{f('tok_s', 9, 1)} {f('x_floor', 7, 2)} "
              f"{f('speedup_vs_hf', 6, 1)} {row.get('identical_sequences', '-'):>10}")
        parted = sorted(i for i in row.get("hf_first_difference", []) if i is not None)
        if parted:  # (fp16: near-ties round differently in other kernels, and the sequences part there)
            print(f"      {len(parted)} sequence(s) part from HF's at new token {', '.join(map(str, parted[:8]))}"
                  f"{' ...' if len(parted) > 8 else ''} (of {max_tokens})")
        if replicate:
            for p, r in row["replicate_by_path"].items():
                print(_paired_line(f"with replication ({p})", r["ms_per_step"], row["replicate_off_ms_per_step"],
                                   r["ratio"], r["pair_ratios"], pairs)
                      + f"; {r['advanced_steps']} steps without an input copy")
            print(f"      {row['replicate_acked']} steps acknowledged, replica exact: {row['replica_exact']}, "
                  f"ring full: {row['replicate_ring_misses']} steps, overlapped: {row['replicate_chained_steps']} steps")
            if "ring_gpu_ratio" in row:
                print(f"      GPU time of replayed steps: {row['ring_gpu_on_ms']:.3f} ms storing ring rows, "
                      f"{row['ring_gpu_off_ms']:.3f} without -> {row['ring_gpu_ratio']:.4f}")
        if swap_stream:
            print(_paired_line("with a swap stream", row["swap_ms_per_step"], row["swap_off_ms_per_step"],
                               row["swap_ratio"], row["swap_pair_ratios"], pairs)
                  + f"; {row['swap_prefetches']} swap-ins, {row['swap_bytes_in'] / 1e9:.2f} GB in; "
                  f"same tokens: {row['swap_same_tokens']}")
            if "swap_gpu_ratio" in row:
                print(f"      GPU time of replayed steps: {row['swap_gpu_on_ms']:.3f} ms with swap-ins crossing, "
                      f"{row['swap_gpu_off_ms']:.3f} without -> {row['swap_gpu_ratio']:.3f}; host time starting "
                      f"swap-ins: {row['swap_host_ms_per_step']:.3f} ms per step")
            if "swap_loop_busy_ratio" in row:
                print(f"      device time of the decode loop's steps: {row['swap_loop_busy_on_ms']:.3f} ms busy with "
                      f"swap-ins, {row['swap_loop_busy_off_ms']:.3f} without -> {row['swap_loop_busy_ratio']:.3f}; "
                      f"idle between steps {row['swap_loop_gap_on_ms']:.3f} / {row['swap_loop_gap_off_ms']:.3f} ms; "
                      f"a swap-in still crossing after the last step: {row['swap_tail_ms']:.1f} ms a run (not counted)")
        if swap_stream and replicate:
            print(_paired_line(f"with replication ({row['both_path']}) and a swap stream at once",
                               row["both_ms_per_step"], row["both_off_ms_per_step"], row["both_ratio"],
                               row["both_pair_ratios"], pairs)
                  + f"; {row['both_acked']} steps acknowledged, replica exact: {row['both_replica_exact']}, "
                  f"{row['both_swap_prefetches']} swap-ins, {row['both_advanced_steps']} steps without an input copy; "
                  f"same tokens: {row['both_same_tokens']}")
        if compare_pdl:
            gpu = (f"; GPU ms {row['pdl_on_gpu_ms']:.3f} against {row['pdl_off_gpu_ms']:.3f}"
                   if "pdl_on_gpu_ms" in row else "")
            print(_paired_line("programmatic launch on", row["pdl_on_ms_per_step"], row["pdl_off_ms_per_step"],
                               row["pdl_ratio"], row["pdl_pair_ratios"], pairs) + gpu)
    write_json(json_path, result)
    llm.shutdown()
    return result
