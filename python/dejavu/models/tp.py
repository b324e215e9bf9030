"""Tensor parallelism from outside the model files (as gpt-fast keeps tp.py apart from model.py).

A family's model file describes the math of the whole model. Here, per family and as data, is
which linear layers are column-parallel (output features split: q/k/v, MLP up) and which are
row-parallel (input features split: attention out, MLP down), and which module attributes count
heads. A shard is built in three steps, all from this module:
  shard_skeleton  the full model, built on the meta device, is cut to this shard's shapes
  shard_tensor    each full checkpoint (or random) tensor is sliced to this shard as it streams in
  parallelize     row-parallel layers sum their partial outputs over the TP group (all-reduce),
                  then add their (replicated) bias once
With tp = 1 none of this runs: the model is the plain one, and the CUDA fast paths see no change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, ModelError
from .layers import Linear


@dataclass(frozen=True)
class Plan:
    column: tuple[str, ...]                           # module name suffixes: output features split
    row: tuple[str, ...]                              # module name suffixes: input features split
    fused: dict[str, int] = field(default_factory=dict)  # column layers that are several matrices stacked
    heads: tuple[str, ...] = ("h", "kvh")             # module attributes that count heads (divided)
    per_head: tuple[str, ...] = ()                    # module tensors with one row per head (sliced)


PLANS = {
    "llama": Plan(column=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), row=("o_proj", "down_proj")),
    "opt": Plan(column=("q_proj", "k_proj", "v_proj", "fc1"), row=("out_proj", "fc2")),
    # query_key_value is laid out [heads, 3, head_dim]: a contiguous slice of rows is a slice of heads.
    "bloom": Plan(column=("query_key_value", "dense_h_to_4h"), row=("self_attention.dense", "dense_4h_to_h"),
                  per_head=("_slopes",)),
    # c_attn is three matrices (q, k, v) stacked: each is split, and this shard's parts stacked again.
    "gpt2": Plan(column=("attn.c_attn", "mlp.c_fc"), row=("attn.c_proj", "mlp.c_proj"), fused={"attn.c_attn": 3}),
}


def check(cfg: ModelConfig, size: int) -> None:
    """Raises ModelError unless `size` shards divide the heads, the KV heads and the MLP width."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(cfg, name) % size:
            raise ModelError(f"tensor parallelism {size} does not divide {name}={getattr(cfg, name)}")


def _matches(name: str, suffixes: tuple[str, ...]) -> str | None:
    return next((s for s in suffixes if name == s or name.endswith("." + s)), None)


def _split(module_name: str, param: str, plan: Plan) -> tuple[int, int] | None:
    """(dimension, fused parts) along which parameter `param` of module `module_name` is split,
    None when it is replicated."""
    col = _matches(module_name, plan.column)
    if col is not None:
        return 0, plan.fused.get(col, 1)
    if param == "weight" and _matches(module_name, plan.row) is not None:
        return 1, 1  # a row-parallel bias is replicated (added once, after the all-reduce)
    return None


def shard_tensor(arch: str, key: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This shard's part of the full tensor `t` under our key `key`."""
    if size == 1:
        return t
    module_name, _, param = key.rpartition(".")
    split = _split(module_name, param, PLANS[arch])
    if split is None:
        return t
    dim, parts = split
    return torch.cat([p.chunk(size, dim=dim)[rank] for p in t.chunk(parts, dim=dim)], dim=dim)


def shard_skeleton(model: nn.Module, rank: int, size: int) -> None:
    """Cut a full model built on the meta device to shard `rank` of `size`, in place."""
    if size == 1:
        return
    check(model.cfg, size)
    plan = PLANS[model.cfg.arch]
    for name, m in model.named_modules():
        for attr in plan.heads:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, getattr(m, attr) // size)
        for attr in plan.per_head:
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor):
                per = t.shape[0] // size
                setattr(m, attr, t[rank * per:(rank + 1) * per].clone())
        if not isinstance(m, nn.Linear):
            continue
        for param in ("weight", "bias"):
            p = getattr(m, param)
            split = _split(name, param, plan) if p is not None else None
            if split is None:
                continue
            shape = list(p.shape)
            shape[split[0]] //= size
            setattr(m, param, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device)))
        m.out_features, m.in_features = m.weight.shape


class TPBroken(RuntimeError):
    """A collective of the TP group failed (a shard died or left): the step is lost, the worker lives."""


class RowParallelLinear(Linear):
    """A row-parallel linear layer: its shard's partial output, summed over `tp_group`, then the
    replicated bias added once. With no group bound (left for a recovery) it raises TPBroken."""
    tp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.tp_group is None:
            raise TPBroken("the tensor-parallel group is down")
        y = F.linear(x, self.weight)
        try:
            dist.all_reduce(y, group=self.tp_group)
            err = None
        except RuntimeError as e:  # gloo: a peer's connection closed or timed out; NCCL: aborted
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if err is not None:  # raised outside the handler: no traceback keeps the group alive
            raise TPBroken(f"tensor-parallel all-reduce failed: {err}")
        return y if self.bias is None else y + self.bias


def parallelize(model: nn.Module, group) -> None:
    """Insert the all-reduce: every row-parallel layer of the shard sums over `group` (again, when
    a recovery re-forms the group; None unbinds them)."""
    plan = PLANS[model.cfg.arch]
    for name, m in model.named_modules():
        if type(m) in (Linear, RowParallelLinear) and _matches(name, plan.row) is not None:
            m.__class__ = RowParallelLinear  # the same parameters (fused views keep aliasing them)
            m.tp_group = group


def is_parallel(model: nn.Module) -> bool:
    return any(isinstance(m, RowParallelLinear) for m in model.modules())
