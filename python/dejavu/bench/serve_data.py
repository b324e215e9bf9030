"""Workloads for `dejavu bench serve`: each a list of Request (prompt, prompt length, output length).

- random: prompts of --random-input-len and outputs of --random-output-len tokens, each drawn
  uniformly from [L * (1 - r), L * (1 + r)] with r = --random-range-ratio (vLLM's random dataset).
- prefix: the same, after a shared prefix of --prefix-len tokens (one prefix, a random suffix each):
  what prefix caching reuses. --prefix-fraction f gives the prefix to that fraction of the requests
  (the first round(f * n) of a seeded shuffle); the rest are random prompts of the same length.
- synthetic: chat-like long-tailed lengths (log-normal, see synthetic_lengths).
- trace: a JSON list of [prompt_tokens, output_tokens].
- sharegpt: a ShareGPT-format JSON file; the first human turn is the prompt (text), the token
  length of the gpt turn after it is the output length. Both are counted with the tokenizer given.

Token-count workloads send token ids (random ids in [100, 1000), valid in any vocabulary of 1000 or
more), so prompt lengths are exact; as text (chat endpoint, or --text-prompts) they are that many
common English words, about one token each in BPE vocabularies (the server's usage counts replace
the estimate in the report).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

DATASETS = ("random", "prefix", "sharegpt", "synthetic", "trace")

_WORDS = ("the of and to in is was for on are with as be at by this had not but from or have an they which one you "
          "were her all she there would their we him been has when who will more no if out so said what up its about "
          "into than them can only other new some could time these two may then do first any my now such like our over "
          "man me even most made after also did many before must through back years where much your way well down "
          "should because each just those people how too little state good very make world still own see men work long "
          "get here between both life being under never day same another know while last might us great old year off "
          "come since against go came right used take three").split()


@dataclass
class Request:
    prompt: list[int] | str
    prompt_len: int    # tokens: exact for ids, the tokenizer's count for ShareGPT, words for word prompts
    output_len: int    # max_tokens


def synthetic_lengths(n: int, seed: int, max_prompt: int, max_output: int, prompt_median: float = 200,
                      output_median: float = 100) -> list[tuple[int, int]]:
    """Chat-like lengths: log-normal prompts (median 200, sigma 0.9) and outputs (median 100, sigma
    0.8), clipped to [4, max_prompt] and [1, max_output]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = int(round(rng.lognormvariate(math.log(prompt_median), 0.9)))
        o = int(round(rng.lognormvariate(math.log(output_median), 0.8)))
        out.append((min(max(p, 4), max_prompt), min(max(o, 1), max_output)))
    return out


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None


def load_trace(path: str) -> list[tuple[int, int]]:
    data = _read_json(path, "trace")
    if not isinstance(data, list) or not all(isinstance(x, list) and len(x) == 2 and all(
            isinstance(v, int) and v > 0 for v in x) for x in data):
        raise ValueError(f"trace {path} must be a JSON list of [prompt_tokens, output_tokens] positive integers")
    return [tuple(x) for x in data]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 1000) for _ in range(n)]


def from_lengths(lengths: list[tuple[int, int]], seed: int, text: bool = False) -> list[Request]:
    """A request per (prompt_tokens, output_tokens): random ids, or that many words as text."""
    rng = random.Random(seed)
    return [Request(_words(rng, p) if text else _ids(rng, p), p, o) for p, o in lengths]


def _span(length: int, ratio: float) -> tuple[int, int]:
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def random_requests(n: int, seed: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    prefix_len: int = 0, text: bool = False, prefix_fraction: float = 1.0) -> list[Request]:
    """vLLM's random dataset: lengths uniform in [L(1-r), L(1+r)], after `prefix_len` shared tokens
    (for round(prefix_fraction * n) requests at random; the others get as many random tokens)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if prefix_len < 0:
        raise ValueError(f"--prefix-len must be >= 0, got {prefix_len}")
    if not 0.0 <= prefix_fraction <= 1.0:
        raise ValueError(f"--prefix-fraction must be in [0, 1], got {prefix_fraction}")
    rng = random.Random(seed)
    prefix = (_words(rng, prefix_len) + " " if prefix_len else "") if text else _ids(rng, prefix_len)
    shared = range(n) if prefix_fraction == 1.0 else set(rng.sample(range(n), round(prefix_fraction * n)))
    (ilo, ihi), (olo, ohi) = _span(input_len, range_ratio), _span(output_len, range_ratio)
    out = []
    for i in range(n):
        p, o = rng.randint(ilo, ihi), rng.randint(olo, ohi)
        suffix = _words(rng, p) if text else _ids(rng, p)
        if i in shared or not prefix_len:
            head = prefix
        else:  # an unshared head of the same length
            head = (_words(rng, prefix_len) + " ") if text else _ids(rng, prefix_len)
        out.append(Request(head + suffix, prefix_len + p, o))
    return out


def load_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn after it) of every conversation that has both."""
    data = _read_json(path, "dataset")
    shape = ('a JSON list of {"conversations": [{"from": "human" | "gpt", "value": TEXT}, ...]} entries '
             "(ShareGPT format)")
    if not isinstance(data, list):
        raise ValueError(f"dataset {path} must be {shape}, got a JSON {type(data).__name__}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        prompt = None
        for turn in turns if isinstance(turns, list) else []:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                continue
            if prompt is None and turn.get("from") in ("human", "user"):
                prompt = turn["value"]
            elif prompt is not None and turn.get("from") in ("gpt", "assistant"):
                pairs.append((prompt, turn["value"]))
                break
    if not pairs:
        raise ValueError(f"dataset {path} has no conversation with a human turn followed by a gpt turn: "
                         f"it must be {shape}")
    return pairs


def sharegpt_requests(path: str, n: int, seed: int, tokenizer, max_prompt: int = 1024, max_total: int = 2048,
                      output_len: int | None = None) -> list[Request]:
    """n conversations in a seeded random order, kept when the prompt has 4 to max_prompt tokens,
    the output at least 4 (unless output_len overrides it) and both together at most max_total (as
    vLLM filters); drawn again at random when fewer than n pass."""
    pairs = load_sharegpt(path)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    out: list[Request] = []
    for prompt, completion in pairs:
        if len(out) >= n:
            break
        p = len(tokenizer.encode(prompt))
        o = output_len if output_len is not None else len(tokenizer.encode(completion))
        if p < 4 or p > max_prompt or p + o > max_total or (output_len is None and o < 4):
            continue
        out.append(Request(prompt, p, o))
    if not out:
        raise ValueError(f"dataset {path}: no conversation fits (prompt 4-{max_prompt} tokens, output >= 4, "
                         f"prompt + output <= {max_total}, the server's context length)")
    if len(out) < n:
        out += rng.choices(out, k=n - len(out))
    return out


def client_tokenizer(spec: str):
    """The tokenizer `dejavu serve --model SPEC` uses (random:<name>, smollm2, a HF directory or
    local hub id, a .gguf file)."""
    from ..models.config import ModelError
    from ..models.loader import load_tokenizer, resolve

    try:
        tok = load_tokenizer(resolve(spec))
    except ModelError as e:
        raise ValueError(f"cannot load tokenizer {spec!r} ({e}); pass --tokenizer with a model spec that "
                         "names the server's tokenizer on this machine") from None
    if not tok.has_text:
        raise ValueError(f"tokenizer {spec!r}: the model has no tokenizer files; pass --tokenizer")
    return tok
