"""Are greedy tokens reproducible, ours and HF's? (fp16 "same as HF" counts of `bench decode`)

    python benchmarks/token_stability.py [--model random:opt-1.3b] [--dtype float16] [--batch 1,8] [--device cuda]

For each batch: our engine decodes the prompts twice through its CUDA graphs and once eagerly,
and HF's `generate` runs twice. Prints a short hash of each run's tokens (run the script twice to
compare processes), where each sequence of ours parts from HF's first run, and HF's top-two logit
gap at the first new token (the token the prefill picks: a near-tie there is decided by rounding).
"""
import argparse
import hashlib
import json

import torch

from dejavu.bench.decode import time_hf, time_batch, add_engine_args, engine_and_hf, first_difference


def digest(ids) -> str:
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:10]


def main():
    ap = argparse.ArgumentParser()
    add_engine_args(ap, "1,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    dev, _, hf, llm, prompts = engine_and_hf("stability", a.model, a.device, a.dtype, 0, max(a.batch), a.prompt_len,
                                             a.max_tokens)
    for b in a.batch:
        batch = prompts[:b].tolist()
        ours = [time_batch(llm, batch, a.max_tokens)[2] for _ in range(2)]
        graphs, llm.engine.runner.graphs = llm.engine.runner.graphs, None
        eager = time_batch(llm, batch, a.max_tokens)[2]
        llm.engine.runner.graphs = graphs
        theirs = [time_hf(hf, prompts[:b].to(dev), a.max_tokens)[1] for _ in range(2)]
        with torch.no_grad():
            top = hf(input_ids=prompts[:b].to(dev)).logits[:, -1].float().topk(2, -1)
        gaps = [round(float(x), 4) for x in top.values[:, 0] - top.values[:, 1]]
        print(f"batch {b}: ours {[digest(o) for o in ours]}, eager {digest(eager)} (equal: {ours[0] == eager}); "
              f"HF {[digest(t) for t in theirs]}")
        print(f"  ours part from HF's first run at new token {[first_difference(x, y) for x, y in zip(ours[0], theirs[0])]}")
        print(f"  HF's top-two logit gap at the first new token: {gaps}")
    llm.shutdown()


if __name__ == "__main__":
    main()
