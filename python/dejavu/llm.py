"""`LLM`: the offline Python API (`from dejavu import LLM, SamplingParams`)."""
from __future__ import annotations

import gc
import logging
import sys
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Sequence as Seq

import torch

from .chat_template import tokenizer_for
from .config import Config, ConfigError
from .engine.llm_engine import LLMEngine, RequestError
from .models.loader import load_model, model_identity, parse_dtype, resolve
from .sampling_params import SamplingParams

log = logging.getLogger("dejavu")

DEFAULT_KV_CACHE_MEMORY_CPU = 512 << 20
DEFAULT_KV_CACHE_FRACTION_CUDA = 0.4  # of the device memory free after the weights are loaded


@dataclass
class CompletionOutput:
    """One choice of a request (vLLM's shape). logprobs: per token, {token id: logprob} of the
    sampled token and the top alternatives (raw model distribution), when SamplingParams.logprobs is set."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(lp[t] for lp, t in zip(self.logprobs, self.token_ids))


@dataclass
class RequestOutput:
    """A finished request as vLLM returns it: `outputs` has its n choices; `.text`, `.token_ids`
    and `.finish_reason` are those of the first."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[dict[int, float] | None] | None = None  # SamplingParams.prompt_logprobs

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def _as_dicts(ids: list[int], entries: list) -> list[dict[int, float] | None]:
    """Engine logprob entries as vLLM's {token id: logprob}: the token's own, then its alternatives."""
    return [None if e is None else {t: e[0], **{a: v for a, v in e[1] if a != t}} for t, e in zip(ids, entries)]


def _choice(i: int, s) -> CompletionOutput:
    lps = _as_dicts(s.output_ids, s.logprobs) if s.params.logprobs is not None else None
    return CompletionOutput(i, s.text, s.output_ids, s.finish_reason, lps)


def cuda_kv_budget(device: torch.device, utilization: float) -> int:
    """KV-cache bytes on a CUDA device once the weights are loaded: a fraction of what is free, or
    with `utilization` (vLLM's --gpu-memory-utilization) what keeps the whole device at most that full."""
    free, total = torch.cuda.mem_get_info(device)
    if not utilization:
        return int(free * DEFAULT_KV_CACHE_FRACTION_CUDA)
    budget = int(free - (1 - utilization) * total)
    if budget <= 0:
        raise ConfigError("gpu_memory_utilization", f"{utilization:g} of {total / 2**30:.1f} GiB leaves no room for "
                                                    f"the KV cache: {(total - free) / 2**30:.1f} GiB is already in use")
    return budget


