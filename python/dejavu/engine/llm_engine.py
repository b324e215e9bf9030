"""The single-process engine: admission, scheduling, model steps, sampling, stop conditions."""
from __future__ import annotations

import logging
import math
import operator
import os
import random

import torch

from ..config import EngineConfig
from ..models.base import DecoderLM
from ..models.tokenizer import Tokenizer
from ..sampling_params import SamplingParams
from .block_manager import blocks_for
from .detok import IncrementalDecoder
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner
from .prompt_logprobs import prompt_entries
from .sampler import pick, with_logprobs
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("dejavu.engine")


class RequestError(ValueError):
    """A request that can never be served (too long, empty, bad parameters)."""


class _Launched:
    """A decode step queued on the device whose greedy tokens the host has not read yet."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, host: torch.Tensor):
        """`tokens` on the device, and `host`: where the step (on the current stream) puts them."""
        self.seqs, self.tokens, self.host = seqs, tokens, host
        self.event = None
        if tokens.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def prefix_salt(model_id: str, dtype: torch.dtype, start: int, end: int) -> str:
    """The prefix cache's salt: everything besides the tokens that changes a block's K/V."""
    return f"{model_id}|{dtype}|layers {start}-{end}"


def eos_ids(cfg, tokenizer: Tokenizer) -> list[int]:
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos)


class LLMEngine:
    MAX_FAILED_STEPS = 3
    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, model_id: str = ""):
        """`model_id`: what names these weights (the prefix cache's salt, with the dtype)."""
        cfg = self.model_config = model.cfg
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        num_blocks = config.num_blocks
        if not num_blocks:
            per_block = PagedKVCache.bytes_per_block(cfg.num_layers, config.block_size, cfg.num_kv_heads,
                                                     cfg.head_dim, dtype)
            num_blocks = max(1, config.kv_cache_memory // per_block)
        self.cache = PagedKVCache(model.end - model.start, num_blocks, config.block_size, cfg.num_kv_heads,
                                  cfg.head_dim, dtype, device)
        self.tiers = None  # the prefix cache's host and disk tiers
        if config.enable_prefix_caching and (config.kv_offload_bytes or config.kv_offload_dir):
            from .prefix_tiers import PrefixTiers

            self.tiers = PrefixTiers(self.cache, self.cache.allocator.stats, config.kv_offload_bytes,
                                     config.kv_offload_dir, config.kv_offload_dir_bytes)
            self.cache.allocator.record_evictions = True
        self.scheduler = Scheduler(self.cache.allocator, config.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens, admission=config.admission,
                                   prefix_salt=prefix_salt(model_id, dtype, model.start, model.end)
                                   if config.enable_prefix_caching else None, tiers=self.tiers)
        self.runner = ModelRunner(model, self.cache)
        if config.cuda_graphs and device.type == "cuda":
            why = self.runner.enable_cuda_graphs(config.max_num_seqs, self.max_model_len)
            if why:
                log.info("decode CUDA graphs off: %s", why)
        self.block_size, self.num_blocks = config.block_size, num_blocks
        self.eos_ids = eos_ids(cfg, tokenizer)
        self.num_generated = 0
        # Overlapped decode steps (step()); DEJAVU_OVERLAP=0 turns them off, a baseline for benchmarks.
        self.overlap = config.overlap_steps and os.environ.get("DEJAVU_OVERLAP", "1") != "0"
        self.num_chained = 0  # decode steps queued before the tokens of the step before were read
        self._launched: _Launched | None = None
        self.failed_steps = 0  # consecutive steps that raised (step())
        self._stepping: list[Sequence] = []  # the requests of the step being run
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB) on %s", num_blocks, config.block_size,
                 self.cache.nbytes / 2**20, device)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if isinstance(prompt, str):
            try:
                ids, text = self.tokenizer.encode(prompt), prompt
            except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate: the tokenizer's own error
                raise RequestError(f"cannot tokenize the prompt: {type(e).__name__}: {e}") from None
        else:
            try:
                ids, text = [operator.index(t) for t in prompt], None
            except TypeError:
                raise RequestError("the prompt must be a string or a list of integer token ids") from None
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        params.validate()
        if not math.isfinite(params.temperature):
            raise RequestError(f"temperature must be a finite number, got {params.temperature}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        if params.prompt_logprobs is not None and not self.computes_prompt_logprobs:
            raise RequestError("prompt logprobs (echo with logprobs) need every prompt position's logits, which "
                               "only the single-process engine computes; this deployment is a pipeline")
        if params.n != 1:
            raise RequestError("one request samples one choice: expand n with SamplingParams.choices()")
        if params.stop and not self.tokenizer.has_text:
            raise RequestError("'stop' strings need text, and this model has no tokenizer: use stop_token_ids")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the model's context length of {self.max_model_len} tokens")
        need = blocks_for(total, self.block_size)
        if need > self.num_blocks:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks "
                               f"but the cache holds only {self.num_blocks}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(ids, params, seed, request_id, text)
        self._enqueue(seq)
        return seq

    @property
    def computes_prompt_logprobs(self) -> bool:
        """True when this engine runs the prefill itself (a pipeline's step() sends it to workers,
        whose sampling stage sees each sequence's last position only)."""
        return type(self).step is LLMEngine.step

    def _enqueue(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ one iteration
    # Overlapped decode steps. When every sequence of a decode batch decodes greedily (and nothing can
    # ban a token), a step is queued on the device and its tokens are picked there (argmax; with CUDA
    # graphs, inside the step's graph); step() returns before they are read. The next call queues the
    # following step over the same sequences before it reads the first one's tokens: that step takes
    # its input ids from the device, so the GPU goes from one step to the next without waiting for
    # the host, and the host's bookkeeping (reading tokens, stop checks, scheduling, the next step's
    # inputs) runs while the GPU computes. A sequence that stops (EOS, a stop string, an abort) while
    # a step is queued for it drops that step's token. Only one step is ever queued unread; a step
    # that could change the batch (admission, a preemption, the last token of max_tokens) waits
    # for the tokens first. docs/gpu-fast-path.md.

    def _overlappable(self, seqs: list[Sequence]) -> bool:
        """True when the next token of each of `seqs` is its greedy argmax (no ban, no randomness)
        and is not its last by length: a step for them can be queued before their tokens are read."""
        if not self.overlap:
            return False
        for s in seqs:
            p, n = s.params, s.num_output_tokens + s.inflight  # tokens before the one this step picks
            if not p.greedy or not p.plain or n >= p.max_tokens or len(s) + s.inflight >= self.max_model_len:
                return False
            if n < p.min_tokens and (p.stop_token_ids or (self.eos_ids and not p.ignore_eos)):
                return False
        return True

    def _launch(self, seqs: list[Sequence], chain: _Launched | None) -> _Launched:
        tokens, host = self.runner.run_greedy(seqs, chain.tokens if chain is not None else None)
        for s in seqs:
            s.inflight += 1
        return _Launched(seqs, tokens, host)

    def _land(self, launched: _Launched) -> list[Sequence]:
        """Read a queued step's tokens into its sequences (those still running)."""
        out = []
        for s, tok in zip(launched.seqs, launched.read()):
            if s.finished or not s.inflight:
                continue  # stopped while this step was queued: its token is dropped
            s.inflight -= 1
            s.token_ids.append(tok)
            self.num_generated += 1
            self._check_stop(s, tok)  # (a finish drops the rest of its queued tokens)
            out.append(s)
        return out

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one iteration; returns the sequences that got a token (finished ones included).

        An exception inside the iteration ends the requests of that step (finish_reason "error",
        `Sequence.error` says why; one step cannot tell which of its requests caused it) and the
        engine goes on with the others. It propagates when the step had no requests yet to blame,
        or when MAX_FAILED_STEPS steps in a row failed (the engine itself is broken, e.g. a CUDA
        error)."""
        self._stepping = []
        try:
            out = self._iterate()
        except Exception as e:  # noqa: BLE001 - contained to the requests of this step
            failed = [s for s in self._stepping if not s.finished]
            self.failed_steps += 1
            if not failed or self.failed_steps >= self.MAX_FAILED_STEPS:
                raise
            log.exception("engine step failed; ending its %d request(s)", len(failed))
            self._launched = None
            for s in failed:
                s.error = f"{type(e).__name__}: {e}"
                self._finish(s, "error")
            return failed
        self.failed_steps = 0
        return out

    def _iterate(self) -> list[Sequence]:
        launched, self._launched = self._launched, None
        if launched is not None:
            seqs = self._stepping = launched.seqs
            if self._overlappable(seqs) and self.scheduler.decode_fits(seqs):
                again, is_prefill = self.scheduler.schedule()
                self._sync_tiers(again, is_prefill)
                if is_prefill or again != seqs:
                    raise RuntimeError("scheduler: an overlapped decode step was not scheduled as predicted")
                self._launched = self._launch(seqs, launched)
                self.num_chained += 1
            return self._land(launched)
        seqs, is_prefill = self.scheduler.schedule()
        self._stepping = seqs
        self._sync_tiers(seqs, is_prefill)
        if not seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler stalled: waiting requests but nothing can run")
            return []
        if not is_prefill and self._overlappable(seqs):
            self._launched = self._launch(seqs, None)
            return []
        want = [i for i, s in enumerate(seqs) if is_prefill and s.params.prompt_logprobs is not None
                and s.prompt_logprobs is None and s.num_cached == 0]
        t = self.tiers if self.tiers is not None and self.tiers.pending is not None else None
        logits, rows = self.runner.run_with_rows(seqs, is_prefill, want, t and (lambda: t.wait_layer(0)),
                                                  t and (lambda i: t.wait_layer(i + 1)))
        for i, h in zip(want, rows):
            s = seqs[i]
            s.prompt_logprobs = prompt_entries(self.model, h[:s.num_prompt_tokens],
                                               s.token_ids[:s.num_prompt_tokens], s.params.prompt_logprobs)
        banned = [self._banned(s) for s in seqs]
        seen = [(s.token_ids, s.num_prompt_tokens) if s.params.penalized else None for s in seqs]
        tokens, lps = pick(logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s) for s in seqs], banned,
                           seen)
        self._append_tokens(seqs, with_logprobs(tokens, lps))
        return seqs

    def _sync_tiers(self, seqs: list[Sequence], is_prefill: bool) -> None:
        """Blocks this schedule evicted go to the host tier before a step overwrites them; admitted
        sequences' lower-tier hits come back while their prefill runs, each layer's before that
        layer (engine/prefix_tiers.py)."""
        if self.tiers is not None:
            self.tiers.sync(self.cache.allocator.take_evicted(), seqs if is_prefill else [], overlap=True)

    def prefix_cache_stats(self) -> dict | None:
        """Prefix-cache counters (and tier occupancy), None when caching is off."""
        if not self.scheduler.prefix_caching:
            return None
        out = self.scheduler.allocator.stats.as_dict()
        if getattr(self, "tiers", None) is not None:
            out.update(self.tiers.occupancy())
        return out

    def prefix_cache_tiers(self) -> dict | None:
        """Each tier's occupancy: {tier: {"blocks", "capacity_blocks"}} (device, then host and disk
        when configured), None when caching is off."""
        if not self.scheduler.prefix_caching:
            return None
        out = {"device": {"blocks": self.cache.allocator.num_named, "capacity_blocks": self.num_blocks}}
        if self.tiers is not None:
            out.update(self.tiers.tier_occupancy())
        return out

    def _append_tokens(self, seqs: list[Sequence], tokens: list) -> None:
        """tokens[i]: an id, or [id, logprob entry] for a request that asked for logprobs (sampler.pick)."""
        for s, tok in zip(seqs, tokens):
            if isinstance(tok, (list, tuple)):
                tok, lp = tok
                del s.logprobs[s.num_output_tokens:]  # a request started over (pipeline recovery) regenerates
                s.logprobs.append(lp)
            s.token_ids.append(tok)
            self.num_generated += 1
            self._check_stop(s, tok)

    def _banned(self, s: Sequence) -> list[int]:
        if s.num_output_tokens >= s.params.min_tokens:
            return []
        return (self.eos_ids if not s.params.ignore_eos else []) + s.params.stop_token_ids

    def _check_stop(self, s: Sequence, tok: int) -> None:
        p = s.params
        reason = None
        if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
            reason = "stop"
        elif s.num_output_tokens >= p.max_tokens or len(s) >= self.max_model_len:
            reason = "length"
        if p.stop:
            # Incremental: decode the new token only, and look for a stop string ending in its text.
            dec = s.detok
            if dec is None or len(dec.ids) != s.num_output_tokens - 1:  # new, or the request started over
                dec = s.detok = IncrementalDecoder(self.tokenizer)
                dec.push(s.output_ids[:-1])
            new = dec.push([tok])
            text = dec.text
            since = max(0, len(text) - len(new) - max(map(len, p.stop)) + 1)
            cut = min((i for i in (text.find(x, since) for x in p.stop) if i >= 0), default=-1) if new else -1
            if cut >= 0:
                s.text = text[:cut]
                self._finish(s, "stop")
                return
        if reason:
            s.text = self.tokenizer.decode(s.output_ids)
            self._finish(s, reason)
