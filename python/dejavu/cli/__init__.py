"""`dejavu` command line. One module per subcommand, each with `add_parser(sub)` (its flags; a flag
group shared with another feature is one `add_..._args(p)` line there) and its `cmd_...(args)`.
common.py holds the engine and deployment flags of generate and serve."""
from __future__ import annotations

import argparse
import logging
import sys

from . import bench, demo, generate, plan, profile, serve, simulate, worker

# The order of `dejavu --help`.
SUBCOMMANDS = (generate, serve, demo, worker, bench, profile, plan, simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dejavu", description="DéjàVu: fast, fault-tolerant LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os
    import signal

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM unwinds like Ctrl-C (finally blocks and finalizers run, so worker processes are stopped).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..engine.llm_engine import RequestError
    from ..models.config import ModelError
    from ..planner.model import PlanError

    try:
        return args.func(args)
    except (ModelError, RequestError, PlanError, ValueError) as e:
        print(f"dejavu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
