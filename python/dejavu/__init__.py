"""DéjàVu: KV-cache streaming for fast, fault-tolerant generative LLM serving.

    from dejavu import LLM, SamplingParams
    llm = LLM(model="smollm2")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    print(out[0].text)
"""
from .config import Config, ConfigError
from .engine.llm_engine import RequestError
from .llm import LLM, CompletionOutput, RequestOutput
from .models.config import ModelError
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Config", "ConfigError", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestError",
           "ModelError", "__version__"]
