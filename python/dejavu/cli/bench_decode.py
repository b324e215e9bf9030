"""`dejavu bench decode`: decode ms/step against the weight-read floor and HF generate."""
from __future__ import annotations

import sys

from .common import check_device, positive


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="decode ms/step against the weight-read floor and HF generate")
    p.add_argument("--model", default="random:opt-1.3b", help="a random:<name> model (default: random:opt-1.3b)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes (default 1,8,32,64)")
    p.add_argument("--prompt-len", type=positive("--prompt-len"), default=512)
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=128)
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF transformers baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicate", action="store_true",
                   help="also decode each batch with token-level replication running (as a --replicate token "
                        "worker streams each step's new KV to its holder), alternating off / on, and report the ratio")
    p.add_argument("--pairs", type=positive("--pairs"), default=2,
                   help="off / on pairs with --replicate, --compare-pdl or --swap-stream")
    p.add_argument("--replicate-every", type=positive("--replicate-every"), default=1,
                   help="with --replicate: steps per gather and send (set_replication(every=K))")
    p.add_argument("--replica-holder", default="thread", choices=["thread", "process"],
                   help="with --replicate: the holder runs in this process, applying the slots as a worker holding "
                        "its neighbour's replicas does (thread, default), or in a process of its own (process)")
    p.add_argument("--replicate-path", default="gather,ring",  # bench.decode.REPLICATE_PATHS (which imports torch)
                   help="with --replicate: comma-separated ways to replicate, each measured against the same off "
                        "runs: gather (the sender gathers each step's slots with the copy engine while the next "
                        "step computes: the cheapest where steps are queued ahead, as this engine's are) and ring "
                        "(the decode kernels also write new K/V into a pinned ring the sender sends from: pipeline "
                        "workers' default); default both, in that order")
    p.add_argument("--replicate-skip", default="none", choices=["none", "gather", "send"],
                   help="with --replicate, a diagnostic: leave out each step's device gather (send zeros; the gather "
                        "path only, the ring has none) or its send, to see which part costs the decode step")
    p.add_argument("--compare-pdl", action="store_true",
                   help="also decode each batch with the decode kernels' programmatic dependent launch off and on "
                        "(CUDA graphs captured again for each), alternating --pairs times, and report the ratio")
    p.add_argument("--swap-stream", action="store_true",
                   help="also decode each batch with microbatch swapping running beside it (a SwapCache of its "
                        "own swapping shadow microbatches of the batch's size in over PCIe, as a --swap pipeline "
                        "worker does while a microbatch computes), alternating off / on --pairs times; with --replicate "
                        "as well, also with both streams at once (replication through the first --replicate-path) "
                        "against neither")
    p.add_argument("--swap-driver", default="step", choices=["step", "thread"],
                   help="with --swap-stream: the decode loop starts each swap-in between two steps (step), or a "
                        "thread of its own does, as a worker's receiving thread starts a prefetch (thread)")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.set_defaults(func=cmd_bench_decode)


def cmd_bench_decode(args) -> int:
    from ..bench.decode import run

    try:
        batches = [int(x) for x in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        print(f"dejavu bench decode: --batch must be comma-separated positive integers, got {args.batch!r}",
              file=sys.stderr)
        return 2
    from ..bench.decode import REPLICATE_PATHS

    paths = tuple(x.strip() for x in args.replicate_path.split(",") if x.strip())
    if not paths or any(p not in REPLICATE_PATHS for p in paths):
        print(f"dejavu bench decode: --replicate-path takes a comma-separated list of {', '.join(REPLICATE_PATHS)}, "
              f"got {args.replicate_path!r}", file=sys.stderr)
        return 2
    check_device(args.device)
    run(args.model, args.device, args.dtype, batches, args.prompt_len, args.max_tokens, args.seed, args.hf, args.json,
        replicate=args.replicate, pairs=args.pairs, replicate_every=args.replicate_every,
        replica_holder=args.replica_holder, replicate_skip=args.replicate_skip, replicate_paths=paths,
        compare_pdl=args.compare_pdl, swap_stream=args.swap_stream, swap_driver=args.swap_driver)
    return 0
