"""Prefill of prompts whose every block is in the prefix cache (a hit) against the same prompts
cold, in one engine with prefix caching on: each round prefills new random prompts (cold), then
the same ones again (the hit recomputes only their last token).

    python benchmarks/prefix_hit_prefill.py [--model random:opt-1.3b] [--batch 1,8,32] [--prompt-len 512] [--rows-max N]

`--rows-max 0` makes a hit's attention loop SDPA over the sequences instead of running the
decode kernel with a query row per new token (kernels.CONTEXT_ROWS_MAX_TOKENS). Prints the median
over --runs rounds, after one untimed round. CUDA (on a CPU the attention takes the torch path).
"""
import argparse
import tempfile

import torch

from dejavu import kernels
from dejavu.bench.decode_runs import time_batch
from dejavu.bench.generate import random_hf_model
from dejavu.llm import LLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:opt-1.3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kv-cache-blocks", type=int, default=4096)
    ap.add_argument("--rows-max", type=int, default=None, help="kernels.CONTEXT_ROWS_MAX_TOKENS for this run")
    a = ap.parse_args()
    if a.rows_max is not None:
        kernels.CONTEXT_ROWS_MAX_TOKENS = a.rows_max
    dev, _, src, hf = random_hf_model("prefix_hit", a.model, a.device, a.dtype, 0)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        del hf
        llm = LLM(model=d, device=a.device, dtype=a.dtype, max_num_seqs=max(a.batch), kv_cache_blocks=a.kv_cache_blocks,
                  max_num_batched_tokens=max(16384, max(a.batch) * a.prompt_len))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{card}, {a.dtype}, {a.model}, prompt {a.prompt_len}, rows up to {kernels.CONTEXT_ROWS_MAX_TOKENS} "
          f"new tokens: prefill ms, median of {a.runs} rounds")
    g = torch.Generator().manual_seed(0)
    med = lambda x: 1e3 * sorted(x)[len(x) // 2]  # noqa: E731
    for b in a.batch:
        cold, hit = [], []
        for i in range(a.runs + 1):
            prompts = torch.randint(10, src.config.vocab_size, (b, a.prompt_len), generator=g).tolist()
            c = time_batch(llm, prompts, 1)[0]
            h = time_batch(llm, prompts, 1)[0]
            if i:
                cold.append(c)
                hit.append(h)
        print(f"batch {b}: cold {med(cold):.1f}, all-cached hit {med(hit):.1f} ({med(cold) / med(hit):.2f}x)", flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
