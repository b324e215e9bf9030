"""`dejavu plan`: the prompt/token split for D machines."""
from __future__ import annotations

import json

from .common import positive


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose the prompt/token split (paper section 4.2.1) for D machines")
    p.add_argument("--profile", default=None, help="a profile JSON from `dejavu profile`")
    p.add_argument("--Y", type=float, default=None, help="explicit: prompt time of one stage at depth --machines (s)")
    p.add_argument("--t", type=float, default=None, help="explicit: token time of one stage at depth --machines (s)")
    p.add_argument("--layers", type=int, default=32, help="explicit: model layers")
    p.add_argument("--weights-gib", type=float, default=0.0, help="explicit: weight memory (GiB)")
    p.add_argument("--kv-kib-per-token", type=float, default=0.0, help="explicit: KV per token, all layers (KiB)")
    p.add_argument("--machines", type=positive("--machines"), required=True, help="D: machines (stages) in all")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per machine (default: the profile's)")
    p.add_argument("--microbatch", type=positive("--microbatch"), default=8)
    p.add_argument("--prompt-len", type=positive("--prompt-len"), default=512)
    p.add_argument("--output-len", type=positive("--output-len"), default=64)
    p.add_argument("--m", type=float, default=1.0, help="prompt-side cost factor of disaggregation, in [1, 2)")
    p.add_argument("--no-simulate", action="store_true", help="rank by the closed form only")
    p.add_argument("--json", default=None, help="write the plan here (`dejavu serve --plan` reads it)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..planner.model import PlanError, Profile
    from ..planner.plan import explicit_profile, plan

    if args.profile and (args.Y is not None or args.t is not None):
        raise PlanError("give either --profile or explicit --Y and --t, not both")
    if args.profile:
        prof = Profile.load(args.profile)
    elif args.Y is not None and args.t is not None:
        if args.layers <= 0:
            raise PlanError(f"--layers must be > 0, got {args.layers}")
        prof = explicit_profile(args.Y, args.t, args.layers, max(1, int(args.weights_gib * 2**30)),
                                max(1, int(args.kv_kib_per_token * 1024)), args.machines)
    else:
        raise PlanError("need --profile FILE, or --Y and --t (seconds per stage at depth --machines)")
    mem = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    r = plan(prof, args.machines, args.microbatch, args.prompt_len, args.output_len, args.m, mem,
             simulate_candidates=not args.no_simulate)
    print(f"{'deployment':<14} {'closed form tok/s':>18} {'simulated tok/s':>16}")
    for c in r["candidates"]:
        sim = c.get("simulated_tokens_per_s")
        print(f"{c['deployment']:<14} {c['closed_form_tokens_per_s']:>18.1f} {sim if sim is None else round(sim, 1)!s:>16}"
              + ("  <- chosen" if c["deployment"] == r["choice"] else ""))
    for line in r["reasons"]:
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
