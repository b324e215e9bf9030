"""`dejavu bench swap`: at one KV budget per worker, the same requests through a pipeline without
and with microbatch swapping, in one run: how many sequences ran at once (peak), throughput, and
how much of the step time waited for swap-ins. Outputs are compared token for token."""
from __future__ import annotations

import time

import torch

from ..engine.block_manager import blocks_for
from . import write_json

BLOCK_SIZE = 16


def run(model: str, device: str, pp: int, kv_blocks: int, requests: int, prompt_len: int, max_tokens: int,
        resident: int, seed: int, json_path: str | None, dtype: str = "auto", admission: str = "reserve") -> dict:
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    rows, outputs = [], {}
    # Microbatches of the size the budget holds, so both runs keep pp microbatches in flight: without
    # swapping the pp of them share the budget; with it each one has a region (budget / resident).
    # (Left to itself the first microbatch would admit every request that fits and leave the others empty.)
    per_seq = blocks_for(prompt_len + max_tokens - 1, BLOCK_SIZE)
    regions = {False: kv_blocks // pp, True: kv_blocks // min(resident, pp)}
    for swap in (False, True):
        mb = max(1, regions[swap] // per_seq)
        llm = LLM(model=model, device=device, dtype=dtype, pp=pp, seed=seed, kv_cache_blocks=kv_blocks, swap=swap,
                  resident_microbatches=resident, max_num_seqs=requests, admission=admission, microbatch_size=mb,
                  block_size=BLOCK_SIZE)
        try:
            vocab = llm.config.vocab_size
            prompts = torch.randint(10, vocab, (requests, prompt_len), generator=g.manual_seed(seed)).tolist()
            llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))
            llm.engine.peak_running = 0
            t0 = time.perf_counter()
            out = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            dt = time.perf_counter() - t0
            eng = llm.engine
            stats = list(eng.swap_stats.values())
            wait = sum(s["wait_s"] for s in stats) / max(sum(s["step_s"] for s in stats), 1e-9) if stats else 0.0
            rows.append({"swap": swap, "microbatch_size": mb, "peak_running": eng.peak_running, "seconds": dt,
                         "tokens_per_s": requests * max_tokens / dt, "swap_wait_fraction": wait,
                         "swap_in_bytes": sum(s["bytes_in"] for s in stats),
                         "preemptions": sum(s.num_preemptions for s in eng.slots)})
            outputs[swap] = [o.token_ids for o in out]
        finally:
            llm.shutdown()
    same = outputs[False] == outputs[True]
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"{model} on {card}, pp={pp}, {kv_blocks} KV blocks per worker, {requests} requests x {prompt_len} + "
          f"{max_tokens} tokens; swapping keeps {resident} microbatch(es) resident; {admission} admission")
    print(f"{'swap':>5} {'mb size':>7} {'peak seqs':>9} {'time (s)':>9} {'tok/s':>9} {'vs off':>7} {'swap wait':>9} "
          f"{'preempt':>7}")
    for r in rows:
        print(f"{str(r['swap']):>5} {r['microbatch_size']:>7} {r['peak_running']:>9} {r['seconds']:>9.2f} "
              f"{r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>6.2f}x {100 * r['swap_wait_fraction']:>8.1f}% "
              f"{r['preemptions']:>7}")
    print(f"same tokens: {same}")
    result = {"model": model, "device": device, "dtype": dtype, "card": card, "pp": pp, "kv_blocks": kv_blocks, "requests": requests,
              "prompt_len": prompt_len, "max_tokens": max_tokens, "resident": resident, "admission": admission, "rows": rows,
              "same_tokens": same}
    write_json(json_path, result)
    return result
