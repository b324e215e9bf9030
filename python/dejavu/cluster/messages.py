"""The control protocol between the controller and its workers: every message kind as a typed record.

On the wire a message is a msgpack map (wire.py frames it): "t" names the kind, the other keys are
the record's fields, "epoch" (the cluster epoch, on every message) included. `decode` checks the
kind, that no field is missing or unknown, and every field's type (nested records and lists
included) and raises MessageError naming the kind and the field; a message is never trusted as it
arrives. To add a kind: a record below with `@message("kind", "direction")`, a handler where it is
received, and a row in docs/serving.md.
"""
from __future__ import annotations

from typing import Any

from .records import CONTROLLER, KINDS, WORKER, Message, MessageError, decode, encode, message, record

__all__ = ["CONTROLLER", "KINDS", "WORKER", "Message", "MessageError", "decode", "encode", "message", "record"]


# ---------------------------------------------------------------------- nested records
@record
class SwapConfig:
    resident: int      # microbatch regions kept on the device
    host_blocks: int   # logical blocks of the pinned host copy


@record
class OffloadConfig:
    """Prefix caching's host and disk tiers of a pipeline worker (engine/prefix_tiers.py)."""
    host_blocks: int          # its host tier holds this many blocks (the controller's index too)
    disk_dir: str | None      # its own directory of block files (emptied at start)
    disk_blocks: int = 0


@record
class TierOps:
    """A step's prefix-tier copies, applied by every worker to its own layers before the step:
    evicted device blocks to the host tier, then host/disk hits into fresh blocks (names in hex)."""
    out_blocks: list[int]
    out_names: list[str]
    in_blocks: list[int]
    in_names: list[str]


@record
class ReplicateConfig:
    dir: str | None    # also keep replicas on this local disk
    prefix: str        # the deployment's file name prefix there
    replicas: int = 1  # holders per worker (--replicas): one sender each


@record
class SampleExtra:
    """Sampling beyond temperature / top-k / top-p (engine/sampler.py wire_fields, from_wire)."""
    pres: float        # presence penalty
    freq: float        # frequency penalty
    rep: float         # repetition penalty
    min_p: float
    bias: list[list[float]]  # logit_bias as [token id, bias] pairs
    lp: int | None     # top logprobs to return with each token (None: no logprobs)
    seen: list[int] | None = None  # the request's tokens so far, when a penalty needs them
    np: int | None = None          # ... of which this many are the prompt's


@record
class TokenLogprobs:
    """The sampled token's logprob and the top alternatives (with `SampleExtra.lp`)."""
    lp: float
    top_ids: list[int]
    top_lps: list[float]


def pack_tokens(entries: list) -> tuple[list[int], list[TokenLogprobs | None] | None]:
    """A sampler's reply (ids, or [id, [logprob, [[id, logprob], ...]]] entries) as (tokens,
    logprobs) fields; logprobs None when no entry has them."""
    ids = [e if isinstance(e, int) else e[0] for e in entries]
    if all(isinstance(e, int) for e in entries):
        return ids, None
    return ids, [None if isinstance(e, int) else
                 TokenLogprobs(lp=e[1][0], top_ids=[t for t, _ in e[1][1]], top_lps=[v for _, v in e[1][1]])
                 for e in entries]


def unpack_tokens(ids: list[int], logprobs: list[TokenLogprobs | None] | None) -> list:
    """The inverse of pack_tokens: entries as LLMEngine._append_tokens takes them."""
    if logprobs is None:
        return list(ids)
    if len(logprobs) != len(ids):
        raise MessageError(f"{len(logprobs)} logprob entries for {len(ids)} tokens")
    return [t if e is None else [t, [e.lp, [[i, v] for i, v in zip(e.top_ids, e.top_lps)]]]
            for t, e in zip(ids, logprobs)]


