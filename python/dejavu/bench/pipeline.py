"""`dejavu bench pipeline`: offline throughput of the same requests at several pipeline depths
(and TP degrees), one after another in the same command; pp=1 tp=1 is the single-process engine.
Start-up (worker spawn, weight loading) is excluded; one warm-up request runs first."""
from __future__ import annotations

import time

import torch

from . import write_json


def run(model: str, device: str, configs: list[tuple[int, int]], requests: int, prompt_len: int, max_tokens: int,
        microbatch_size: int, seed: int, json_path: str | None) -> dict:
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    rows = []
    outputs = {}
    for pp, tp in configs:
        # Default microbatch: the same number of requests in flight at every depth (requests / pp each).
        mb = microbatch_size or -(-requests // pp)
        llm = LLM(model=model, device=device, pp=pp, tp=tp, seed=seed, microbatch_size=mb,
                  max_num_seqs=max(requests, 1))
        try:
            vocab = llm.config.vocab_size
            prompts = torch.randint(10, vocab, (requests, prompt_len), generator=g.manual_seed(seed)).tolist()
            llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))
            t0 = time.perf_counter()
            out = llm.generate(prompts, params)
            dt = time.perf_counter() - t0
        finally:
            llm.shutdown()
        outputs[(pp, tp)] = [o.token_ids for o in out]
        rows.append({"pp": pp, "tp": tp, "seconds": dt, "tokens_per_s": requests * max_tokens / dt,
                     "same_tokens_as_first": outputs[(pp, tp)] == outputs[configs[0]]})
    base = rows[0]["tokens_per_s"]
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"{model} on {card}: {requests} requests x {prompt_len} prompt + {max_tokens} new tokens, "
          f"microbatch {microbatch_size or 'requests / pp'}")
    print(f"{'pp':>3} {'tp':>3} {'time (s)':>9} {'tok/s':>8} {'vs first':>8} {'same tokens':>11}")
    for r in rows:
        print(f"{r['pp']:>3} {r['tp']:>3} {r['seconds']:>9.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base:>7.2f}x {str(r['same_tokens_as_first']):>11}")
    result = {"model": model, "device": device, "card": card, "requests": requests, "prompt_len": prompt_len,
              "max_tokens": max_tokens, "microbatch_size": microbatch_size, "rows": rows}
    write_json(json_path, result)
    return result
