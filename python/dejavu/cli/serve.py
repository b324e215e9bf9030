"""`dejavu serve`: the OpenAI-compatible HTTP API."""
from __future__ import annotations

import os
import sys

from .common import DEFAULT_MODEL, add_model_args, check_launcher, config_from_args, positive, positive_float


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, as --model (vLLM's `serve MODEL`)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DEJAVU_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $DEJAVU_API_KEY; prefer the "
                        "variable: other users of the machine can read a command line)")
    p.add_argument("--max-queue", type=positive("--max-queue"), default=256,
                   help="waiting requests before new ones get 429")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-connections", type=positive("--max-connections"), default=None,
                   help="open HTTP connections at once; more get 503 and are closed "
                        "(default: 1024, or half the file-descriptor limit when lower)")
    p.add_argument("--header-timeout", type=positive_float("--header-timeout"), default=15.0,
                   help="seconds a connection may take to send its request headers, or stay idle (default 15)")
    p.add_argument("--body-timeout", type=positive_float("--body-timeout"), default=30.0,
                   help="seconds to receive a request body once its headers are in; then 408 (default 30)")
    p.add_argument("--max-body-bytes", type=positive("--max-body-bytes"), default=8 << 20,
                   help="largest request body; larger get 413 (default 8 MiB)")
    p.add_argument("--controller-timeout", type=positive_float("--controller-timeout"), default=3.0,
                   help="pipeline and disaggregated deployments: seconds without a status from the controller "
                        "(pushed every 0.25 s) before the front-end counts it as hung and a standby takes over "
                        "(default 3; at least 1)")
    p.add_argument("--plan", default=None, help="take pp / prompt and token stages / microbatch from `dejavu plan --json`")
    p.set_defaults(func=cmd_serve)


def apply_plan(args) -> None:
    """`--plan FILE`: the planner's deployment, unless the command line already sets one."""
    from ..planner.plan import load_choice

    choice = load_choice(args.plan)
    if args.pp != 1 or args.prompt_stages or args.token_stages:
        raise ValueError("--plan chooses the deployment: drop --pp / --prompt-stages / --token-stages")
    args.pp = choice.get("pp", 1)
    args.prompt_stages = choice.get("prompt_stages", 0)
    args.token_stages = choice.get("token_stages", 0)
    args.microbatch_size = args.microbatch_size or choice.get("microbatch_size", 0)


def cmd_serve(args) -> int:
    from ..config import ServerConfig
    from ..serving.api import ApiServer
    from ..serving.http_limits import HttpLimits, bind_listener

    if args.model_tag:
        if args.model not in (DEFAULT_MODEL, args.model_tag):
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if args.plan:
        apply_plan(args)

    sc = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
                      served_model_name=args.served_model_name, max_connections=args.max_connections or 0,
                      header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                      max_body_bytes=args.max_body_bytes).validate()
    check_launcher(args)
    if args.controller_timeout < 1.0:
        raise ValueError(f"--controller-timeout must be at least 1 s (4 status intervals), got {args.controller_timeout:g}")
    sock = bind_listener(sc.host, sc.port)  # before the model loads: a taken port fails at once
    try:
        config = config_from_args(args)
        if config.distributed:  # the controller in a process of its own (serving/frontend.py)
            from ..serving.frontend import FrontEnd

            llm = FrontEnd(args, config)
        else:
            from .. import LLM

            llm = LLM.from_config(config)  # (check_launcher ran above)
    except BaseException:
        sock.close()
        raise
    limits = HttpLimits(max_connections=sc.max_connections, header_timeout=sc.header_timeout,
                        body_timeout=sc.body_timeout, max_body_bytes=sc.max_body_bytes)
    server = ApiServer(llm, sc.served_model_name or args.model, api_key=sc.api_key, max_queue=sc.max_queue,
                       limits=limits)
    if hasattr(llm.engine, "begin_stop"):
        async def stopping(app):  # SIGTERM / SIGINT: the workers' exits that follow are not failures
            llm.engine.begin_stop()
        server.app.on_shutdown.append(stopping)
    print(f"[dejavu] serving {args.model} on http://{sc.host}:{sc.port}/v1", file=sys.stderr)
    server.serve_forever(sc.host, sc.port, sock)
    return 0
