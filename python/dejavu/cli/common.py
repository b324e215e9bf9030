"""What several subcommands share: the engine and deployment flags, argument types, building an LLM."""
from __future__ import annotations

import argparse

from .prefix_cache import add_prefix_cache_args, prefix_cache_kwargs


DEFAULT_MODEL = "smollm2"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, engine and deployment flags of `generate` and `serve` (the LLM() arguments)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF directory, hub id in the local HF cache (org/name), .gguf file, 'smollm2', or "
                        "random:<name> (default: smollm2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (auto: fp32 on CPU; on CUDA the "
                   "checkpoint's bf16/fp16, else fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed for random: weights and for sampling")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv-cache-blocks", type=int, default=0, help="KV-cache blocks (default: from memory)")
    p.add_argument("--max-model-len", type=int, default=0, help="cap on prompt + output tokens (0: the model's)")
    p.add_argument("--pp", "-pp", "--pipeline-parallel-size", dest="pp", type=int, default=1,
                   help="pipeline depth: worker processes, one stage each (1-8)")
    p.add_argument("--tp", "-tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel degree: worker processes per stage (1-8)")
    p.add_argument("--max-num-seqs", type=positive("--max-num-seqs"), default=64, help="requests in a batch at once")
    p.add_argument("--max-num-batched-tokens", type=positive("--max-num-batched-tokens"), default=8192,
                   help="prompt tokens one prefill step admits")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.0,
                   help="CUDA, single process: fraction of the GPU's memory the engine may fill, the KV cache "
                        "taking what the weights leave (0: the KV cache takes 0.4 of the memory free after "
                        "loading; refused on the CPU, where --kv-cache-blocks sizes it)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory other than the model's")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, used instead of the tokenizer's")
    add_prefix_cache_args(p)
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
                   help="how pipeline workers start: local child processes (default), mpirun, or external "
                        "(`dejavu worker --controller HOST:PORT` started on each host; docs/deploy.md)")
    p.add_argument("--cluster-address", default=None, metavar="HOST:PORT",
                   help="where the controller listens for its workers (default: 127.0.0.1, a free port); "
                        "another host's workers dial it")
    p.add_argument("--hostfile", default=None, metavar="FILE",
                   help="with --launcher mpirun: the Open MPI hostfile of the hosts to start workers on")
    p.add_argument("--replicate", action="store_true",
                   help="stream every token's KV to another worker's host memory; after a failure requests resume "
                        "from their last replicated token (pipeline or token stages >= 2)")
    p.add_argument("--replicate-dir", default=None,
                   help="with --replicate: the replica holders also keep their replicas in files under DIR")
    p.add_argument("--replicas", type=positive("--replicas"), default=1,
                   help="with --replicate: holders per worker, each another stage (on other hosts, and on hosts "
                        "different from each other, where they exist); a worker and all but one of its holders "
                        "may die together (default 1)")
    p.add_argument("--replicate-to", default=None,
                   help="with --replicate: comma-separated holder stage of each stage (default: the next, in a ring)")
    p.add_argument("--recovery", default="auto", choices=["auto", "respawn", "standby", "wait", "off"],
                   help="when a worker dies: respawn it here, use a `dejavu worker --standby`, wait for an "
                        "operator-started one, or stop (auto: respawn; wait with --launcher external)")
    p.add_argument("--spare-workers", type=int, default=1,
                   help="with --recovery respawn: warm spare processes kept started and registered (0: start one "
                        "only after a failure)")
    p.add_argument("--standby-weights", default="host", choices=["host", "device", "off"],
                   help="standbys and warm spares hold the weights of the stages they would most likely replace "
                        "in (pinned) host memory or in device memory, at most half of what is free there, so a "
                        "takeover copies them instead of loading the checkpoint (off: load at takeover)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly instead of replaying CUDA graphs (single process on CUDA)")
    p.add_argument("--no-overlap", dest="overlap_steps", action="store_false",
                   help="each greedy decode step waits for its tokens before the next is queued (single process; "
                        "by default the next step is queued first)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between worker heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="a worker silent this long is declared dead (connection loss is noticed at once)")



def positive(name):
    """An argparse type: an integer > 0, named `name` in its error."""
    def parse(v):
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {x}")
        return x
    return parse


def positive_float(name):
    """An argparse type: a finite number > 0, named `name` in its error."""
    def parse(v):
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {v}")
        return x
    return parse


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def config_from_args(args):
    """The deployment the engine flags describe (validated when the LLM starts)."""
    from ..config import Config

    return Config.from_kwargs(
        model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, block_size=args.block_size,
        kv_cache_blocks=args.kv_cache_blocks, max_model_len=args.max_model_len, pp=args.pp, tp=args.tp,
        microbatch_size=args.microbatch_size, launcher=args.launcher, cluster_address=args.cluster_address,
        hostfile=args.hostfile, prompt_stages=args.prompt_stages,
        token_stages=args.token_stages, kv_receive_slots=args.kv_receive_slots, kv_transport=args.kv_transport,
        swap=args.swap, resident_microbatches=args.resident_microbatches, replicate=args.replicate,
        replicate_dir=args.replicate_dir, replicate_to=_replicate_to(args.replicate_to), replicas=args.replicas,
        recovery=args.recovery,
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
        spare_workers=args.spare_workers, standby_weights=args.standby_weights, cuda_graphs=args.cuda_graphs,
        admission=args.admission,
        overlap_steps=args.overlap_steps, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        tokenizer=args.tokenizer, chat_template=args.chat_template, **prefix_cache_kwargs(args))


def check_launcher(args) -> None:
    """--launcher mpirun needs mpirun on PATH: said in one line, before any model loads."""
    import shutil

    if getattr(args, "launcher", None) == "mpirun" and shutil.which("mpirun") is None:
        raise ValueError("--launcher mpirun: no mpirun on PATH (pip install 'dejavu-serve[mpi]', or load your "
                         "MPI module)")


def check_device(device: str, flag: str = "--device") -> None:
    """A CUDA device asked for on a machine without one: said in one line, before any slow work."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: torch sees no CUDA device on this machine (use --device cpu)")


def llm_from_args(args):
    from .. import LLM

    check_launcher(args)
    return LLM.from_config(config_from_args(args))


def _replicate_to(v):
    return None if v is None else int_list(v, "--replicate-to")
