"""`dejavu profile`: stage times, memory and bandwidths for the planner and simulator."""
from __future__ import annotations

import json

from .common import int_list, positive


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure stage times, memory and bandwidths for the planner and simulator")
    p.add_argument("--model", default="random:opt-125m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--analytic", default=None, metavar="GPU",
                   help="no measurement: a roofline profile for GPU (a100-80gb, a100-40gb, v100-16gb, h100-pcie, h100-sxm)")
    p.add_argument("--gpus-per-machine", type=positive("--gpus-per-machine"), default=1,
                   help="with --analytic: GPUs per pipeline stage (tensor-parallel)")
    p.add_argument("--batches", default="1,4,8", help="microbatch sizes to measure")
    p.add_argument("--prompt-lens", default="16,64,128", help="prompt lengths to measure")
    p.add_argument("--contexts", default="32,128,256", help="decode contexts to measure")
    p.add_argument("--workers", type=positive("--workers"), default=1,
                   help="worker processes the deployment will run on this host (CPU threads = cores / workers)")
    p.add_argument("--repeat", type=positive("--repeat"), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overhead", action="store_true", help="skip measuring the controller round trip")
    p.add_argument("--overhead-via", default="engine", choices=["engine", "http"],
                   help="measure the per-step overhead through the engine API (default) or through the HTTP "
                        "server driven by a load generator on this host (same-host serving deployments)")
    p.add_argument("--memory-gib", type=float, default=0.0, help="memory per device for the planner (0: unknown)")
    p.add_argument("--json", default=None, help="write the profile here")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    if args.analytic:
        from ..planner.analytic import analytic_profile

        prof = analytic_profile(args.model, args.analytic, args.gpus_per_machine)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(prof.to_json(), f, indent=1)
        else:
            print(json.dumps(prof.to_json(), indent=1))
        return 0
    from ..planner.profile import run

    prof = run(args.model, args.device, args.dtype, int_list(args.batches, "--batches"),
               int_list(args.prompt_lens, "--prompt-lens"), int_list(args.contexts, "--contexts"), args.workers,
               args.repeat, args.seed, not args.no_overhead, args.memory_gib, args.json, args.overhead_via)
    if not args.json:
        print(json.dumps(prof.to_json(), indent=1))
    return 0
