"""`dejavu generate`: text for one or more prompts, offline."""
from __future__ import annotations

import json
import sys
import time

from .common import add_model_args, llm_from_args, positive


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .. import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    llm = llm_from_args(args)
    t1 = time.perf_counter()
    try:
        return _generate(args, llm, params, t0, t1)
    finally:
        llm.shutdown()


def _generate(args, llm, params, t0, t1) -> int:
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
               for p in args.prompt]
    outs = llm.generate(prompts, params)
    t2 = time.perf_counter()
    n = sum(len(o.token_ids) for o in outs)
    for prompt, o in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}))
        else:
            print(o.text if args.chat else prompt + o.text)
    print(f"[dejavu] {args.model}: loaded in {t1 - t0:.1f}s, {n} tokens in {t2 - t1:.2f}s "
          f"({n / max(t2 - t1, 1e-9):.1f} tok/s) on {llm.device}", file=sys.stderr)
    return 0
