"""`dejavu simulate`: a discrete-event simulator of DéjàVu deployments.

It replays the serving engines' own policies with stage times from a profile instead of running
the model:
  ft       PipelinePolicy: D microbatch slots over D stages; a free slot prefills newly admitted
           requests (up to the microbatch size and the token budget) or else decodes its running
           ones; every stage serves steps in launch order.
  disagg   DisaggPolicy: Dp prompt slots prefill (bounded by the receive slots), a prompt stage
           with more layers takes proportionally longer (x m); the KV then lands on every token
           stage in bytes / link bandwidth: where the token worker copies it in itself (CPU shared
           memory, TCP) that occupies the stage in order with its decode steps, where it arrives
           on its own (CUDA IPC, NCCL; profile field admit_blocks_stage false) only the link; admitted requests join the token slot with the fewest running, up to the
           microbatch size (until then they hold their receive slot); Dt slots decode.
  swap     (either mode) a stage's step also needs the microbatch's KV for its layers brought in
           from host memory (prefetched during the previous step) and the new token's KV written
           back: the step takes max(compute, PCIe time); steps where PCIe dominates are counted.
  hops     between consecutive stages of a pipeline a step's hidden states (tokens x hidden bytes)
           cross the profile's stage link (the fault-tolerant pipes: device -> host -> TCP ->
           host -> device) before the next stage can start; each boundary carries one step at a
           time, and the sending stage is free meanwhile (its sends are asynchronous).
  failure  at time F one stage dies; work in flight is lost and every stage waits for detection
           and a replacement (+ the KV fetch from the replica when replicating). With replication
           requests resume from their last token; without, the requests that had KV on the failed
           pipeline restart from their prompt (the paper's baseline).
Each step adds the profile's controller round trip. Arrivals are a trace's or Poisson.
"""
from __future__ import annotations

import heapq
import math
from collections import deque

from .model import PlanError, Profile, stage_layers
from .workload import Deployment, Req, SimOptions, workload


class _Pipe:
    """One pipeline: its stages' layer counts, when each stage is next free, what it ran."""

    def __init__(self, name: str, layers: list[int]):
        self.name, self.layers = name, layers
        self.free = [0.0] * len(layers)
        self.hop_free = [0.0] * len(layers)  # boundary s-1 -> s: when it is next free
        self.busy = [0.0] * len(layers)


