"""Every DEJAVU_* environment variable: its type, default and meaning, in one place.

Settings change what a deployment does; baselines switch a fast path off so a benchmark can
measure what it saves (`dejavu bench ...` and benchmarks/ set them). The C++ kernels read theirs
through csrc/kernels/env.h. tests/test_envs.py checks that every name the code reads is here, and
docs/envs.md is this table for readers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    type: str       # bool (0/1), int, float, str, choice
    default: str
    meaning: str
    kind: str = "setting"  # setting | baseline | internal


_VARS = [
    # -- settings
    EnvVar("DEJAVU_CLUSTER_TOKEN", "str", "(random per deployment)",
           "the shared secret of a deployment's internal channels; workers read it here, never from argv"),
    EnvVar("DEJAVU_API_KEY", "str", "", "the API key `dejavu serve` requires (and `bench serve` sends), kept off argv"),
    EnvVar("DEJAVU_STOP_GRACE", "float", "3", "seconds a worker keeps serving after SIGTERM/SIGINT before it exits "
           "(the controller's shutdown comes first)"),
    EnvVar("DEJAVU_CUDA", "choice", "auto", "build time (pip install .): auto, on or off, whether CUDA sources build"),
    EnvVar("DEJAVU_CACHE_DIR", "str", "~/.cache/dejavu", "where converted GGUF tokenizers are kept"),
    EnvVar("DEJAVU_TOKENIZER_CACHE", "bool", "1", "0: convert a GGUF tokenizer every time, keep no cache"),
    EnvVar("DEJAVU_WORKER_THREADS", "int", "0", "torch threads per worker (0: cores / workers on a CPU, 1 on a GPU)"),
    EnvVar("DEJAVU_CONNECT_WAIT", "float", "60", "seconds a worker retries reaching its controller (one started by "
           "hand may come up first)"),
    EnvVar("DEJAVU_SERVE_WAIT", "int", "300", "seconds the example and benchmark scripts wait for their "
           "`dejavu serve` to answer /health"),
    EnvVar("DEJAVU_SWITCH_INTERVAL", "float", "0.0005", "Python's thread switch interval in workers and bench decode"),
    EnvVar("DEJAVU_REPLICA_RING", "bool", "1", "0: replicate decode steps by a gather instead of the pinned ring"),
    EnvVar("DEJAVU_REPLICA_RING_MIB", "float", "512", "cap on the replication ring's pinned host memory"),
    EnvVar("DEJAVU_REPLICA_LAG_S", "float", "(sender's LAG_S)", "how long the replica sender lets steps gather "
           "before it reads them back; 0 sends at once"),
    # -- baselines: a fast path switched off, for benchmarks and bisecting
    EnvVar("DEJAVU_ATTENTION", "choice", "kernel", "torch: the torch attention instead of our kernels", "baseline"),
    EnvVar("DEJAVU_ATTENTION_FUSE", "bool", "1", "0: KV write and partition combine as kernels of their own",
           "baseline"),
    EnvVar("DEJAVU_ATTENTION_KERNEL", "choice", "(by shape)", "rows or warps: force one decode attention kernel",
           "baseline"),
    EnvVar("DEJAVU_ATTENTION_WARPS", "choice", "8", "4: the warps attention kernel with 4 warps", "baseline"),
    EnvVar("DEJAVU_KV_STORE", "choice", "vector", "scalar: store new K/V element by element", "baseline"),
    EnvVar("DEJAVU_LINEAR", "choice", "kernel", "torch: F.linear instead of the small-batch linear kernel",
           "baseline"),
    EnvVar("DEJAVU_LINEAR_SPLIT", "int", "4", "cap on the linear kernel's split-K factor", "baseline"),
    EnvVar("DEJAVU_LINEAR_ONE_WAVE", "bool", "1", "0: always the widest linear grid, not one wave", "baseline"),
    EnvVar("DEJAVU_NORM", "choice", "kernel", "torch: residual add and norm as torch ops", "baseline"),
    EnvVar("DEJAVU_NORM_LINEAR", "bool", "1", "0: add+norm and the next linear as two kernels", "baseline"),
    EnvVar("DEJAVU_NORM_BLOCKS_PER_SM", "int", "0", "cap on the norm-prologue linear kernel's blocks per SM (0: none)",
           "baseline"),
    EnvVar("DEJAVU_PDL", "bool", "1", "0: no programmatic dependent launch of the decode kernels", "baseline"),
    EnvVar("DEJAVU_GREEDY", "choice", "kernel", "torch: argmax and a copy instead of the greedy step-end kernel",
           "baseline"),
    EnvVar("DEJAVU_GREEDY_SPLIT", "bool", "1", "0: the greedy step-end kernel in one block per row", "baseline"),
    EnvVar("DEJAVU_GRAPH_INPUT_COPY", "choice", "kernel", "memcpy: graph inputs by cudaMemcpy, not a kernel",
           "baseline"),
    EnvVar("DEJAVU_RING_ADVANCE", "bool", "1", "0: a replicated graph step always copies its inputs", "baseline"),
    EnvVar("DEJAVU_OVERLAP", "bool", "1", "0: decode steps wait for the previous step's tokens", "baseline"),
    EnvVar("DEJAVU_SWAP_COPY", "choice", "dma", "kernel: swap blocks with DéjàVuLib's copy kernel, not DMA",
           "baseline"),
    EnvVar("DEJAVU_COPY_BLOCKS", "int", "0", "thread blocks of DéjàVuLib's span copy kernel (0: by device)",
           "baseline"),
    EnvVar("DEJAVU_KV_STREAM_PRIORITY", "choice", "high", "normal: KV streams at the default stream priority",
           "baseline"),
    EnvVar("DEJAVU_PIPE_SYNC", "bool", "0", "1: wait for each hidden-state send between stages", "baseline"),
    # -- internal: set by DéjàVu for its own processes
    EnvVar("DEJAVU_PARENT_PID", "int", "", "a local worker exits when this process does", "internal"),
    EnvVar("DEJAVU_FRONTEND", "str", "", "HOST:PORT of the `dejavu serve` front-end its controller process dials",
           "internal"),
    EnvVar("DEJAVU_FRONTEND_PID", "int", "", "a split deployment's front-end: its workers outlive their controller "
           "(they rejoin the next one) but not this process, which also owns its /dev/shm segments", "internal"),
    EnvVar("DEJAVU_STANDBY_DEVICE", "choice", "", "a standby worker's device (cuda: warm the CUDA context)",
           "internal"),
]
VARS: dict[str, EnvVar] = {v.name: v for v in _VARS}


def markdown_table() -> str:
    rows = ["| variable | kind | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.kind} | {v.type} | {v.default} | {v.meaning} |" for v in _VARS]
    return "\n".join(rows)
