"""`dejavu bench generate`: offline greedy generation, DéjàVu's engine against HF transformers'
`generate` on the same weights, prompts and device, in one run.

The model is built once from its config with seeded random weights (HF's initialisation) and saved
to a temporary directory; both engines load that checkpoint. Prompts are random token ids of one
length, so HF needs no padding; both sides ignore EOS and produce exactly --max-tokens tokens.
"""
from __future__ import annotations

import tempfile
import time

import torch

from . import write_json


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_hf_model(bench: str, model: str, device: str, dtype: str, seed: int):
    """(device, dtype, model source, HF model on the CPU) for a random:<name> model, with HF's
    seeded initialisation; the caller saves it for our engine to load the same weights."""
    import transformers as T

    from ..llm import parse_device
    from ..models.loader import parse_dtype, resolve

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    src = resolve(model)
    if src.kind != "random":
        raise ValueError(f"bench {bench} takes a random:<name> model (it builds the same weights for both engines)")
    torch.manual_seed(seed)
    return dev, dt, src, T.AutoModelForCausalLM.from_config(src.config.to_hf()).to(dtype=dt).eval()


def run(model: str, device: str, dtype: str, batch: int, prompt_len: int, max_tokens: int, seed: int,
        repeat: int, json_path: str | None) -> dict:
    from ..llm import LLM
    from ..sampling_params import SamplingParams

    dev, dt, src, hf = random_hf_model("generate", model, device, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, src.config.vocab_size, (batch, prompt_len), generator=g)
    result = {"model": model, "device": str(dev), "dtype": str(dt).replace("torch.", ""), "batch": batch,
              "prompt_len": prompt_len, "max_tokens": max_tokens, "torch_threads": torch.get_num_threads(),
              "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        # each timed run repeats the prompts: a prefix-cache hit would not be the generation measured
        llm = LLM(model=d, device=str(dev), dtype=dtype, max_num_seqs=max(batch, 1), enable_prefix_caching=False)
    hf = hf.to(dev)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = prompts.to(dev)

    def ours():
        return llm.generate([p.tolist() for p in prompts], params)

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False)

    timings = {}
    outputs = {}
    for name, fn in (("dejavu", ours), ("hf", theirs)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeat):
            _sync(dev)
            t0 = time.perf_counter()
            outputs[name] = fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    new_tokens = batch * max_tokens
    ours_ids = [o.token_ids for o in outputs["dejavu"]]
    hf_ids = outputs["hf"][:, prompt_len:].tolist()
    same = sum(a == b for a, b in zip(ours_ids, hf_ids))
    result.update({
        "dejavu_s": timings["dejavu"], "hf_s": timings["hf"],
        "dejavu_tok_s": new_tokens / timings["dejavu"], "hf_tok_s": new_tokens / timings["hf"],
        "speedup": timings["hf"] / timings["dejavu"], "identical_sequences": f"{same}/{batch}",
    })
    print(f"{'engine':<8} {'time (s)':>9} {'tok/s':>9}")
    print(f"{'dejavu':<8} {timings['dejavu']:>9.3f} {result['dejavu_tok_s']:>9.1f}")
    print(f"{'hf':<8} {timings['hf']:>9.3f} {result['hf_tok_s']:>9.1f}")
    print(f"speedup {result['speedup']:.2f}x on {result['card']} ({result['dtype']}, batch {batch}, prompt {prompt_len}, "
          f"{max_tokens} new tokens); identical greedy sequences: {result['identical_sequences']}")
    write_json(json_path, result)
    return result
