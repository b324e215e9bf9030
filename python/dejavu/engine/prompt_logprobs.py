"""Prompt logprobs (SamplingParams.prompt_logprobs, the server's echo + logprobs): the logprob of
each prompt token after the first given the tokens before it, from the prefill's hidden states.

Entries have sampler.pick's shape, [logprob, [[id, logprob], ...top k]], of the raw model
distribution in fp32; the first prompt token has no entry (None). Rows go through the LM head in
chunks, so a long prompt never holds [prompt length, vocab] logits at once.
"""
from __future__ import annotations

import torch

CHUNK = 256  # hidden rows per LM-head call


def prompt_entries(model, hidden: torch.Tensor, prompt_ids: list[int], k: int) -> list:
    """[None, entry for prompt_ids[1], ...]: hidden[j] (the state after prompt_ids[j]) predicts
    prompt_ids[j + 1]. `hidden`: [len(prompt_ids), H], the prompt's rows of one prefill."""
    out: list = [None]
    n = len(prompt_ids) - 1
    targets = torch.tensor(prompt_ids[1:], dtype=torch.int64, device=hidden.device)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        lp = torch.log_softmax(model.compute_logits(hidden[a:b]).float(), dim=-1)
        own = lp.gather(1, targets[a:b, None]).squeeze(1).tolist()
        if k:
            top = torch.topk(lp, k, dim=-1)
            alts = [[[t, v] for t, v in zip(ti, tv)] for ti, tv in zip(top.indices.tolist(), top.values.tolist())]
        else:
            alts = [[] for _ in own]
        out.extend([v, a_] for v, a_ in zip(own, alts))
    return out