def parse_device(device: str | torch.device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


class LLM:
    """Load a model and generate: one process, or a pipeline (pp, tp, microbatch_size, swap with
    resident_microbatches), or prompt-token disaggregation (prompt_stages, token_stages).
    Pipelines survive worker failures (`recovery`: respawn, standby, wait or off); with `replicate`
    every token's KV is also kept in another worker's host memory (and `replicate_dir` on disk), so
    requests resume from their last replicated token instead of starting over."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
                 block_size: int = 16, kv_cache_blocks: int = 0, kv_cache_memory: int = 0,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, max_model_len: int = 0,
                 tp: int = 1, pp: int = 1, microbatch_size: int = 0, prompt_stages: int = 0,
                 token_stages: int = 0, swap: bool = False, replicate: bool = False,
                 launcher: str = "local", layer_split: list[tuple[int, int]] | None = None,
                 worker_timeout: float = 300.0, log_dir: str | None = None, kv_receive_slots: int = 8,
                 kv_transport: str = "auto", resident_microbatches: int = 2, replicate_dir: str | None = None,
                 replicate_to: list[int] | None = None, recovery: str = "auto", heartbeat_interval: float = 0.5,
                 heartbeat_timeout: float = 2.0, spare_workers: int = 1, replicas: int = 1,
                 standby_weights: str = "host",
                 cuda_graphs: bool = True, admission: str = "greedy", overlap_steps: bool = True,
                 enable_prefix_caching: bool = True, kv_offload_gib: float = 0.0, kv_offload_dir: str | None = None,
                 kv_offload_dir_gib: float = 8.0, cluster_address: str | None = None, hostfile: str | None = None,
                 gpu_memory_utilization: float = 0.0, tokenizer: str | None = None, chat_template: str | None = None):
        # Every argument is a field of the configuration records (config.py), validated there.
        self._start(Config.from_kwargs(**{k: v for k, v in locals().items() if k != "self"}))

    @classmethod
    def from_config(cls, config: Config) -> LLM:
        """An LLM from configuration records (what `dejavu serve` and `generate` build)."""
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: Config) -> None:
        config.validate()
        self.deployment = config
        par, dis, sw, rep = config.parallel, config.disagg, config.swap, config.replication
        seed = config.seed
        self.device = parse_device(config.device)
        self.source = resolve(config.model)
        self.dtype = parse_dtype(config.dtype, self.device, self.source.dtype)
        if config.engine.gpu_memory_utilization and self.device.type != "cuda":
            raise ConfigError("gpu_memory_utilization", "is a fraction of a CUDA device's memory; on the CPU size "
                                                        "the KV cache with --kv-cache-blocks")
        self.tokenizer = tokenizer_for(self.source, config)
        self.config = self.source.config
        engine_cfg = replace(config.engine)  # the defaults below fill a copy, not the caller's record
        if not engine_cfg.num_blocks and not engine_cfg.kv_cache_memory:
            engine_cfg.kv_cache_memory = DEFAULT_KV_CACHE_MEMORY_CPU if self.device.type == "cpu" else 0
        if config.distributed:
            from .cluster.controller import Controller
            from .cluster.policies.disagg import DisaggPolicy
            from .cluster.policies.pipeline import PipelinePolicy

            if not engine_cfg.num_blocks and not engine_cfg.kv_cache_memory:
                engine_cfg.kv_cache_memory = 4 << 30  # per stage, on the GPU
            self.model = None
            # the placement policy: prompt-token disaggregation, or the FT pipeline
            policy = (DisaggPolicy(dis.prompt_stages, dis.token_stages, par.microbatch_size, dis.kv_receive_slots,
                                   dis.kv_transport) if dis.enabled
                      else PipelinePolicy(par.pp, par.layer_split, par.microbatch_size))
            self.engine = Controller(self.source, self.tokenizer, engine_cfg, self.device, self.dtype, seed, policy,
                                     par.tp, par.launcher, par.worker_timeout, par.hostfile, par.log_dir, swap=sw.swap,
                                     resident_microbatches=sw.resident_microbatches,
                                     cluster_address=par.cluster_address, **asdict(rep))
            self._finalizer = weakref.finalize(self, self.engine.shutdown)
            return
        try:
            self.model = load_model(self.source, self.device, self.dtype, seed=seed)
        except BaseException:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        self.config = self.model.cfg
        if not engine_cfg.num_blocks and not engine_cfg.kv_cache_memory:
            engine_cfg.kv_cache_memory = cuda_kv_budget(self.device, engine_cfg.gpu_memory_utilization)
        self.engine = LLMEngine(self.model, self.tokenizer, engine_cfg, self.device, self.dtype,
                                model_id=model_identity(self.source, seed))

    def shutdown(self) -> None:
        """Stop worker processes (pipeline modes); a no-op for the single-process engine."""
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs in the order of the prompts.
        use_tqdm: a progress bar of finished prompts on stderr (vLLM's keyword; off by default here)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        seqs, groups = [], []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                groups.append(len(seqs))
                for c in sp.choices():  # n choices: one engine request each
                    seqs.append(self.engine.add_request(p, c, request_id=str(i)))
            self._run(seqs, groups, use_tqdm)
            failed = next((s for s in seqs if s.finish_reason == "error"), None)
            if failed is not None:
                raise RuntimeError(f"request {failed.request_id} failed: {failed.error}")
        except BaseException:
            for s in seqs:
                self.engine.abort(s)
            raise
        out = []
        for g, sp in zip(groups, params):
            s = seqs[g]
            prompt_ids = s.token_ids[:s.num_prompt_tokens]
            plp = _as_dicts(prompt_ids, s.prompt_logprobs) if s.prompt_logprobs is not None else None
            out.append(RequestOutput(s.request_id, s.prompt, prompt_ids,
                                     [_choice(i, c) for i, c in enumerate(seqs[g:g + sp.n])], prompt_logprobs=plp))
        return out

    def _run(self, seqs: list, groups: list[int], use_tqdm: bool) -> None:
        """Step the engine until every request is done; with use_tqdm, count finished prompts
        (groups[i]: prompt i's first sequence) on a progress bar."""
        if not use_tqdm:
            while self.engine.has_unfinished():
                self.engine.step()
            return
        from tqdm import tqdm

        bounds = list(zip(groups, groups[1:] + [len(seqs)]))
        with tqdm(total=len(groups), desc="Processed prompts", unit="prompt", file=sys.stderr) as bar:
            while self.engine.has_unfinished():
                self.engine.step()
                done = sum(all(s.finished for s in seqs[a:b]) for a, b in bounds)
                bar.update(done - bar.n)
            bar.update(len(groups) - bar.n)

    def chat(self, messages: list[dict] | Seq[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate a reply to one conversation (a list of {"role", "content"} messages) or to each
        of a list of them, through the tokenizer's chat template; one RequestOutput per conversation,
        as vLLM's LLM.chat returns."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (a list of message dicts) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        ids = [list(self.tokenizer.apply_chat_template(list(c))) for c in conversations]
        return self.generate(ids, sampling_params, use_tqdm=use_tqdm)


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "RequestError", "SamplingParams"]
