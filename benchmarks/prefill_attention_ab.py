"""Prefill of fresh prompts: the engine's SDPA prefill attention, the copying form it replaced, and
HF's forward pass, alternating in one process. On a CPU the attention takes the torch
path, not this one: the comparison means something on a GPU only.

    python benchmarks/prefill_attention_ab.py [--model random:opt-1.3b] [--batch 8,32,64] [--prompt-len 512] [--runs 5] [--device cuda]

The copying form (`before`, kept here only as this benchmark's baseline) built the padded
[B, heads, T, D] inputs as torch.cat([x, zero row])[q_index] for each of q, k and v (two copies
each) and gathered the output back by out_index (two more): at batch 32 and 512 tokens each copy
moves 67 MB, about 25 GB a prefill. models/layers.py causal_attention passes views for a batch of
one prompt length, and a ragged one gathers each input once. Prints, per batch, the
median prefill time of each over --runs alternating runs, after one untimed run of each.
"""
import argparse

import torch
import torch.nn.functional as F

import dejavu.models.layers as layers
from dejavu.bench.decode import time_batch, add_engine_args, engine_and_hf, hf_forward_s, median


def before(q, k, v, meta, scale):
    """The copying form of causal_attention (the baseline)."""
    n, h, d = q.shape
    b, t = meta.q_index.shape

    def padded(x):
        return torch.cat([x, x.new_zeros(1, x.shape[1], d)], 0)[meta.q_index].transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != h)
    return out.transpose(1, 2).reshape(b * t, h, d)[meta.out_index]


def main():
    ap = argparse.ArgumentParser()
    add_engine_args(ap, "8,32,64")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    dev, _, hf, llm, prompts = engine_and_hf("prefill", a.model, a.device, a.dtype, 0, max(a.batch), a.prompt_len, 16,
                                             cuda_graphs=False)
    now = layers.causal_attention

    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{card}, {a.dtype}, {a.model}, prompt {a.prompt_len}: prefill ms, "
          f"median of {a.runs} alternating runs")
    for b in a.batch:
        ids = prompts[:b].to(dev)
        runs = {"before": [], "now": [], "hf": []}
        for i in range(a.runs + 1):  # the first round untimed: new shapes' heuristics and allocations
            for name, impl in (("before", before), ("now", now)):
                with layers.prefill_attention(impl):
                    t = time_batch(llm, prompts[:b].tolist(), 1)[0]
                if i:
                    runs[name].append(t)
            t = hf_forward_s(hf, ids)
            if i:
                runs["hf"].append(t)
        med = {k: 1e3 * median(v) for k, v in runs.items()}
        print(f"batch {b}: before {med['before']:.1f}, now {med['now']:.1f} ({med['now'] / med['before']:.3f}x), "
              f"HF {med['hf']:.1f}; HF / ours: before {med['hf'] / med['before']:.3f}, now {med['hf'] / med['now']:.3f}")
    llm.shutdown()


if __name__ == "__main__":
    main()
