"""models/tp.py: the sharding tables cover every family's layer linears, and the shards of a
tensor put back together are the full tensor (the end-to-end check against HF is
test_pipeline.py::test_tensor_parallel_matches_hf)."""
import pytest
import torch
from torch import nn

from dejavu.models import build_model, tp
from dejavu.models.config import ARCHS
from dejavu.models.registry import named_config

TINY = {"gpt2": "gpt2-tiny", "opt": "opt-tiny", "bloom": "bloom-tiny", "llama": "llama-tiny"}


def test_every_family_has_a_plan():
    assert set(tp.PLANS) == set(ARCHS) == set(TINY)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_layer_linear_is_column_or_row_parallel(arch):
    with torch.device("meta"):
        model = build_model(named_config(TINY[arch]))
    plan = tp.PLANS[arch]
    names = [n for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    assert names
    unplanned = [n for n in names if tp._matches(n, plan.column) is None and tp._matches(n, plan.row) is None]
    assert not unplanned, f"{arch}: linear layers in no sharding table: {unplanned}"


@pytest.mark.parametrize("arch", sorted(TINY))
def test_shards_cut_the_skeleton_to_the_sliced_tensors(arch):
    """Each shard's parameter shapes are those of the full tensors sliced for it, and the slices
    of all shards put back together are the full tensor."""
    cfg = named_config(TINY[arch])
    with torch.device("meta"):
        full = build_model(cfg)
    full_shapes = {k: v.shape for k, v in full.state_dict().items()}
    for rank in range(2):
        with torch.device("meta"):
            shard = build_model(cfg)
        tp.shard_skeleton(shard, rank, 2)
        for key, p in shard.state_dict().items():
            t = torch.randn(full_shapes[key])
            assert tp.shard_tensor(arch, key, t, rank, 2).shape == p.shape, key
    key = next(k for k in full_shapes if k.endswith(tp.PLANS[arch].column[0] + ".weight"))
    t = torch.randn(full_shapes[key])
    parts = tp.PLANS[arch].fused.get(tp._matches(key.rpartition(".")[0], tp.PLANS[arch].column), 1)
    pieces = [tp.shard_tensor(arch, key, t, r, 2).chunk(parts) for r in range(2)]
    assert torch.equal(torch.cat([torch.cat([pieces[r][i] for r in range(2)]) for i in range(parts)]), t)


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    from dejavu import ModelError

    with pytest.raises(ModelError, match="tensor parallelism 3 does not divide num_heads=4"):
        tp.check(named_config("llama-tiny"), 3)
