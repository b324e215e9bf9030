"""`dejavu simulate`: discrete-event simulation of deployments on a workload."""
from __future__ import annotations

import json

from .common import int_list, positive


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation of deployments on a workload")
    p.add_argument("--profile", required=True, help="a profile JSON from `dejavu profile`")
    p.add_argument("--deploy", action="append", required=True,
                   help="ft:D or disagg:Dp+Dt (repeat to compare)")
    wl = p.add_mutually_exclusive_group(required=True)
    wl.add_argument("--trace", help="JSON list of [prompt_tokens, output_tokens]")
    wl.add_argument("--synthetic", action="store_true", help="chat-like long-tailed lengths (as bench serve)")
    wl.add_argument("--lengths", help="PROMPT,OUTPUT for every request")
    p.add_argument("--num-requests", type=positive("--num-requests"), default=200)
    p.add_argument("--max-prompt", type=positive("--max-prompt"), default=1024)
    p.add_argument("--max-output", type=positive("--max-output"), default=512)
    p.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--microbatch", type=positive("--microbatch"), default=8)
    p.add_argument("--max-batched-tokens", type=positive("--max-batched-tokens"), default=8192)
    p.add_argument("--receive-slots", type=positive("--receive-slots"), default=8)
    p.add_argument("--m", type=float, default=1.0)
    p.add_argument("--swap", action="store_true", help="microbatch swapping: PCIe time per decode step")
    p.add_argument("--fail-at", type=float, default=None, help="a stage dies at this time (s)")
    p.add_argument("--fail-stage", default="token:0", help="ROLE:INDEX (stage, prompt or token)")
    p.add_argument("--no-replicate", action="store_true", help="failure without replicas: restart from scratch")
    p.add_argument("--detect-s", type=float, default=2.0)
    p.add_argument("--restart-s", type=float, default=5.0, help="respawn and weight load")
    p.add_argument("--gpu-hour-cost", type=float, default=0.0, help="price of one machine-hour, for the cost column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--chrome-trace", default=None, help="write a trace (chrome://tracing, Perfetto) of the last one")
    p.add_argument("--plot", default=None, help="draw the comparison to this PNG (needs matplotlib)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    import math

    from ..bench.serve import load_trace, synthetic_lengths
    from ..planner.model import PlanError, Profile
    from ..planner.simulator import simulate
    from ..planner.workload import Deployment, SimOptions

    prof = Profile.load(args.profile)
    if not args.rate > 0:
        raise PlanError(f"--rate must be > 0, got {args.rate}")
    if args.trace:
        lengths = load_trace(args.trace)[: args.num_requests]
    elif args.synthetic:
        lengths = synthetic_lengths(args.num_requests, args.seed, args.max_prompt, args.max_output)
    else:
        pair = int_list(args.lengths, "--lengths")
        if len(pair) != 2:
            raise PlanError(f"--lengths takes PROMPT,OUTPUT, got {args.lengths!r}")
        lengths = [(pair[0], pair[1])] * args.num_requests
    role, _, idx = args.fail_stage.partition(":")
    if role not in ("stage", "prompt", "token") or not idx.isdigit():
        raise PlanError(f"--fail-stage takes ROLE:INDEX with ROLE stage, prompt or token; got {args.fail_stage!r}")
    if not 1.0 <= args.m < 2.0:
        raise PlanError(f"--m must be in [1, 2), got {args.m}")
    results = []
    for text in args.deploy:
        dep = Deployment.parse(text)
        opts = SimOptions(microbatch=args.microbatch, max_batched_tokens=args.max_batched_tokens,
                          receive_slots=args.receive_slots, m=args.m, swap=args.swap, fail_at=args.fail_at,
                          fail_stage=(role, int(idx)), replicate=not args.no_replicate, detect_s=args.detect_s,
                          restart_s=args.restart_s, gpu_hour_cost=args.gpu_hour_cost,
                          trace_events=bool(args.chrome_trace))
        r, events = simulate(prof, dep, lengths, args.rate, opts, args.seed)
        results.append(r)
    print(f"{prof.model} ({prof.card or prof.device}): {len(lengths)} requests, rate {args.rate}/s")
    print(f"{'deployment':<14} {'tok/s':>9} {'req/s':>8} {'makespan s':>11} {'lat p50':>8} {'lat p99':>8} "
          f"{'TTFT p50':>9} {'cost':>8}")
    for r in results:
        print(f"{r['deployment']:<14} {r['tokens_per_s']:>9.1f} {r['requests_per_s']:>8.2f} {r['makespan_s']:>11.2f} "
              f"{r['latency_s']['p50']:>8.2f} {r['latency_s']['p99']:>8.2f} {r['ttft_s']['p50']:>9.3f} "
              f"{r['cost']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": args.profile, "requests": len(lengths), "rate": None if math.isinf(args.rate)
                       else args.rate, "results": results}, f, indent=1)
    if args.chrome_trace:
        with open(args.chrome_trace, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    if args.plot:
        from ..planner.plot import plot

        plot(results, args.plot)
    return 0
