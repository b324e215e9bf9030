"""The configuration of a deployment, as records validated in one place.

`Config` holds the model and one record per concern: `EngineConfig` (KV cache and scheduling),
`ParallelConfig` (pipeline and tensor parallelism, how workers start), `DisaggConfig`
(prompt-token disaggregation), `SwapConfig` (microbatch swapping), `ReplicationConfig` (KV
replication and recovery from worker failures); `ServerConfig` holds the HTTP server's. Field names
are the `LLM()` arguments (the CLI flags with `-` for `_`). Each record's `validate()` checks its own
fields, `Config.validate()` also checks the combinations; every error is a ConfigError worded
"<field>: <problem>". This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

ADMISSION = ("greedy", "reserve")                         # engine/scheduler.py
LAUNCHERS = ("local", "mpirun", "external")               # cluster/launch.py
KV_TRANSPORTS = ("auto", "ipc", "shm", "tcp")             # kvstream/select.py
RECOVERY = ("auto", "respawn", "standby", "wait", "off")  # what a pipeline does when a worker dies
STANDBY_WEIGHTS = ("host", "device", "off")  # where standbys hold the weights of the stages they would replace
MAX_DEGREE = 8                                            # pp, tp, prompt and token stages


class ConfigError(ValueError):
    """A configuration that cannot run; the message starts with the field at fault."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.field = name


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        names = list(map(repr, choices))
        want = " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)
        raise ConfigError(name, f"must be {want}, got {value!r}")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        want = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(name, f"must be {want}, got {value!r}")


