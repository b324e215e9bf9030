"""Command-line flags of prefix caching (docs/prefix-caching.md), spelled as in vLLM."""
from __future__ import annotations

import argparse


def add_prefix_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV cache of common prompt prefixes between requests (every mode; "
                        "default: on)")
    p.add_argument("--kv-offload-gib", type=float, default=0.0,
                   help="with --enable-prefix-caching: pinned host memory (GiB) that keeps "
                        "blocks evicted from the device cache, least recently used out first (with disaggregation: "
                        "the prompt workers' cache) (default: 0, none)")
    p.add_argument("--kv-offload-dir", default=None,
                   help="with --kv-offload-gib: a disk tier below the host tier, checksummed block files in DIR")
    p.add_argument("--kv-offload-dir-gib", type=float, default=8.0,
                   help="size bound of the --kv-offload-dir tier in GiB (default: 8)")


def prefix_cache_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the parsed flags."""
    return {"enable_prefix_caching": args.enable_prefix_caching, "kv_offload_gib": args.kv_offload_gib,
            "kv_offload_dir": args.kv_offload_dir, "kv_offload_dir_gib": args.kv_offload_dir_gib}
