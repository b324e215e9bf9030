"""Command-line flags of prefix caching (docs/prefix-caching.md), spelled as in vLLM."""
from __future__ import annotations

import argparse


def add_prefix_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="share the KV cache of common prompt prefixes between requests (single process and "
                        "pp pipelines without --swap/--replicate; default: off)")


def prefix_cache_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the parsed flags."""
    return {"enable_prefix_caching": args.enable_prefix_caching}
