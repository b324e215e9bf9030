"""`dejavu demo`: a local deployment exercised through its HTTP API, with a worker killed."""
from __future__ import annotations

from .common import positive


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a local deployment of the default model and exercise its HTTP API")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=48)
    p.add_argument("--prompt-stages", type=int, default=1, help="prompt workers (0: no disaggregation)")
    p.add_argument("--token-stages", type=int, default=2, help="token workers (0: no disaggregation)")
    p.add_argument("--pp", type=int, default=1, help="FT-style pipeline depth (with --prompt-stages 0)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-replicate", action="store_true", help="no KV replication (killed work starts over)")
    p.add_argument("--kill-worker", default="token:1", metavar="ROLE:STAGE",
                   help="worker to kill -9 in the middle of the batch (stage:N, token:N, prompt:N; 'none': no failure)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..demo import run

    return run(args.model, args.device, args.max_tokens, args.pp, args.tp, args.prompt_stages, args.token_stages,
               replicate=not args.no_replicate, kill=None if args.kill_worker == "none" else args.kill_worker)