class Simulator:
    def __init__(self, profile: Profile, deployment: Deployment, opts: SimOptions):
        self.p, self.d, self.o = profile, deployment, opts
        L = profile.num_layers
        if opts.microbatch <= 0:
            raise PlanError(f"microbatch size must be > 0, got {opts.microbatch}")
        if deployment.mode == "ft":
            self.pipes = {"stage": _Pipe("stage", stage_layers(L, deployment.stages))}
        else:
            self.pipes = {"prompt": _Pipe("prompt", stage_layers(L, deployment.prompt_stages)),
                          "token": _Pipe("token", stage_layers(L, deployment.token_stages))}
        role, idx = opts.fail_stage
        if opts.fail_at is not None and (role not in self.pipes or not 0 <= idx < len(self.pipes[role].layers)):
            raise PlanError(f"--fail-stage {role}:{idx} is not a stage of {deployment}")
        self.link_free = [0.0] * len(self.pipes.get("token", self.pipes.get("stage")).layers)
        self.events: list[dict] = []
        self.pcie_s = 0.0
        self.pcie_bound_steps = 0
        self.steps = 0

    # ------------------------------------------------------------------ stage times
    def _stage_time(self, kind: str, stage: int, pipe: "_Pipe", seqs: list[Req]) -> float:
        p = self.p
        layers = pipe.layers[stage]
        n = len(seqs)
        s1 = sum(r.prompt + r.generated for r in seqs)
        s2 = sum((r.prompt + r.generated) ** 2 for r in seqs) if kind == "prefill" else 0
        compute = p.stage_time(kind, layers, stage == 0, stage == len(pipe.layers) - 1, n, s1, s2)
        if self.o.swap and kind == "decode":
            # bring this microbatch's KV for the stage's layers in, write the new token's KV back
            kv = p.kv_bytes_per_token * layers / p.num_layers
            bw = p.pcie_bytes_per_s or math.inf
            pcie = (s1 * kv + n * kv) / bw
            self.pcie_s += pcie
            if pcie > compute:
                self.pcie_bound_steps += 1
            return max(compute, pcie)
        return compute

    def _hop_time(self, kind: str, seqs: list[Req]) -> float:
        """Seconds for one step's hidden states to cross a stage boundary (0 without a measured link)."""
        p = self.p
        if not p.stage_link_bytes_per_s or not p.hidden_bytes_per_token:
            return 0.0
        tokens = sum(r.prompt + r.generated for r in seqs) if kind == "prefill" else len(seqs)
        return tokens * p.hidden_bytes_per_token / p.stage_link_bytes_per_s

    def _run_through(self, pipe: _Pipe, kind: str, seqs: list[Req], ready: float, label: str,
                     scale: float = 1.0, lead: float = 0.0) -> float:
        """The step through every stage in turn; `lead` (CPU time of the controller on the workers'
        cores) is shared out over the stages: each loses an equal part of it to the controller."""
        share = lead / len(pipe.layers)
        hop = self._hop_time(kind, seqs)
        for s in range(len(pipe.layers)):
            if s and hop:
                ready = max(ready, pipe.hop_free[s]) + hop
                pipe.hop_free[s] = ready
            dur = self._stage_time(kind, s, pipe, seqs) * scale + share
            start = max(ready, pipe.free[s])
            pipe.free[s] = start + dur
            pipe.busy[s] += dur
            ready = start + dur
            if self.o.trace_events:
                self.events.append({"name": f"{kind} {label}", "ph": "X", "pid": pipe.name, "tid": s,
                                    "ts": start * 1e6, "dur": dur * 1e6, "args": {"seqs": len(seqs)}})
        self.steps += 1
        return ready

    # ------------------------------------------------------------------ the loop
    def run(self, reqs: list[Req]) -> dict:
        o = self.o
        self.reqs = reqs
        arrivals = deque(sorted(reqs, key=lambda r: r.arrival))
        self.waiting: deque[Req] = deque()
        heap: list = []
        seq = 0
        ft = self.d.mode == "ft"
        nslots = self.d.stages if ft else self.d.token_stages
        slots = [[] for _ in range(nslots)]
        busy = [False] * nslots
        pslots = [False] * (0 if ft else self.d.prompt_stages)
        in_transfer = 0
        ready: deque[Req] = deque()
        failed = o.fail_at is None
        # The controller's per-step time delays each launch. On a CPU deployment it runs on the
        # workers' cores instead, so it cannot overlap other microbatches' compute: it is taken from
        # the stages' time (processor sharing, approximated by an equal share per stage).
        lead = self.p.step_overhead_s if self.p.device == "cpu" else 0.0
        overhead = self.p.step_overhead_s - lead
        now = 0.0
        self.recovery_s = 0.0

        def push(t, kind, payload):
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (t, seq, kind, payload))

        def emit(r: Req, t: float):
            r.generated += 1
            if r.first_token is None:
                r.first_token = t
            if r.generated >= r.output:
                r.finish = t
                return True
            return False

        while True:
            # launch whatever can run now (the engines' step() order)
            if not ft:
                for i in range(len(pslots)):
                    if pslots[i]:
                        continue
                    batch = self._take(min(o.microbatch, o.receive_slots - in_transfer))
                    if batch:
                        pslots[i] = True
                        in_transfer += len(batch)
                        end = self._run_through(self.pipes["prompt"], "prefill", batch, now + overhead,
                                                f"p{i}", scale=o.m, lead=lead)
                        push(end, "prefilled", (i, batch))
            while ready:  # admitted requests join the token microbatch with the fewest, up to the size
                j = min(range(nslots), key=lambda k: len(slots[k]))
                if len(slots[j]) >= o.microbatch:
                    break
                slots[j].append(ready.popleft())
                in_transfer -= 1
            for i in range(nslots):
                if busy[i]:
                    continue
                batch = self._take(o.microbatch - len(slots[i])) if ft else []
                if batch:
                    slots[i].extend(batch)
                    busy[i] = True
                    end = self._run_through(self.pipes["stage"], "prefill", batch, now + overhead, f"mb{i}",
                                            lead=lead)
                    push(end, "stepped", (i, batch))
                elif slots[i]:
                    busy[i] = True
                    pipe = self.pipes["stage" if ft else "token"]
                    batch = list(slots[i])
                    end = self._run_through(pipe, "decode", batch, now + overhead, f"mb{i}", lead=lead)
                    push(end, "stepped", (i, batch))
            # next event
            nxt = [heap[0][0]] if heap else []
            if arrivals:
                nxt.append(arrivals[0].arrival)
            if not failed:
                nxt.append(o.fail_at)
            if not nxt:
                break
            now = min(nxt)
            while arrivals and arrivals[0].arrival <= now:
                self.waiting.append(arrivals.popleft())
            if not failed and o.fail_at <= now:
                failed = True
                busy, pslots, in_transfer = self._fail(now, slots, busy, pslots, heap)
                ready.clear()
                continue
            while heap and heap[0][0] <= now:
                t, _, kind, payload = heapq.heappop(heap)
                if kind == "stepped":
                    i, batch = payload
                    busy[i] = False
                    for r in batch:
                        if r in slots[i] and emit(r, t):
                            slots[i].remove(r)
                elif kind == "prefilled":
                    i, batch = payload
                    pslots[i] = False
                    live = []
                    for r in batch:
                        if emit(r, t):
                            in_transfer -= 1
                        else:
                            live.append(r)
                    if live:
                        done = self._admit(live, t + overhead)
                        push(done, "admitted", live)
                elif kind == "admitted":
                    ready.extend(payload)
        return self._report(reqs)

    def _take(self, limit: int) -> list[Req]:
        """Up to `limit` waiting requests for a prefill step, within the token budget (Scheduler's rule)."""
        batch, tokens = [], 0
        while self.waiting and len(batch) < limit:
            n = self.waiting[0].prompt + self.waiting[0].generated
            if batch and tokens + n > self.o.max_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        return batch

    def _admit(self, seqs: list[Req], ready: float) -> float:
        """Every token stage copies the requests' KV for its layers into its cache, in order."""
        pipe = self.pipes["token"]
        bw = self.p.kv_link_bytes_per_s or math.inf
        blocking = self.p.admit_blocks_stage
        link = pipe.free if blocking else self.link_free
        end = ready
        for s, layers in enumerate(pipe.layers):
            nbytes = sum(r.prompt + r.generated for r in seqs) * self.p.kv_bytes_per_token * layers / self.p.num_layers
            dur = nbytes / bw
            start = max(ready, link[s])
            link[s] = start + dur
            if blocking:
                pipe.busy[s] += dur
            end = max(end, start + dur)
            if self.o.trace_events and dur > 0:
                self.events.append({"name": "admit KV", "ph": "X", "pid": "token", "tid": s, "ts": start * 1e6,
                                    "dur": dur * 1e6, "args": {"seqs": len(seqs)}})
        return end

    def _fail(self, now: float, slots, busy, pslots, heap):
        """A stage dies at `now`: steps in flight are lost; all stages wait for the replacement."""
        o, p = self.o, self.p
        role, idx = o.fail_stage
        pipe = self.pipes[role]
        held = sum(r.prompt + r.generated for s in slots for r in s)
        fetch = 0.0
        if o.replicate and role != "prompt":
            bw = p.kv_link_bytes_per_s or p.pcie_bytes_per_s or math.inf
            fetch = held * p.kv_bytes_per_token * pipe.layers[idx] / p.num_layers / bw
        self.recovery_s = o.detect_s + o.restart_s + fetch
        back = now + self.recovery_s
        if o.trace_events:
            self.events.append({"name": "failure + recovery", "ph": "X", "pid": role, "tid": idx, "ts": now * 1e6,
                                "dur": self.recovery_s * 1e6, "args": {"replicate": o.replicate}})
        heap.clear()  # steps in flight never complete
        for q in self.pipes.values():
            q.free = [back] * len(q.free)
        # In-flight prefills (prompt side or ft prefill steps) are redone; admissions in flight too.
        lost = [r for r in self.reqs if r.finish is None and r.arrival <= now and r not in self.waiting
                and not any(r in s for s in slots)]
        for r in lost:
            self.waiting.appendleft(r)
        if role != "prompt" and not o.replicate:  # a dead prompt stage loses only the prompts in flight
            # every request with KV on the failed pipeline restarts from its prompt
            for s in slots:
                for r in s:
                    r.recomputed += r.generated
                    r.restarts += 1
                    r.generated = 0
                    self.waiting.appendleft(r)
                s.clear()
        return [False] * len(busy), [False] * len(pslots), 0

    # ------------------------------------------------------------------ results
    def _report(self, reqs: list[Req]) -> dict:
        done = [r for r in reqs if r.finish is not None]
        if len(done) != len(reqs):
            raise PlanError(f"simulation ended with {len(reqs) - len(done)} requests unfinished")
        start = min(r.arrival for r in reqs)
        makespan = max(r.finish for r in reqs) - start
        tokens = sum(r.output for r in reqs)
        lat = [r.finish - r.arrival for r in reqs]
        ttft = [r.first_token - r.arrival for r in reqs]
        norm = [(r.finish - r.arrival) / r.output for r in reqs]
        machines = self.d.machines
        util = {name: [b / makespan if makespan else 0.0 for b in pipe.busy] for name, pipe in self.pipes.items()}
        out = {"deployment": str(self.d), "machines": machines, "requests": len(reqs), "output_tokens": tokens,
               "makespan_s": makespan, "requests_per_s": len(reqs) / makespan if makespan else math.inf,
               "tokens_per_s": tokens / makespan if makespan else math.inf,
               "latency_s": _pct(lat), "ttft_s": _pct(ttft), "normalized_latency_s": _pct(norm),
               "utilization": util, "steps": self.steps,
               "cost": machines * makespan / 3600 * self.o.gpu_hour_cost,
               "recomputed_tokens": sum(r.recomputed for r in reqs), "restarted_requests": sum(
                   1 for r in reqs if r.restarts), "recovery_s": self.recovery_s}
        if self.o.swap:
            out.update(pcie_s=self.pcie_s, pcie_bound_steps=self.pcie_bound_steps)
        return out


def _pct(xs: list[float]) -> dict:
    s = sorted(xs)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
    return {"p50": q(50), "p95": q(95), "p99": q(99), "mean": sum(s) / len(s)}


def simulate(profile: Profile, deployment: Deployment, lengths: list[tuple[int, int]], rate: float = math.inf,
             opts: SimOptions | None = None, seed: int = 0) -> tuple[dict, list[dict]]:
    sim = Simulator(profile, deployment, opts or SimOptions())
    result = sim.run(workload(lengths, rate, seed))
    return result, sim.events
