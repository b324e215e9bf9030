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


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default, unless its help already names it or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="dejavu", description="DéjàVu: fast, fault-tolerant LLM serving",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"dejavu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    for p in _parsers(sub):
        p.formatter_class = HelpFormatter
        if "-v" not in p._option_string_actions:  # `dejavu serve -v` as well as `dejavu -v serve`
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="log progress to stderr")
    return parser


def _parsers(sub) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (bench's) included."""
    out = []
    for p in dict.fromkeys(sub.choices.values()):
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                out += _parsers(a)
    return out


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