@record
class StepSeq:
    """One sequence's part of a step: its new tokens from `start`, their KV blocks, how to sample."""
    ids: list[int]
    start: int
    blocks: list[int]
    temp: float
    top_k: int
    top_p: float
    seed: int | None
    banned: list[int]
    key: str | None = None                # prefill (disaggregation): the KV stream's key
    dst_blocks: list[int] | None = None   # prefill: token-side blocks for the last len(dst_blocks) blocks
    x: SampleExtra | None = None          # penalties, min_p, logit_bias, logprobs


@record
class AdmitSeq:
    key: str
    blocks: list[int]
    ntok: int          # tokens whose KV arrived (positions from the first of `blocks`)


@record
class RestoreSeq:
    seq_id: int
    blocks: list[int]
    watermark: int     # leading tokens that must be in the replica


@record
class PreloadStage:
    rank: int          # the rank it would replace
    layers: list[int]  # [start, end)
    tp_rank: int
    local_rank: int    # the GPU of its host it would most likely run on
    kv_bytes: int = 0  # its KV cache (replicated deployments): a restore segment that large is kept ready


@record
class TokenWorker:
    worker: str
    host: str
    hostname: str
    kv_port: int
    ipc: dict | None   # CUDA IPC handle of its cache (same host, not swapping)
    num_blocks: int


# ---------------------------------------------------------------------- controller -> worker
@message("welcome", CONTROLLER)
class Welcome(Message):
    pass


@message("refused", CONTROLLER)
class Refused(Message):
    msg: str


@message("config", CONTROLLER)
class Config(Message):
    rank: int
    role: str                    # stage, prompt or token
    worker_name: str
    model: str
    dtype: str
    device: str
    seed: int
    tp: int
    pp: int
    layers: list[list[int]]      # [start, end) of each stage of its pipeline
    first_rank: int              # the rank of its pipeline's first worker
    num_blocks: int
    block_size: int
    master: str                  # torch.distributed rendezvous
    world: int
    backend: str
    timeout: float
    tp_groups: list[list[int]]
    kv_token: str
    pipes: bool                  # hidden states over StagePipes (fault tolerance)
    heartbeat_interval: float
    swap: SwapConfig | None = None
    replicate: ReplicateConfig | None = None
    kv_transport: str | None = None    # disaggregation: how prompt KV travels (kvstream.select)
    shm_prefix: str | None = None      # the deployment's /dev/shm segment names
    kv_host: str = "127.0.0.1"         # where its pipe, KV and replica listeners bind (its advertised address)
    local_rank: int = 0                # among the workers of its host: picks its GPU
    kv_pool_bytes: int = 256 << 20     # pinned staging pool of its KV streamer
    tp_store: int | None = None        # recovery with tp > 1: port of the controller's TP rendezvous store (at its address)
    rejoin: float = 0.0                # seconds it waits for a new controller when its own is lost (adopt.py)
    kv_offload: OffloadConfig | None = None  # prefix caching's host and disk tiers


@message("pipes", CONTROLLER)
class Pipes(Message):
    prev: int | None
    next: list[Any] | None       # [host, port, rank] of the next stage
    holders: list[list[Any]] | None = None  # [host, port] of each of its replica holders, first to last


@message("peers", CONTROLLER)
class Peers(Message):
    token_workers: list[TokenWorker]
    transfers: list[dict]        # kvstream.routing.Transfer fields


@message("step", CONTROLLER)
class Step(Message):
    mb: int
    id: int
    prefill: bool
    seqs: list[StepSeq]
    live: list[int] | None = None  # swapping: every block the microbatch holds
    tiers: TierOps | None = None   # prefix caching's host/disk tiers: copies before the step


@message("prefill", CONTROLLER)
class Prefill(Message):
    mb: int
    id: int
    seqs: list[StepSeq]
    tiers: TierOps | None = None   # the prompt side's host/disk tiers: copies before the prefill


@message("admit", CONTROLLER)
class Admit(Message):
    id: int
    delivered: list[str]         # token workers the prompt workers wrote into directly
    seqs: list[AdmitSeq]


@message("reset", CONTROLLER)
class Reset(Message):
    drop_keys: list[str]