def check_positive(name: str, value) -> None:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(name, f"must be a finite number > 0, got {value!r}")


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0              # 0: derive from kv_cache_memory
    kv_cache_memory: int = 0         # bytes; 0: a default by device (see LLM)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 0           # 0: the model's context length
    gpu_memory_utilization: float = 0.0  # CUDA: fraction of the GPU this engine may fill (0: KV = 0.4 of free)
    cuda_graphs: bool = True         # decode steps from CUDA graphs (single process on CUDA)
    admission: str = "greedy"        # greedy | reserve: see engine/scheduler.py
    overlap_steps: bool = True       # greedy decode steps queued before the host reads tokens (llm_engine.py)
    enable_prefix_caching: bool = True  # share the KV of common prompt prefixes (docs/prefix-caching.md)
    kv_offload_gib: float = 0.0      # prefix caching: pinned host tier for blocks the device evicts (0: none)
    kv_offload_dir: str | None = None  # prefix caching: disk tier below the host tier
    kv_offload_dir_gib: float = 8.0  # the disk tier's bound

    @property
    def kv_offload_bytes(self) -> int:
        return int(self.kv_offload_gib * 2**30)

    @property
    def kv_offload_dir_bytes(self) -> int:
        return int(self.kv_offload_dir_gib * 2**30)

    def validate(self) -> None:
        for name in ("kv_offload_gib", "kv_offload_dir_gib"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1 << 20:
                raise ConfigError(name, f"must be a number of GiB >= 0, got {v!r}")
        if (self.kv_offload_gib or self.kv_offload_dir) and not self.enable_prefix_caching:
            raise ConfigError("kv_offload_gib" if self.kv_offload_gib else "kv_offload_dir",
                              "is a tier of the prefix cache: it needs enable_prefix_caching=True")
        if self.kv_offload_dir and not self.kv_offload_gib:
            raise ConfigError("kv_offload_dir", "needs a host tier (kv_offload_gib > 0): the disk tier is fed from it")
        check_int("block_size", self.block_size, 1)
        check_int("num_blocks", self.num_blocks, 0)
        check_int("kv_cache_memory", self.kv_cache_memory, 0)
        check_int("max_num_seqs", self.max_num_seqs, 1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        check_int("max_model_len", self.max_model_len, 0)
        v = self.gpu_memory_utilization
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError("gpu_memory_utilization", f"must be a fraction in (0, 1], got {v!r}")
        check_choice("admission", self.admission, ADMISSION)


@dataclass
class ParallelConfig:
    pp: int = 1                      # pipeline stages (the FT-style pipeline)
    tp: int = 1                      # tensor-parallel shards per stage
    microbatch_size: int = 0         # sequences per microbatch; 0: any
    launcher: str = "local"
    layer_split: list[tuple[int, int]] | None = None  # each stage's [start, end) layers; None: even
    worker_timeout: float = 300.0    # s: workers' start and registration
    log_dir: str | None = None       # each worker's log file here
    cluster_address: str | None = None  # HOST:PORT the controller listens on for workers; None: 127.0.0.1, any port
    hostfile: str | None = None      # launcher mpirun: Open MPI hostfile

    def validate(self) -> None:
        check_int("pp", self.pp, 1, MAX_DEGREE)
        check_int("tp", self.tp, 1, MAX_DEGREE)
        check_int("microbatch_size", self.microbatch_size, 0)
        check_choice("launcher", self.launcher, LAUNCHERS)
        check_positive("worker_timeout", self.worker_timeout)
        if self.cluster_address is not None:
            host, sep, port = str(self.cluster_address).rpartition(":")
            if not isinstance(self.cluster_address, str) or not sep or not host or not port.isdigit() \
                    or not 0 < int(port) < 65536:
                raise ConfigError("cluster_address", f"must be HOST:PORT (port 1-65535), got {self.cluster_address!r}")
        if self.hostfile is not None:
            if self.launcher != "mpirun":
                raise ConfigError("hostfile", f"is for launcher 'mpirun', not {self.launcher!r}")
            if not os.path.isfile(self.hostfile):
                raise ConfigError("hostfile", f"no such file: {self.hostfile!r}")


@dataclass
class DisaggConfig:
    prompt_stages: int = 0           # both 0: no disaggregation
    token_stages: int = 0
    kv_receive_slots: int = 8        # requests in KV transfer to the token stages at once
    kv_transport: str = "auto"

    @property
    def enabled(self) -> bool:
        return bool(self.prompt_stages or self.token_stages)

    def validate(self) -> None:
        if self.enabled:
            for name in ("prompt_stages", "token_stages"):
                if getattr(self, name) == 0:
                    raise ConfigError(name, "prompt_stages and token_stages go together (both > 0 for "
                                            "disaggregation)")
                check_int(name, getattr(self, name), 1, MAX_DEGREE)
        check_int("kv_receive_slots", self.kv_receive_slots, 1)
        check_choice("kv_transport", self.kv_transport, KV_TRANSPORTS)


@dataclass
class SwapConfig:
    swap: bool = False               # the KV of idle microbatches lives in pinned host memory
    resident_microbatches: int = 2   # microbatches whose KV is on the device at once

    def validate(self) -> None:
        if self.swap:
            check_int("resident_microbatches", self.resident_microbatches, 1)


@dataclass
class ReplicationConfig:
    """Fault tolerance: KV replication, and what happens when a worker dies."""
    replicate: bool = False          # every token's KV also in another worker's host memory
    replicate_dir: str | None = None  # ... and in files under this directory
    replicate_to: list[int] | None = None  # the holder stage of each stage; None: the next, in a ring
    replicas: int = 1                # holders per worker (each another stage, on other hosts where they exist)
    recovery: str = "auto"           # auto: respawn (wait with external workers), for every layout
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.0
    spare_workers: int = 1           # warm spares with recovery respawn
    standby_weights: str = "host"    # standbys hold the stages they would replace: host, device or off

    def validate(self) -> None:
        check_choice("recovery", self.recovery, RECOVERY)
        check_positive("heartbeat_interval", self.heartbeat_interval)
        check_positive("heartbeat_timeout", self.heartbeat_timeout)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("heartbeat_timeout", f"must be above heartbeat_interval ({self.heartbeat_interval} s), "
                                                   f"got {self.heartbeat_timeout}")
        check_int("spare_workers", self.spare_workers, 0)
        check_choice("standby_weights", self.standby_weights, STANDBY_WEIGHTS)
        check_int("replicas", self.replicas, 1, MAX_DEGREE)
        if not self.replicate and self.replicas != 1:
            raise ConfigError("replicas", "needs replicate=True")
        if not self.replicate:
            for name in ("replicate_dir", "replicate_to"):
                if getattr(self, name):
                    raise ConfigError(name, "needs replicate=True")

    def resolved_recovery(self, launcher: str) -> str:
        if self.recovery != "auto":
            return self.recovery
        return "wait" if launcher == "external" else "respawn"


@dataclass
class Config:
    """A whole deployment: `LLM(config=...)` and `dejavu serve` / `generate` start one."""
    model: str = "smollm2"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    tokenizer: str | None = None     # a tokenizer directory other than the model's
    chat_template: str | None = None  # a Jinja chat template (text, or a file holding it) used for chat
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)

    @classmethod
    def from_kwargs(cls, model: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
                    kv_cache_blocks: int = 0, tokenizer: str | None = None, chat_template: str | None = None,
                    **kwargs) -> Config:
        """Sort `LLM()`'s flat keyword arguments into the records (kv_cache_blocks is
        EngineConfig.num_blocks); an unknown name is a TypeError, as for any function."""
        records = {"engine": EngineConfig, "parallel": ParallelConfig, "disagg": DisaggConfig, "swap": SwapConfig,
                   "replication": ReplicationConfig}
        parts = {name: {} for name in records}
        kwargs["num_blocks"] = kv_cache_blocks
        for key, value in kwargs.items():
            owner = next((name for name, rec in records.items() if key in {f.name for f in fields(rec)}), None)
            if owner is None:
                raise TypeError(f"unexpected keyword argument {key!r}")
            parts[owner][key] = value
        return cls(model=model, device=device, dtype=dtype, seed=seed, tokenizer=tokenizer, chat_template=chat_template,
                   **{name: rec(**parts[name]) for name, rec in records.items()})

    @property
    def distributed(self) -> bool:
        """Worker processes (a pipeline, TP or disaggregation) rather than this process alone."""
        return self.parallel.pp > 1 or self.parallel.tp > 1 or self.disagg.enabled

    def kv_stages(self) -> int:
        """The stages that hold decode KV: the token pipeline, or the pipeline."""
        return self.disagg.token_stages if self.disagg.enabled else self.parallel.pp

    def validate(self) -> Config:
        for rec in (self.engine, self.parallel, self.disagg, self.swap, self.replication):
            rec.validate()
        par, dis, sw, rep = self.parallel, self.disagg, self.swap, self.replication
        if self.engine.gpu_memory_utilization and self.distributed:
            raise ConfigError("gpu_memory_utilization", "sizes the single-process engine's KV cache; pipeline and "
                                                        "disaggregated workers take --kv-cache-blocks")
        if dis.enabled and par.pp != 1:
            raise ConfigError("pp", "is the non-disaggregated pipeline; with prompt_stages/token_stages leave pp at 1")
        if dis.enabled and self.engine.admission == "reserve":
            raise ConfigError("admission", "'reserve' is not yet available with prompt_stages/token_stages "
                                           "(disaggregation admits by prompt length)")
        stages = self.kv_stages()
        if sw.swap and stages < 2:
            raise ConfigError("swap", "needs a pipeline of pp >= 2 microbatches (token_stages >= 2 with "
                                      "disaggregation)")
        if sw.swap and dis.enabled and dis.kv_transport == "ipc":
            raise ConfigError("kv_transport", "swap with disaggregation needs kv_transport shm or tcp (or auto): a "
                                              "swapping token worker takes prompt KV into its host copy, which CUDA "
                                              "IPC cannot write")
        recovery = rep.resolved_recovery(par.launcher)
        if rep.replicate:
            if stages < 2:
                raise ConfigError("replicate", "needs a pipeline of pp >= 2 (or token_stages >= 2): a stage's KV is "
                                               "replicated to another stage's host memory")
            if recovery == "off":
                raise ConfigError("recovery", "replicate needs recovery (respawn, standby or wait), not 'off'")
            ring = rep.replicate_to
            if ring is not None and (len(ring) != stages or any(not isinstance(h, int) or not 0 <= h < stages
                                                                 or h == i for i, h in enumerate(ring))):
                raise ConfigError("replicate_to", f"must name, for each of the {stages} stages, another stage in "
                                                  f"[0, {stages}); got {ring}")
            if rep.replicas >= stages:
                raise ConfigError("replicas", f"each holder is another stage: at most {stages - 1} with {stages} "
                                              f"stages holding KV, got {rep.replicas}")
        return self


@dataclass
class ServerConfig:
    """`dejavu serve`'s HTTP server (serving/api.py, serving/http_limits.py)."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256             # waiting requests before new ones get 429
    served_model_name: str | None = None
    max_connections: int = 0         # 0: http_limits.default_max_connections()
    header_timeout: float = 15.0
    body_timeout: float = 30.0
    max_body_bytes: int = 8 << 20

    def validate(self) -> ServerConfig:
        check_int("port", self.port, 0, 65535)
        check_int("max_queue", self.max_queue, 1)
        check_int("max_connections", self.max_connections, 0)
        check_positive("header_timeout", self.header_timeout)
        check_positive("body_timeout", self.body_timeout)
        check_int("max_body_bytes", self.max_body_bytes, 1)
        return self
