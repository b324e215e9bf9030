"""The decoder skeleton every family fills in: embeddings, a range of layers, final norm, LM head.

A model object holds a contiguous layer range [start, end) so that a pipeline stage is the same
class as a whole model: the first stage embeds, the last normalises and owns the LM head.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .. import kernels
from .config import ModelConfig
from .layers import AttnMetadata, Linear

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.*)$")


class PreNormBlock(nn.Module):
    """A pre-norm block, out = r + delta where the next block begins by normalising out. `step`
    returns (r, delta) unadded and takes the previous block's pending delta, so that add lands in
    the same kernel as this block's first norm (kernels.add_norm): one residual add + norm per
    block boundary instead of an add and a norm. Subclasses give `input_norm` and `body(r, x)`
    -> (r', delta), where x = input_norm(r), or, where they give `input_projection` (the
    FusedLinears that reads the norm's output), x = input_projection(input_norm(r)): then the add,
    the norm and the projection run as one kernel at decode sizes (FusedLinears.after_add_norm).
    `deferrable` False falls back to `forward`."""
    deferrable = True
    input_projection = None

    def step(self, h, pending, positions, meta, cache):
        norm, proj = self.input_norm, self.input_projection
        if pending is None:
            x = norm(h)
            if proj is not None:
                x = proj(x)
        elif proj is None:
            h, x = kernels.add_norm(h, pending, norm)
        else:
            h, x = proj.after_add_norm(h, pending, norm)
        return self.body(h, x, positions, meta, cache)

    def forward(self, h, positions, meta, cache):
        h, delta = self.step(h, None, positions, meta, cache)
        return h + delta


class DecoderLM(nn.Module):
    # Our global name of the input embedding, used to fill a tied LM head.
    embedding_key = "embed_tokens.weight"

    def __init__(self, cfg: ModelConfig, layer_range: tuple[int, int] | None = None):
        super().__init__()
        self.cfg = cfg
        start, end = layer_range or (0, cfg.num_layers)
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not inside [0, {cfg.num_layers})")
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == cfg.num_layers
        self.layers = nn.ModuleList([self.make_layer(i) for i in range(start, end)])

    # ------------------------------------------------------------------ family hooks
    def make_layer(self, index: int) -> nn.Module:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_parts(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(e, pending) with embed(...) == e + pending, rounded as torch adds them, or (embed(...), None).
        A family whose embedding ends in a sum (token + position) returns its two terms, so that
        the first pre-norm block adds them inside its first norm, as it adds a previous block's
        residual (PreNormBlock.step)."""
        return self.embed(input_ids, positions), None

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm that `final` is, where final(h) == final_norm(h) (None: final does more or
        other). The last pre-norm block's pending residual is then added inside that norm."""
        return None

    @staticmethod
    def hf_key(name: str) -> tuple[str | None, bool]:
        """Map a HF checkpoint key to (our global key or None to skip, transpose?)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_cache: torch.Tensor, on_layer=None) -> torch.Tensor:
        """x: token ids [N] on the first stage, hidden states [N, hidden] elsewhere.
        kv_cache: [num_local_layers, num_blocks, 2, block_size, kv_heads, head_dim].
        on_layer(i), if given, runs after local layer i has written its KV (layer-by-layer streaming)."""
        # pending: the last pre-norm block's residual (or the embedding's second term), added inside
        # the next block's first norm
        h, pending = self.embed_parts(x, positions) if self.is_first else (x, None)
        for i, layer in enumerate(self.layers):
            if getattr(layer, "deferrable", False):
                h, pending = layer.step(h, pending, positions, meta, kv_cache[i])
            else:
                if pending is not None:
                    h, pending = h + pending, None
                h = layer(h, positions, meta, kv_cache[i])
            if on_layer is not None:
                on_layer(i)
        if pending is not None:
            norm = self.final_norm if self.is_last else None
            if norm is not None:  # the residual add and the final norm: one kernel (kernels.add_norm)
                return kernels.add_norm(h, pending, norm)[1]
            h = h + pending
        return self.final(h) if self.is_last else h

    def fuse_projections(self) -> None:
        """Make the projections that read the same input (q/k/v, gate/up) views into one matrix
        each (layers.FusedLinears). Call before the weights are filled."""
        from .layers import FusedLinears

        for m in self.modules():
            for v in vars(m).values():
                if isinstance(v, FusedLinears):
                    v.fuse()

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits: the LM head's outputs in the model's dtype, converted (by the linear kernel
        itself at decode sizes)."""
        head = self.lm_head
        if type(head) is Linear:
            return kernels.linear(h, head.weight, head.bias, float_out=True)
        return head(h).float()

    def local_key(self, global_key: str) -> str | None:
        """Our global key -> the key in this layer range's state dict, None if not held here."""
        m = _LAYER_KEY.match(global_key)
        if m:
            i = int(m.group(1))
            return f"layers.{i - self.start}.{m.group(2)}" if self.start <= i < self.end else None
        return global_key if global_key in self._own_keys() else None

    def _own_keys(self) -> set[str]:
        if not hasattr(self, "_own_keys_cache"):
            self._own_keys_cache = {k for k in self.state_dict() if not k.startswith("layers.")}
        return self._own_keys_cache

    def tied_head_keys(self) -> dict[str, str]:
        """Global keys that must also fill the LM head when embeddings are tied."""
        if self.cfg.tie_word_embeddings and self.is_last:
            return {self.embedding_key: "lm_head.weight"}
        return {}
