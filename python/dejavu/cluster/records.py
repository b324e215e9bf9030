"""Typed records on the control channel: the base Message (kind, epoch), the registry of kinds,
encode / decode, and the field checkers decode applies. The kinds themselves are in messages.py.
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
        if isinstance(v, list) and any(hasattr(x, "_fields") for x in v):
            v = [_to_wire(x) if hasattr(x, "_fields") else x for x in v]
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
