"""`dejavu bench ...`: benchmarks, each with a baseline measured in the same run."""
from __future__ import annotations

import sys

from . import bench_decode, bench_serve
from .common import check_device, int_list, positive


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks, each with a baseline measured in the same run")
    bsub = b.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("generate", help="offline greedy generation: DéjàVu engine vs HF generate")
    p.add_argument("--model", default="random:opt-125m", help="a random:<name> model (default: random:opt-125m)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=positive("--batch"), default=8)
    p.add_argument("--prompt-len", type=positive("--prompt-len"), default=64)
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=32)
    p.add_argument("--repeat", type=positive("--repeat"), default=2, help="timed runs per engine (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.set_defaults(func=cmd_bench_generate)
    bench_decode.add_parser(bsub)
    bench_serve.add_parser(bsub)
    p = bsub.add_parser("pipeline", help="throughput of the same requests at several pipeline/TP layouts")
    p.add_argument("--model", default="random:opt-125m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layouts", default="1x1,2x1,4x1", help="comma-separated PPxTP layouts (default: 1x1,2x1,4x1)")
    p.add_argument("--requests", type=positive("--requests"), default=16)
    p.add_argument("--prompt-len", type=positive("--prompt-len"), default=64)
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=32)
    p.add_argument("--microbatch-size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_pipeline)

    p = bsub.add_parser("swap", help="same KV budget, pipeline without and with microbatch swapping")
    p.add_argument("--model", default="random:opt-125m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--pp", type=positive("--pp"), default=2)
    p.add_argument("--kv-cache-blocks", type=positive("--kv-cache-blocks"), default=64, help="KV budget per worker")
    p.add_argument("--requests", type=positive("--requests"), default=32)
    p.add_argument("--prompt-len", type=positive("--prompt-len"), default=64)
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=32)
    p.add_argument("--resident-microbatches", type=positive("--resident-microbatches"), default=1)
    p.add_argument("--admission", default="reserve", choices=["greedy", "reserve"],
                   help="reserve (default): a request runs only when its whole prompt + max_tokens fits, so the "
                        "batch a budget holds is fixed; greedy: admit by prompt, preempt and recompute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_swap)

    p = bsub.add_parser("kvstream", help="DéjàVuLib bandwidth per level and block size vs a contiguous copy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=positive("--layers"), default=24)
    p.add_argument("--kv-heads", type=positive("--kv-heads"), default=32)
    p.add_argument("--head-dim", type=positive("--head-dim"), default=64)
    p.add_argument("--block-sizes", default="1,4,16,64", help="tokens per block, comma-separated")
    p.add_argument("--levels", default="0,1,3", help="streaming levels, comma-separated")
    p.add_argument("--total-mib", type=positive("--total-mib"), default=256, help="bytes moved per measurement")
    p.add_argument("--repeat", type=positive("--repeat"), default=5)
    p.add_argument("--file-dir", default=None, help="where GPU->file chunks go (default: a temp dir)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_kvstream)

    p = bsub.add_parser("kvpeer", help="DéjàVuLib GPU -> remote GPU (NCCL) vs a raw NCCL send of the same bytes")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: two GPUs over NCCL; cpu: two processes over gloo")
    p.add_argument("--layers", type=positive("--layers"), default=32)
    p.add_argument("--kv-heads", type=positive("--kv-heads"), default=32)
    p.add_argument("--head-dim", type=positive("--head-dim"), default=128)
    p.add_argument("--block-sizes", default="16,1", help="tokens per block, comma-separated")
    p.add_argument("--piece-mib", default="8,32,128", help="bytes per pipelined NCCL send (MiB), comma-separated")
    p.add_argument("--total-mib", type=positive("--total-mib"), default=1024, help="bytes moved per measurement")
    p.add_argument("--repeat", type=positive("--repeat"), default=5)
    p.add_argument("--high-priority-nccl", action="store_true",
                    help="NCCL on a high-priority stream (its kernels get SMs ahead of the copy kernels)")
    p.add_argument("--nccl-init", default="eager", choices=["eager", "lazy"],
                    help="eager: the process group is bound to its GPU at init (P2P shares the group's "
                         "communicator); lazy: no device_id, NCCL makes a communicator per peer pair on first use")
    p.add_argument("--trace-dir", default=None,
                    help="also record one streamed transfer per rank with torch.profiler (Chrome traces here)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_kvpeer)


def cmd_bench_generate(args) -> int:
    check_device(args.device)
    from ..bench.generate import run

    run(args.model, args.device, args.dtype, args.batch, args.prompt_len, args.max_tokens, args.seed, args.repeat,
        args.json)
    return 0


def cmd_bench_pipeline(args) -> int:
    check_device(args.device)
    from ..bench.pipeline import run

    layouts = []
    for item in args.layouts.split(","):
        try:
            pp, tp = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--layouts takes PPxTP items like 2x1, got {item!r}") from None
        layouts.append((pp, tp))
    run(args.model, args.device, layouts, args.requests, args.prompt_len, args.max_tokens, args.microbatch_size,
        args.seed, args.json)
    return 0


def cmd_bench_swap(args) -> int:
    check_device(args.device)
    from ..bench.swap import run

    r = run(args.model, args.device, args.pp, args.kv_cache_blocks, args.requests, args.prompt_len, args.max_tokens,
            args.resident_microbatches, args.seed, args.json, dtype=args.dtype, admission=args.admission)
    # fp32 outputs must match token for token; fp16/bf16 ones may differ where the two runs batch
    # differently (different GEMM shapes round differently), so there the comparison is reported only.
    exact = args.dtype == "float32" or (args.dtype == "auto" and args.device == "cpu")
    return 0 if r["same_tokens"] or not exact else 1


def cmd_bench_kvstream(args) -> int:
    check_device(args.device)
    from ..bench.kvstream import run

    run(args.device, args.layers, args.kv_heads, args.head_dim, int_list(args.block_sizes, "--block-sizes"),
        int_list(args.levels, "--levels"), args.total_mib, args.repeat, args.file_dir, args.json)
    return 0


def cmd_bench_kvpeer(args) -> int:
    from ..bench.kvpeer import run

    try:
        run(args.device, args.layers, args.kv_heads, args.head_dim, int_list(args.block_sizes, "--block-sizes"),
            int_list(args.piece_mib, "--piece-mib"), args.total_mib, args.repeat, args.json,
            high_priority=args.high_priority_nccl, nccl_init=args.nccl_init, trace_dir=args.trace_dir)
    except (RuntimeError, ValueError) as e:
        print(f"dejavu bench kvpeer: {e}", file=sys.stderr)
        return 1
    return 0
