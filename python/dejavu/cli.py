"""`dejavu` command line: generate (this build), with room for serve | worker | demo | bench | profile |
plan | simulate as they land."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .prefix_cli import add_prefix_cache_args, prefix_cache_kwargs


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="HF directory, hub id in the local HF cache (org/name), .gguf file, 'smollm2', or "
                        "random:<name> (default: smollm2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (auto: fp32 on CPU; on CUDA the "
                   "checkpoint's bf16/fp16, else fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed for random: weights and for sampling")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv-cache-blocks", type=int, default=0, help="KV-cache blocks (default: from memory)")
    p.add_argument("--max-model-len", type=int, default=0, help="cap on prompt + output tokens")
    p.add_argument("--pp", type=int, default=1, help="pipeline depth: worker processes, one stage each (1-8)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: worker processes per stage (1-8)")
    p.add_argument("--prompt-stages", type=int, default=0, help="disaggregation: prompt pipeline depth")
    p.add_argument("--token-stages", type=int, default=0, help="disaggregation: token pipeline depth")
    p.add_argument("--kv-receive-slots", type=int, default=8, help="disaggregation: requests in KV transfer at once")
    p.add_argument("--kv-transport", default="auto", choices=["auto", "ipc", "shm", "tcp"],
                   help="disaggregation: how KV reaches the token workers (auto: CUDA IPC on the same host "
                        "for GPU workers, shared memory for CPU ones, else tcp)")
    p.add_argument("--microbatch-size", type=int, default=0, help="sequences per microbatch (pipeline; default: any)")
    p.add_argument("--swap", action="store_true",
                   help="microbatch swapping (pp >= 2, or --token-stages >= 2 with disaggregation): the KV of idle "
                        "microbatches lives in pinned host memory")
    p.add_argument("--resident-microbatches", type=int, default=2,
                   help="with --swap: microbatches whose KV is on the device at once (the KV budget, "
                        "--kv-cache-blocks, is split among them)")
    p.add_argument("--admission", default="greedy", choices=["greedy", "reserve"],
                   help="greedy: admit requests whose tokens so far fit, preempt (and recompute) when the cache "
                        "fills; reserve: admit one only when its prompt + max_tokens fits, never preempt")
    p.add_argument("--launcher", default="local", choices=["local", "mpirun", "external"],
                   help="how pipeline workers start: local child processes (default), mpirun, or external")
    p.add_argument("--replicate", action="store_true",
                   help="stream every token's KV to another worker's host memory; after a failure requests resume "
                        "from their last replicated token (pipeline or token stages >= 2, tp 1)")
    p.add_argument("--replicate-dir", default=None,
                   help="with --replicate: the replica holders also keep their replicas in files under DIR")
    p.add_argument("--replicate-to", default=None,
                   help="with --replicate: comma-separated holder stage of each stage (default: the next, in a ring)")
    p.add_argument("--recovery", default="auto", choices=["auto", "respawn", "standby", "wait", "off"],
                   help="when a worker dies: respawn it here, use a `dejavu worker --standby`, wait for an "
                        "operator-started one, or stop (auto: respawn for tp 1, off for tp > 1)")
    p.add_argument("--spare-workers", type=int, default=1,
                   help="with --recovery respawn: warm spare processes kept started and registered (0: start one "
                        "only after a failure)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly instead of replaying CUDA graphs (single process on CUDA)")
    p.add_argument("--no-overlap", dest="overlap_steps", action="store_false",
                   help="each greedy decode step waits for its tokens before the next is queued (single process; "
                        "by default the next step is queued first)")
    add_prefix_cache_args(p)
    p.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between worker heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="a worker silent this long is declared dead (connection loss is noticed at once)")


def _positive(name):
    def parse(v):
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {x}")
        return x
    return parse


def _positive_float(name):
    def parse(v):
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {v}")
        return x
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dejavu", description="DéjàVu: fast, fault-tolerant LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--max-tokens", type=_positive("--max-tokens"), default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("DEJAVU_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $DEJAVU_API_KEY; prefer the "
                         "variable: other users of the machine can read a command line)")
    sv.add_argument("--max-queue", type=_positive("--max-queue"), default=256,
                    help="waiting requests before new ones get 429")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    sv.add_argument("--max-connections", type=_positive("--max-connections"), default=None,
                    help="open HTTP connections at once; more get 503 and are closed "
                         "(default: 1024, or half the file-descriptor limit when lower)")
    sv.add_argument("--header-timeout", type=_positive_float("--header-timeout"), default=15.0,
                    help="seconds a connection may take to send its request headers, or stay idle (default 15)")
    sv.add_argument("--body-timeout", type=_positive_float("--body-timeout"), default=30.0,
                    help="seconds to receive a request body once its headers are in; then 408 (default 30)")
    sv.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"), default=8 << 20,
                    help="largest request body; larger get 413 (default 8 MiB)")
    sv.add_argument("--plan", default=None, help="take pp / prompt and token stages / microbatch from `dejavu plan --json`")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run a local deployment of the default model and exercise its HTTP API")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    d.add_argument("--max-tokens", type=_positive("--max-tokens"), default=48)
    d.add_argument("--prompt-stages", type=int, default=1, help="prompt workers (0: no disaggregation)")
    d.add_argument("--token-stages", type=int, default=2, help="token workers (0: no disaggregation)")
    d.add_argument("--pp", type=int, default=1, help="FT-style pipeline depth (with --prompt-stages 0)")
    d.add_argument("--tp", type=int, default=1)
    d.add_argument("--no-replicate", action="store_true", help="no KV replication (killed work starts over)")
    d.add_argument("--kill-worker", default="token:1", metavar="ROLE:STAGE",
                   help="worker to kill -9 in the middle of the batch (stage:N, token:N, prompt:N; 'none': no failure)")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("worker", help="run one worker process (started by the controller or by mpirun)")
    w.add_argument("--controller", required=True, help="HOST:PORT of the controller")
    w.add_argument("--token-file", default=None, metavar="PATH",
                   help="read the cluster token from this file (mode 600) instead of DEJAVU_CLUSTER_TOKEN")
    w.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: see cmd_worker
    w.add_argument("--rank", type=int, default=None, help="worker rank (default: from mpirun's environment)")
    w.add_argument("--standby", action="store_true",
                   help="register as a standby: the controller gives it the rank of the next worker that fails "
                        "(serve --recovery standby)")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("bench", help="benchmarks, each with a baseline measured in the same run")
    bsub = b.add_subparsers(dest="bench", required=True)
    bg = bsub.add_parser("generate", help="offline greedy generation: DéjàVu engine vs HF generate")
    bg.add_argument("--model", default="random:opt-125m", help="a random:<name> model (default: random:opt-125m)")
    bg.add_argument("--device", default="cpu")
    bg.add_argument("--dtype", default="auto")
    bg.add_argument("--batch", type=_positive("--batch"), default=8)
    bg.add_argument("--prompt-len", type=_positive("--prompt-len"), default=64)
    bg.add_argument("--max-tokens", type=_positive("--max-tokens"), default=32)
    bg.add_argument("--repeat", type=_positive("--repeat"), default=2, help="timed runs per engine (best kept)")
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--json", default=None, help="write all numbers to this file")
    bg.set_defaults(func=cmd_bench_generate)
    bd = bsub.add_parser("decode", help="decode ms/step against the weight-read floor and HF generate")
    bd.add_argument("--model", default="random:opt-1.3b", help="a random:<name> model (default: random:opt-1.3b)")
    bd.add_argument("--device", default="cuda")
    bd.add_argument("--dtype", default="auto")
    bd.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes (default 1,8,32,64)")
    bd.add_argument("--prompt-len", type=_positive("--prompt-len"), default=512)
    bd.add_argument("--max-tokens", type=_positive("--max-tokens"), default=128)
    bd.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF transformers baseline")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--replicate", action="store_true",
                    help="also decode each batch with token-level replication running (as a --replicate token "
                         "worker streams each step's new KV to its holder), alternating off / on, and report the ratio")
    bd.add_argument("--pairs", type=_positive("--pairs"), default=2,
                    help="off / on pairs with --replicate, --compare-pdl or --swap-stream")
    bd.add_argument("--replicate-every", type=_positive("--replicate-every"), default=1,
                    help="with --replicate: steps per gather and send (set_replication(every=K))")
    bd.add_argument("--replica-holder", default="thread", choices=["thread", "process"],
                    help="with --replicate: the holder runs in this process, applying the slots as a worker holding "
                         "its neighbour's replicas does (thread, default), or in a process of its own (process)")
    bd.add_argument("--replicate-path", default="gather,ring",  # bench.decode.REPLICATE_PATHS (which imports torch)
                    help="with --replicate: comma-separated ways to replicate, each measured against the same off "
                         "runs: gather (the sender gathers each step's slots with the copy engine while the next "
                         "step computes: the cheapest where steps are queued ahead, as this engine's are) and ring "
                         "(the decode kernels also write new K/V into a pinned ring the sender sends from: pipeline "
                         "workers' default); default both, in that order")
    bd.add_argument("--replicate-skip", default="none", choices=["none", "gather", "send"],
                    help="with --replicate, a diagnostic: leave out each step's device gather (send zeros; the gather "
                         "path only, the ring has none) or its send, to see which part costs the decode step")
    bd.add_argument("--compare-pdl", action="store_true",
                    help="also decode each batch with the decode kernels' programmatic dependent launch off and on "
                         "(CUDA graphs captured again for each), alternating --pairs times, and report the ratio")
    bd.add_argument("--swap-stream", action="store_true",
                    help="also decode each batch with microbatch swapping running beside it (a SwapCache of its "
                         "own swapping shadow microbatches of the batch's size in over PCIe, as a --swap pipeline "
                         "worker does while a microbatch computes), alternating off / on --pairs times; with --replicate "
                         "as well, also with both streams at once (replication through the first --replicate-path) "
                         "against neither")
    bd.add_argument("--swap-driver", default="step", choices=["step", "thread"],
                    help="with --swap-stream: the decode loop starts each swap-in between two steps (step), or a "
                         "thread of its own does, as a worker's receiving thread starts a prefetch (thread)")
    bd.add_argument("--json", default=None, help="write all numbers to this file")
    bd.set_defaults(func=cmd_bench_decode)

    bs = bsub.add_parser("serve", help="load generator for an OpenAI-compatible server (vLLM's serving metrics)",
                         description="Streams requests to an OpenAI-compatible server and reports vLLM's serving "
                                     "benchmark metrics (TTFT, TPOT, ITL, E2EL, throughput, goodput) and ours "
                                     "(normalized latency). See docs/serving.md, Benchmarking.")
    bs.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    src = bs.add_mutually_exclusive_group()
    src.add_argument("--dataset-name", choices=["random", "prefix", "sharegpt", "synthetic", "trace"], default=None,
                     help="workload (default random): random lengths, a shared prefix + random suffixes (prefix), "
                          "a ShareGPT JSON file (sharegpt, --dataset-path), chat-like long-tailed lengths "
                          "(synthetic) or a trace file (trace, --dataset-path)")
    src.add_argument("--trace", help="JSON list of [prompt_tokens, output_tokens] (= --dataset-name trace)")
    src.add_argument("--synthetic", action="store_true", help="chat-like long-tailed lengths (= --dataset-name "
                     "synthetic)")
    bs.add_argument("--dataset-path", default=None, help="the sharegpt or trace file")
    bs.add_argument("--backend", default="openai", choices=["openai", "vllm", "openai-chat"],
                    help="openai / vllm: /v1/completions; openai-chat: /v1/chat/completions with text messages")
    bs.add_argument("--endpoint", default=None, help="API path (default: by --backend)")
    bs.add_argument("--rate", "--request-rate", dest="rate", type=float, default=float("inf"),
                    help="requests per second (Poisson); inf = all at once (default)")
    bs.add_argument("--burstiness", type=float, default=1.0,
                    help="arrival gaps are gamma distributed with this shape (1: Poisson; < 1 burstier)")
    bs.add_argument("--max-concurrency", type=_positive("--max-concurrency"), default=None,
                    help="at most this many requests in flight (later arrivals wait for a slot)")
    bs.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=_positive("--num-requests"),
                    default=None, help="requests to send (default: 32, a CPU server's minute or so; a trace: all)")
    bs.add_argument("--random-input-len", type=_positive("--random-input-len"), default=256,
                    help="random / prefix: prompt tokens after the prefix (default 256)")
    bs.add_argument("--random-output-len", type=_positive("--random-output-len"), default=64,
                    help="random / prefix: output tokens (default 64)")
    bs.add_argument("--random-range-ratio", type=float, default=0.0,
                    help="random / prefix: lengths uniform in [L*(1-r), L*(1+r)], r in [0, 1) (default 0)")
    bs.add_argument("--prefix-len", "--random-prefix-len", dest="prefix_len", type=int, default=None,
                    help="tokens of one prefix shared by every request (default: 256 for prefix, 0 for random)")
    bs.add_argument("--sharegpt-output-len", type=_positive("--sharegpt-output-len"), default=None,
                    help="sharegpt: this output length instead of the gpt turn's")
    bs.add_argument("--max-prompt", type=_positive("--max-prompt"), default=1024,
                    help="synthetic: longest prompt; sharegpt: longest prompt kept (default 1024)")
    bs.add_argument("--max-output", type=_positive("--max-output"), default=512, help="synthetic: longest output")
    bs.add_argument("--text-prompts", action="store_true",
                    help="completions: send token-count workloads as text (words) instead of token ids")
    bs.add_argument("--tokenizer", default=None,
                    help="model spec whose tokenizer counts sharegpt text (default: the server's model id)")
    bs.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                    help="send ignore_eos so outputs run to max_tokens (default: on, except for sharegpt; "
                         "ours and vLLM accept it, other servers may not)")
    bs.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                    help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    bs.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                    help="metrics to report (default ttft,tpot,itl,e2el)")
    bs.add_argument("--metric-percentiles", default="95,99", help="percentiles to report (default 95,99)")
    bs.add_argument("--model", default=None, help="model id to send (default: the server's, from /v1/models)")
    bs.add_argument("--api-key", default=os.environ.get("DEJAVU_API_KEY"), help="default: $DEJAVU_API_KEY")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--disable-tqdm", action="store_true", help="no progress bar (it shows only on a terminal)")
    bs.add_argument("--json", default=None, help="write the report, per-request arrays included, to this file")
    bs.add_argument("--save-result", action="store_true",
                    help="also write it as vLLM names it: --result-dir / --result-filename (default "
                         "BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)")
    bs.add_argument("--result-dir", default=None)
    bs.add_argument("--result-filename", default=None)
    bs.add_argument("--kill-worker", default=None, metavar="ROLE:STAGE",
                    help="failover benchmark: kill -9 this worker (stage:N, token:N or prompt:N, from /v1/cluster; "
                         "same host) during a second pass of the same load, after a failure-free first pass")
    bs.add_argument("--kill-at", type=float, default=2.0, help="seconds into the pass to kill the worker")
    bs.set_defaults(func=cmd_bench_serve)

    bp = bsub.add_parser("pipeline", help="throughput of the same requests at several pipeline/TP layouts")
    bp.add_argument("--model", default="random:opt-125m")
    bp.add_argument("--device", default="cpu")
    bp.add_argument("--layouts", default="1x1,2x1,4x1", help="comma-separated PPxTP layouts (default: 1x1,2x1,4x1)")
    bp.add_argument("--requests", type=_positive("--requests"), default=16)
    bp.add_argument("--prompt-len", type=_positive("--prompt-len"), default=64)
    bp.add_argument("--max-tokens", type=_positive("--max-tokens"), default=32)
    bp.add_argument("--microbatch-size", type=int, default=0)
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--json", default=None)
    bp.set_defaults(func=cmd_bench_pipeline)

    pr = sub.add_parser("profile", help="measure stage times, memory and bandwidths for the planner and simulator")
    pr.add_argument("--model", default="random:opt-125m")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--analytic", default=None, metavar="GPU",
                    help="no measurement: a roofline profile for GPU (a100-80gb, a100-40gb, v100-16gb, h100-pcie, h100-sxm)")
    pr.add_argument("--gpus-per-machine", type=_positive("--gpus-per-machine"), default=1,
                    help="with --analytic: GPUs per pipeline stage (tensor-parallel)")
    pr.add_argument("--batches", default="1,4,8", help="microbatch sizes to measure")
    pr.add_argument("--prompt-lens", default="16,64,128", help="prompt lengths to measure")
    pr.add_argument("--contexts", default="32,128,256", help="decode contexts to measure")
    pr.add_argument("--workers", type=_positive("--workers"), default=1,
                    help="worker processes the deployment will run on this host (CPU threads = cores / workers)")
    pr.add_argument("--repeat", type=_positive("--repeat"), default=3)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--no-overhead", action="store_true", help="skip measuring the controller round trip")
    pr.add_argument("--overhead-via", default="engine", choices=["engine", "http"],
                    help="measure the per-step overhead through the engine API (default) or through the HTTP "
                         "server driven by a load generator on this host (same-host serving deployments)")
    pr.add_argument("--memory-gib", type=float, default=0.0, help="memory per device for the planner (0: unknown)")
    pr.add_argument("--json", default=None, help="write the profile here")
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="choose the prompt/token split (paper section 4.2.1) for D machines")
    pl.add_argument("--profile", default=None, help="a profile JSON from `dejavu profile`")
    pl.add_argument("--Y", type=float, default=None, help="explicit: prompt time of one stage at depth --machines (s)")
    pl.add_argument("--t", type=float, default=None, help="explicit: token time of one stage at depth --machines (s)")
    pl.add_argument("--layers", type=int, default=32, help="explicit: model layers")
    pl.add_argument("--weights-gib", type=float, default=0.0, help="explicit: weight memory (GiB)")
    pl.add_argument("--kv-kib-per-token", type=float, default=0.0, help="explicit: KV per token, all layers (KiB)")
    pl.add_argument("--machines", type=_positive("--machines"), required=True, help="D: machines (stages) in all")
    pl.add_argument("--memory-gib", type=float, default=None, help="memory per machine (default: the profile's)")
    pl.add_argument("--microbatch", type=_positive("--microbatch"), default=8)
    pl.add_argument("--prompt-len", type=_positive("--prompt-len"), default=512)
    pl.add_argument("--output-len", type=_positive("--output-len"), default=64)
    pl.add_argument("--m", type=float, default=1.0, help="prompt-side cost factor of disaggregation, in [1, 2)")
    pl.add_argument("--no-simulate", action="store_true", help="rank by the closed form only")
    pl.add_argument("--json", default=None, help="write the plan here (`dejavu serve --plan` reads it)")
    pl.set_defaults(func=cmd_plan)

    si = sub.add_parser("simulate", help="discrete-event simulation of deployments on a workload")
    si.add_argument("--profile", required=True, help="a profile JSON from `dejavu profile`")
    si.add_argument("--deploy", action="append", required=True,
                    help="ft:D or disagg:Dp+Dt (repeat to compare)")
    wl = si.add_mutually_exclusive_group(required=True)
    wl.add_argument("--trace", help="JSON list of [prompt_tokens, output_tokens]")
    wl.add_argument("--synthetic", action="store_true", help="chat-like long-tailed lengths (as bench serve)")
    wl.add_argument("--lengths", help="PROMPT,OUTPUT for every request")
    si.add_argument("--num-requests", type=_positive("--num-requests"), default=200)
    si.add_argument("--max-prompt", type=_positive("--max-prompt"), default=1024)
    si.add_argument("--max-output", type=_positive("--max-output"), default=512)
    si.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all at once)")
    si.add_argument("--microbatch", type=_positive("--microbatch"), default=8)
    si.add_argument("--max-batched-tokens", type=_positive("--max-batched-tokens"), default=8192)
    si.add_argument("--receive-slots", type=_positive("--receive-slots"), default=8)
    si.add_argument("--m", type=float, default=1.0)
    si.add_argument("--swap", action="store_true", help="microbatch swapping: PCIe time per decode step")
    si.add_argument("--fail-at", type=float, default=None, help="a stage dies at this time (s)")
    si.add_argument("--fail-stage", default="token:0", help="ROLE:INDEX (stage, prompt or token)")
    si.add_argument("--no-replicate", action="store_true", help="failure without replicas: restart from scratch")
    si.add_argument("--detect-s", type=float, default=2.0)
    si.add_argument("--restart-s", type=float, default=5.0, help="respawn and weight load")
    si.add_argument("--gpu-hour-cost", type=float, default=0.0, help="price of one machine-hour, for the cost column")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--json", default=None)
    si.add_argument("--chrome-trace", default=None, help="write a trace (chrome://tracing, Perfetto) of the last one")
    si.add_argument("--plot", default=None, help="draw the comparison to this PNG (needs matplotlib)")
    si.set_defaults(func=cmd_simulate)

    bw = bsub.add_parser("swap", help="same KV budget, pipeline without and with microbatch swapping")
    bw.add_argument("--model", default="random:opt-125m")
    bw.add_argument("--device", default="cpu")
    bw.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    bw.add_argument("--pp", type=_positive("--pp"), default=2)
    bw.add_argument("--kv-cache-blocks", type=_positive("--kv-cache-blocks"), default=64, help="KV budget per worker")
    bw.add_argument("--requests", type=_positive("--requests"), default=32)
    bw.add_argument("--prompt-len", type=_positive("--prompt-len"), default=64)
    bw.add_argument("--max-tokens", type=_positive("--max-tokens"), default=32)
    bw.add_argument("--resident-microbatches", type=_positive("--resident-microbatches"), default=1)
    bw.add_argument("--admission", default="reserve", choices=["greedy", "reserve"],
                    help="reserve (default): a request runs only when its whole prompt + max_tokens fits, so the "
                         "batch a budget holds is fixed; greedy: admit by prompt, preempt and recompute")
    bw.add_argument("--seed", type=int, default=0)
    bw.add_argument("--json", default=None)
    bw.set_defaults(func=cmd_bench_swap)

    bk = bsub.add_parser("kvstream", help="DéjàVuLib bandwidth per level and block size vs a contiguous copy")
    bk.add_argument("--device", default="cpu")
    bk.add_argument("--layers", type=_positive("--layers"), default=24)
    bk.add_argument("--kv-heads", type=_positive("--kv-heads"), default=32)
    bk.add_argument("--head-dim", type=_positive("--head-dim"), default=64)
    bk.add_argument("--block-sizes", default="1,4,16,64", help="tokens per block, comma-separated")
    bk.add_argument("--levels", default="0,1,3", help="streaming levels, comma-separated")
    bk.add_argument("--total-mib", type=_positive("--total-mib"), default=256, help="bytes moved per measurement")
    bk.add_argument("--repeat", type=_positive("--repeat"), default=5)
    bk.add_argument("--file-dir", default=None, help="where GPU->file chunks go (default: a temp dir)")
    bk.add_argument("--json", default=None)
    bk.set_defaults(func=cmd_bench_kvstream)

    bq = bsub.add_parser("kvpeer", help="DéjàVuLib GPU -> remote GPU (NCCL) vs a raw NCCL send of the same bytes")
    bq.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: two GPUs over NCCL; cpu: two processes over gloo")
    bq.add_argument("--layers", type=_positive("--layers"), default=32)
    bq.add_argument("--kv-heads", type=_positive("--kv-heads"), default=32)
    bq.add_argument("--head-dim", type=_positive("--head-dim"), default=128)
    bq.add_argument("--block-sizes", default="16,1", help="tokens per block, comma-separated")
    bq.add_argument("--piece-mib", default="8,32,128", help="bytes per pipelined NCCL send (MiB), comma-separated")
    bq.add_argument("--total-mib", type=_positive("--total-mib"), default=1024, help="bytes moved per measurement")
    bq.add_argument("--repeat", type=_positive("--repeat"), default=5)
    bq.add_argument("--high-priority-nccl", action="store_true",
                    help="NCCL on a high-priority stream (its kernels get SMs ahead of the copy kernels)")
    bq.add_argument("--nccl-init", default="eager", choices=["eager", "lazy"],
                    help="eager: the process group is bound to its GPU at init (P2P shares the group's "
                         "communicator); lazy: no device_id, NCCL makes a communicator per peer pair on first use")
    bq.add_argument("--trace-dir", default=None,
                    help="also record one streamed transfer per rank with torch.profiler (Chrome traces here)")
    bq.add_argument("--json", default=None)
    bq.set_defaults(func=cmd_bench_kvpeer)
    return parser


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def cmd_profile(args) -> int:
    if args.analytic:
        from .planner.analytic import analytic_profile

        prof = analytic_profile(args.model, args.analytic, args.gpus_per_machine)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(prof.to_json(), f, indent=1)
        else:
            print(json.dumps(prof.to_json(), indent=1))
        return 0
    from .planner.profile import run

    prof = run(args.model, args.device, args.dtype, _int_list(args.batches, "--batches"),
               _int_list(args.prompt_lens, "--prompt-lens"), _int_list(args.contexts, "--contexts"), args.workers,
               args.repeat, args.seed, not args.no_overhead, args.memory_gib, args.json, args.overhead_via)
    if not args.json:
        print(json.dumps(prof.to_json(), indent=1))
    return 0


def cmd_plan(args) -> int:
    from .planner.model import PlanError, Profile
    from .planner.plan import explicit_profile, plan

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


def cmd_simulate(args) -> int:
    import math

    from .bench.serve import load_trace, synthetic_lengths
    from .planner.model import PlanError, Profile
    from .planner.simulator import Deployment, SimOptions, simulate

    prof = Profile.load(args.profile)
    if not args.rate > 0:
        raise PlanError(f"--rate must be > 0, got {args.rate}")
    if args.trace:
        lengths = load_trace(args.trace)[: args.num_requests]
    elif args.synthetic:
        lengths = synthetic_lengths(args.num_requests, args.seed, args.max_prompt, args.max_output)
    else:
        pair = _int_list(args.lengths, "--lengths")
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
        from .planner.plot import plot

        plot(results, args.plot)
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    return run(args.model, args.device, args.max_tokens, args.pp, args.tp, args.prompt_stages, args.token_stages,
               replicate=not args.no_replicate, kill=None if args.kill_worker == "none" else args.kill_worker)


def cmd_bench_serve(args) -> int:
    from .bench.serve import main

    return main(args)


def cmd_bench_pipeline(args) -> int:
    from .bench.pipeline import run

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
    from .bench.swap import run

    r = run(args.model, args.device, args.pp, args.kv_cache_blocks, args.requests, args.prompt_len, args.max_tokens,
            args.resident_microbatches, args.seed, args.json, dtype=args.dtype, admission=args.admission)
    # fp32 outputs must match token for token; fp16/bf16 ones may differ where the two runs batch
    # differently (different GEMM shapes round differently), so there the comparison is reported only.
    exact = args.dtype == "float32" or (args.dtype == "auto" and args.device == "cpu")
    return 0 if r["same_tokens"] or not exact else 1


def cmd_bench_kvstream(args) -> int:
    from .bench.kvstream import run

    run(args.device, args.layers, args.kv_heads, args.head_dim, _int_list(args.block_sizes, "--block-sizes"),
        _int_list(args.levels, "--levels"), args.total_mib, args.repeat, args.file_dir, args.json)
    return 0


def cmd_bench_kvpeer(args) -> int:
    from .bench.kvpeer import run

    try:
        run(args.device, args.layers, args.kv_heads, args.head_dim, _int_list(args.block_sizes, "--block-sizes"),
            _int_list(args.piece_mib, "--piece-mib"), args.total_mib, args.repeat, args.json,
            high_priority=args.high_priority_nccl, nccl_init=args.nccl_init, trace_dir=args.trace_dir)
    except (RuntimeError, ValueError) as e:
        print(f"dejavu bench kvpeer: {e}", file=sys.stderr)
        return 1
    return 0


def _llm_from_args(args):
    from . import LLM

    return LLM(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, block_size=args.block_size,
               kv_cache_blocks=args.kv_cache_blocks, max_model_len=args.max_model_len, pp=args.pp, tp=args.tp,
               microbatch_size=args.microbatch_size, launcher=args.launcher, prompt_stages=args.prompt_stages,
               token_stages=args.token_stages, kv_receive_slots=args.kv_receive_slots, kv_transport=args.kv_transport,
               swap=args.swap, resident_microbatches=args.resident_microbatches, replicate=args.replicate,
               replicate_dir=args.replicate_dir, replicate_to=_replicate_to(args.replicate_to), recovery=args.recovery,
               heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
               spare_workers=args.spare_workers, cuda_graphs=args.cuda_graphs, admission=args.admission,
               overlap_steps=args.overlap_steps, **prefix_cache_kwargs(args))


def _replicate_to(v):
    return None if v is None else _int_list(v, "--replicate-to")


def apply_plan(args) -> None:
    """`--plan FILE`: the planner's deployment, unless the command line already sets one."""
    from .planner.plan import load_choice

    choice = load_choice(args.plan)
    if args.pp != 1 or args.prompt_stages or args.token_stages:
        raise ValueError("--plan chooses the deployment: drop --pp / --prompt-stages / --token-stages")
    args.pp = choice.get("pp", 1)
    args.prompt_stages = choice.get("prompt_stages", 0)
    args.token_stages = choice.get("token_stages", 0)
    args.microbatch_size = args.microbatch_size or choice.get("microbatch_size", 0)


