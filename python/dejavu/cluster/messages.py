"""The control protocol between the controller and its workers: every message kind as a typed record.

On the wire a message is a msgpack map (wire.py frames it): "t" names the kind, the other keys are
the record's fields, "epoch" (the cluster epoch, on every message) included. `decode` checks the
kind, that no field is missing or unknown, and every field's type (nested records and lists
included) and raises MessageError naming the kind and the field; a message is never trusted as it
arrives. To add a kind: a record below with `@message("kind", "direction")`, a handler where it is
received, and a row in docs/serving.md.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

import msgpack

from ..parallel.wire import ProtocolError

CONTROLLER, WORKER = "controller -> worker", "worker -> controller"


class MessageError(ProtocolError):
    """A control message of an unknown kind, or whose fields are missing, unknown or mistyped."""


@dataclasses.dataclass(kw_only=True)
class Message:
    t: ClassVar[str]
    direction: ClassVar[str]
    epoch: int = 0  # the cluster epoch the sender is in (recoveries advance it)


KINDS: dict[str, type[Message]] = {}


def message(kind: str, direction: str):
    """Register a record class as the message kind `kind`."""
    def wrap(cls):
        cls = dataclasses.dataclass(kw_only=True)(cls)
        cls.t, cls.direction = kind, direction
        KINDS[kind] = cls
        _compile(cls)
        return cls
    return wrap


def record(cls):
    """A record nested inside messages (no kind of its own)."""
    cls = dataclasses.dataclass(kw_only=True)(cls)
    _compile(cls)
    return cls


# ---------------------------------------------------------------------- encode / decode
def encode(msg: Message) -> bytes:
    if not isinstance(msg, Message):
        raise TypeError(f"not a control message: {type(msg).__name__}")
    body = _to_wire(msg)
    body["t"] = msg.t
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes | dict) -> Message:
    """A message from a frame's bytes (or an already unpacked map)."""
    if not isinstance(data, dict):
        try:
            data = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # noqa: BLE001 - any decode failure is the peer's protocol error
            raise MessageError(f"undecodable control message: {e}") from None
    if not isinstance(data, dict):
        raise MessageError(f"a control message must be a map, got {type(data).__name__}")
    kind = data.get("t")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown control message kind {kind!r}")
    return _build(cls, data, kind, skip="t")


def _to_wire(rec) -> dict:
    out = {}
    for name in rec._fields:
        v = getattr(rec, name)
        if isinstance(v, list) and v and hasattr(v[0], "_fields"):
            v = [_to_wire(x) for x in v]
        elif hasattr(v, "_fields"):
            v = _to_wire(v)
        out[name] = v
    return out


def _build(cls, data: dict, where: str, skip: str | None = None):
    checks = cls._checks
    extra = [k for k in data if k not in checks and k != skip]
    if extra:
        raise MessageError(f"{where}: unknown field {extra[0]!r}")
    args = {}
    for name, (check, required) in checks.items():
        if name not in data:
            if required:
                raise MessageError(f"{where}: missing field {name!r}")
            continue
        args[name] = check(data[name], f"{where}: field {name!r}")
    return cls(**args)


# ---------------------------------------------------------------------- field checkers
def _compile(cls) -> None:
    hints = typing.get_type_hints(cls)
    cls._fields = tuple(f.name for f in dataclasses.fields(cls))
    cls._checks = {f.name: (_checker(hints[f.name]), f.default is dataclasses.MISSING and
                            f.default_factory is dataclasses.MISSING) for f in dataclasses.fields(cls)}


def _fail(where: str, want: str, v) -> typing.NoReturn:
    raise MessageError(f"{where} must be {want}, got {type(v).__name__} {v!r:.60}")


def _checker(tp):
    if tp is Any:
        return lambda v, where: v
    if tp is bool:
        def check_bool(v, where):
            return v if isinstance(v, bool) else _fail(where, "a boolean", v)
        return check_bool
    if tp is int:
        def check_int(v, where):
            return v if isinstance(v, int) and not isinstance(v, bool) else _fail(where, "an integer", v)
        return check_int
    if tp is float:
        def check_float(v, where):
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _fail(where, "a number", v)
        return check_float
    if tp in (str, dict):
        want = "a string" if tp is str else "a map"

        def check_plain(v, where):
            return v if isinstance(v, tp) else _fail(where, want, v)
        return check_plain
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = _checker(next(a for a in args if a is not type(None)))
        return lambda v, where: None if v is None else inner(v, where)
    if origin is list:
        item = _checker(args[0])

        def check_list(v, where):
            if not isinstance(v, list):
                _fail(where, "a list", v)
            return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return check_list
    if isinstance(tp, type) and hasattr(tp, "_checks"):
        def check_record(v, where):
            return _build(tp, v, where) if isinstance(v, dict) else _fail(where, f"a {tp.__name__} map", v)
        return check_record
    raise TypeError(f"control messages cannot carry {tp!r}")


# ---------------------------------------------------------------------- nested records
@record
class SwapConfig:
    resident: int      # microbatch regions kept on the device
    host_blocks: int   # logical blocks of the pinned host copy


@record
class ReplicateConfig:
    dir: str | None    # also keep replicas on this local disk
    prefix: str        # the deployment's file name prefix there


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
    dst_blocks: list[int] | None = None   # prefill: the token side's blocks for the request


@record
class AdmitSeq:
    key: str
    blocks: list[int]
    ntok: int          # tokens whose KV arrived


@record
class RestoreSeq:
    seq_id: int
    blocks: list[int]
    watermark: int     # leading tokens that must be in the replica


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
    kv_host: str = "127.0.0.1"         # where its KV and replica listeners bind
    kv_pool_bytes: int = 256 << 20     # pinned staging pool of its KV streamer


@message("pipes", CONTROLLER)
class Pipes(Message):
    prev: int | None
    next: list[Any] | None       # [host, port, rank] of the next stage
    holder: list[Any] | None = None  # [host, port] of its replica holder


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


@message("prefill", CONTROLLER)
class Prefill(Message):
    mb: int
    id: int
    seqs: list[StepSeq]


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


@message("rereplicate", CONTROLLER)
class Rereplicate(Message):
    id: int
    blocks: list[int]


@message("replication", CONTROLLER)
class Replication(Message):
    on: bool
    every: int


@message("shutdown", CONTROLLER)
class Shutdown(Message):
    pass


# ---------------------------------------------------------------------- worker -> controller
@message("hello", WORKER)
class Hello(Message):
    token: str
    rank: int | None = None
    standby: bool = False
    pid: int | None = None
    host: str = ""


@message("ready", WORKER)
class Ready(Message):
    rank: int
    load_s: float
    pipe_port: int | None = None
    replica_port: int | None = None
    kv_port: int | None = None
    ipc: dict | None = None


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


@message("replicated", WORKER)
class Replicated(Message):
    rank: int
    id: int
    bytes: int
    error: str | None = None


@message("rereplicated", WORKER)
class Rereplicated(Message):
    rank: int
    id: int
    bytes: int
    error: str | None = None


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
