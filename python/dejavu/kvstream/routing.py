"""Which KV goes where when two sides of a deployment are laid out differently.

A worker holds a contiguous layer range [start, end) and, under tensor parallelism of degree T,
the KV heads [r * H / T, (r + 1) * H / T) of its rank r. A prompt side of depth Dp and TP degree
Tp and a token side of depth Dt and TP degree Tt need not match: a prompt worker's layers may
belong to several token workers, and one KV head range may be split or merged across ranks.
`plan` intersects the two layouts and returns one Transfer per (sender, receiver) pair that
shares any layer and head; each Transfer says which local layers and local heads to pack on the
sender and where they land on the receiver.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLayout:
    worker: str
    layer_start: int
    layer_end: int
    tp_rank: int = 0
    tp_size: int = 1

    def heads(self, num_kv_heads: int) -> tuple[int, int]:
        if num_kv_heads % self.tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over TP degree {self.tp_size}")
        per = num_kv_heads // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per


@dataclass(frozen=True)
class Transfer:
    src: str
    dst: str
    layers: tuple[int, int]       # global layer range [a, b)
    src_layers: tuple[int, int]   # the same layers, local to the sender
    dst_layers: tuple[int, int]   # local to the receiver
    heads: tuple[int, int]        # global KV head range [h0, h1)
    src_heads: tuple[int, int]    # local to the sender's shard
    dst_heads: tuple[int, int]    # local to the receiver's shard

    @property
    def key(self) -> str:
        return f"L{self.layers[0]}-{self.layers[1]}.H{self.heads[0]}-{self.heads[1]}"


def split_layers(num_layers: int, depth: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges for `depth` stages, as even as possible (earlier stages get the extra)."""
    if not 1 <= depth <= num_layers:
        raise ValueError(f"pipeline depth {depth} must be between 1 and the {num_layers} layers")
    base, extra = divmod(num_layers, depth)
    out, start = [], 0
    for i in range(depth):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def layouts(prefix: str, num_layers: int, depth: int, tp: int) -> list[WorkerLayout]:
    return [WorkerLayout(f"{prefix}{s}.{r}", a, b, r, tp)
            for s, (a, b) in enumerate(split_layers(num_layers, depth)) for r in range(tp)]


def plan(senders: list[WorkerLayout], receivers: list[WorkerLayout], num_kv_heads: int) -> list[Transfer]:
    _check_cover(senders, num_kv_heads, "sending")
    _check_cover(receivers, num_kv_heads, "receiving")
    out = []
    for s in senders:
        sh = s.heads(num_kv_heads)
        for r in receivers:
            a, b = max(s.layer_start, r.layer_start), min(s.layer_end, r.layer_end)
            rh = r.heads(num_kv_heads)
            h0, h1 = max(sh[0], rh[0]), min(sh[1], rh[1])
            if a >= b or h0 >= h1:
                continue
            out.append(Transfer(s.worker, r.worker, (a, b), (a - s.layer_start, b - s.layer_start),
                                (a - r.layer_start, b - r.layer_start), (h0, h1), (h0 - sh[0], h1 - sh[0]),
                                (h0 - rh[0], h1 - rh[0])))
    return out


def _check_cover(side: list[WorkerLayout], num_kv_heads: int, name: str) -> None:
    """Each (layer, head) must be held by exactly one worker of a side."""
    seen: dict[tuple[int, int], str] = {}
    for w in side:
        h0, h1 = w.heads(num_kv_heads)
        for layer in range(w.layer_start, w.layer_end):
            for h in range(h0, h1):
                if (layer, h) in seen:
                    raise ValueError(f"{name} side: layer {layer} head {h} held by both {seen[(layer, h)]} and {w.worker}")
                seen[(layer, h)] = w.worker
    layers = {k[0] for k in seen}
    if layers and (min(layers) != 0 or len(layers) != max(layers) + 1):
        raise ValueError(f"{name} side: layers are not a contiguous range from 0")
    heads_per_layer = {}
    for (layer, h) in seen:
        heads_per_layer[layer] = heads_per_layer.get(layer, 0) + 1
    if any(n != num_kv_heads for n in heads_per_layer.values()):
        raise ValueError(f"{name} side: some layer is missing KV heads")