@message("restore", CONTROLLER)
class Restore(Message):
    holder: list[Any]            # [host, port]
    blocks: list[int]
    seqs: list[RestoreSeq]
    replica: int = 0             # which of the worker's holders that is (its mirror's name)
    local: bool = False          # the holder is on this host: the blocks come through shared memory


@message("rereplicate", CONTROLLER)
class Rereplicate(Message):
    id: int
    blocks: list[int]
    replica: int = 0             # the holder (of the worker's, first to last) to re-seed


@message("replication", CONTROLLER)
class Replication(Message):
    on: bool
    every: int


@message("preload", CONTROLLER)
class Preload(Message):
    """To a standby: hold these stages' weights ready (most likely first) in `where` (host or device)."""
    model: str
    dtype: str
    device: str
    seed: int
    tp: int
    where: str
    stages: list[PreloadStage]


@message("shutdown", CONTROLLER)
class Shutdown(Message):
    pass


@message("fenced", CONTROLLER)
class Fenced(Message):
    """Its rank was given to another worker in `epoch` (it was cut off): stop at once, serve nothing."""
    rank: int


# ---------------------------------------------------------------------- worker -> controller
@message("hello", WORKER)
class Hello(Message):
    token: str
    rank: int | None = None
    standby: bool = False
    pid: int | None = None
    host: str = ""                 # host name (for people)
    addr: str = ""                 # the address its peers reach it at, and its listeners bind
    host_id: str = ""              # kvstream.select.host_id(): which workers share a host
    local_rank: int | None = None  # from its launcher's environment (None: counted by the controller)
    dist_port: int | None = None   # a free port at addr for torch.distributed's rendezvous (as rank 0)
    adopt: bool = False            # a live worker rejoining after its controller was lost (its epoch: `epoch`)


@message("ready", WORKER)
class Ready(Message):
    rank: int
    load_s: float
    pipe_port: int | None = None
    replica_port: int | None = None
    kv_port: int | None = None
    ipc: dict | None = None
    weights: str | None = None     # where its weights came from: host or device (a standby's preload), else None
    parts: dict | None = None      # seconds per start-up phase: weights, cache, roles


@message("error", WORKER)
class Error(Message):
    rank: int | None
    msg: str


@message("hb", WORKER)
class Heartbeat(Message):
    rank: int | None


@message("tokens", WORKER)
class Tokens(Message):
    mb: int
    id: int
    tokens: list[int]
    logprobs: list[TokenLogprobs | None] | None = None  # where asked (pack_tokens)
    step_s: float | None = None  # the sampling stage's previous decode step


@message("pushed", WORKER)
class Pushed(Message):
    rank: int
    mb: int
    id: int
    bytes: int
    exposed_s: float
    compute_s: float
    raw_s: float
    transports: list[str]
    delivered: list[str]
    tokens: list[int] | None = None
    logprobs: list[TokenLogprobs | None] | None = None


@message("admitted", WORKER)
class Admitted(Message):
    rank: int
    id: int
    bytes: int
    seconds: float


@message("reset_done", WORKER)
class ResetDone(Message):
    rank: int


@message("restored", WORKER)
class Restored(Message):
    rank: int
    bad: list[int]
    bytes: int
    seconds: float
    error: str | None = None
    parts: dict | None = None    # seconds per phase: segment, fetch (the holder's gather), verify, copy


@message("replicated", WORKER)
class Replicated(Message):
    rank: int
    id: int
    bytes: int
    error: str | None = None
    holder: int = 0              # which of the worker's holders applied it


@message("rereplicated", WORKER)
class Rereplicated(Message):
    rank: int
    id: int
    bytes: int
    error: str | None = None
    holder: int = 0


@message("swapstats", WORKER)
class SwapStats(Message):
    rank: int
    bytes_in: int
    bytes_out: int
    wait_s: float
    step_s: float


@message("step_failed", WORKER)
class StepFailed(Message):
    rank: int
    id: int
    msg: str
