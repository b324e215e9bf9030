"""A request as the engine sees it: tokens so far, where their KV lives, and why it finished."""
from __future__ import annotations

import enum
import itertools

from ..sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                 request_id: str | None = None, prompt: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.promised = 0  # KV blocks set aside for its growth (admission="reserve")
        self.num_cached = 0  # leading tokens whose K/V is in the cache
        # Prefix caching (block_manager.py): names of its full blocks so far, how many of its blocks
        # carry their name in the allocator, and blocks a lower tier fills before its prefill.
        self.block_names: list[bytes] = []
        self.num_named = 0
        self.restore: list[tuple[int, bytes]] = []
        self.step_start: int | None = None  # a pipeline: num_cached before its step in flight and its restores
        # Tokens being decoded whose ids are still on the device (overlapped steps, llm_engine.py):
        # the step that reads the newest of them is already queued behind the step that computes it.
        self.inflight = 0
        self.preemptions = 0  # times its KV was dropped (replication watermarks of older KV no longer count)
        self.finish_reason: str | None = None  # stop | length | abort | error
        self.error: str | None = None  # why, when finish_reason is "error"
        self.text = ""
        self.detok = None  # an IncrementalDecoder of the output, for stop strings (llm_engine._check_stop)
        self.logprobs: list = []  # per output token, when params.logprobs is set: sampler.pick's entries
        self.prompt_logprobs: list | None = None  # params.prompt_logprobs: None, then an entry per prompt token

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