def cmd_serve(args) -> int:
    from .serving.api import ApiServer
    from .serving.http_limits import HttpLimits

    if args.plan:
        apply_plan(args)

    llm = _llm_from_args(args)
    limits = HttpLimits(max_connections=args.max_connections or 0, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, max_body_bytes=args.max_body_bytes)
    server = ApiServer(llm, args.served_model_name or args.model, api_key=args.api_key, max_queue=args.max_queue,
                       limits=limits)
    if hasattr(llm.engine, "begin_stop"):
        async def stopping(app):  # SIGTERM / SIGINT: the workers' exits that follow are not failures
            llm.engine.begin_stop()
        server.app.on_shutdown.append(stopping)
    print(f"[dejavu] serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.serve_forever(args.host, args.port)
    return 0


def cmd_worker(args) -> int:
    from .parallel.auth import read_token
    from .serving.worker import run

    if args.token is not None:
        raise ValueError("--token is not accepted: a command line is readable by every user (/proc/PID/cmdline); "
                         "put the cluster token in DEJAVU_CLUSTER_TOKEN or a mode-600 file (--token-file PATH)")
    token = read_token(args.token_file)
    return run(args.controller, token, args.rank, standby=args.standby)


def cmd_bench_generate(args) -> int:
    from .bench.generate import run

    run(args.model, args.device, args.dtype, args.batch, args.prompt_len, args.max_tokens, args.seed, args.repeat,
        args.json)
    return 0


def cmd_bench_decode(args) -> int:
    from .bench.decode import run

    try:
        batches = [int(x) for x in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        print(f"dejavu bench decode: --batch must be comma-separated positive integers, got {args.batch!r}",
              file=sys.stderr)
        return 2
    from .bench.decode import REPLICATE_PATHS

    paths = tuple(x.strip() for x in args.replicate_path.split(",") if x.strip())
    if not paths or any(p not in REPLICATE_PATHS for p in paths):
        print(f"dejavu bench decode: --replicate-path takes a comma-separated list of {', '.join(REPLICATE_PATHS)}, "
              f"got {args.replicate_path!r}", file=sys.stderr)
        return 2
    run(args.model, args.device, args.dtype, batches, args.prompt_len, args.max_tokens, args.seed, args.hf, args.json,
        replicate=args.replicate, pairs=args.pairs, replicate_every=args.replicate_every,
        replica_holder=args.replica_holder, replicate_skip=args.replicate_skip, replicate_paths=paths,
        compare_pdl=args.compare_pdl, swap_stream=args.swap_stream, swap_driver=args.swap_driver)
    return 0


def cmd_generate(args) -> int:
    from . import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    llm = _llm_from_args(args)
    t1 = time.perf_counter()
    try:
        return _generate(args, llm, params, t0, t1)
    finally:
        llm.shutdown()


def _generate(args, llm, params, t0, t1) -> int:
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
               for p in args.prompt]
    outs = llm.generate(prompts, params)
    t2 = time.perf_counter()
    n = sum(len(o.token_ids) for o in outs)
    for prompt, o in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}))
        else:
            print(o.text if args.chat else prompt + o.text)
    print(f"[dejavu] {args.model}: loaded in {t1 - t0:.1f}s, {n} tokens in {t2 - t1:.2f}s "
          f"({n / max(t2 - t1, 1e-9):.1f} tok/s) on {llm.device}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    import signal

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM unwinds like Ctrl-C (finally blocks and finalizers run, so worker processes are stopped).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .engine.llm_engine import RequestError
    from .models.config import ModelError
    from .planner.model import PlanError

    try:
        return args.func(args)
    except (ModelError, RequestError, PlanError, ValueError) as e:
        print(f"dejavu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
