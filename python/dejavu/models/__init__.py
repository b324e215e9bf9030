"""Model families, configs and loading."""
from .config import ModelConfig, ModelError
from .bloom import Bloom
from .gpt2 import GPT2
from .llama import Llama
from .opt import OPT

FAMILIES = {"gpt2": GPT2, "opt": OPT, "bloom": Bloom, "llama": Llama}


def build_model(cfg: ModelConfig, layer_range=None):
    """The nn.Module for cfg's family (parameters not yet materialised if built under meta)."""
    return FAMILIES[cfg.arch](cfg, layer_range)


__all__ = ["ModelConfig", "ModelError", "FAMILIES", "build_model"]
