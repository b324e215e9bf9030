"""`dejavu bench serve --chaos SECONDS`: faults at random moments under load, checked for exactness.

A failure-free pass of the load gives each request's reference output (greedy). Then, for SECONDS,
the same load runs pass after pass while faults strike the server's processes (same host, pids from
/v1/cluster) at exponentially distributed gaps (--chaos-interval mean): SIGKILL, SIGSTOP (a hung
worker, found by the heartbeat timeout; the controller kills it when it replaces it), `swapin`:
a SIGKILL aimed inside a swap-in (`kill_in_swap_in`), or, in a split deployment (pipeline or
disaggregated `dejavu serve`), `controller` / `controller-stop`: SIGKILL or SIGSTOP of the
controller process, which the front-end replaces by its standby. The faults' moments are random,
so they land in prefills, decodes, swaps and recoveries alike; a seed makes the schedule
repeatable. The report: requests completed and lost, outputs equal to the reference, faults,
recoveries (p50/p99 seconds) and tokens recomputed, controller take-overs, from the server's
/v1/cluster. A pass in which no request completes (the deployment is down) ends the run early.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time

from .serve_client import Target, run_load
from .serve_data import Request
from .serve_failover import _cluster

FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "swapin": signal.SIGKILL,
          "controller": signal.SIGKILL, "controller-stop": signal.SIGSTOP}
CONTROLLER_FAULTS = ("controller", "controller-stop")  # struck at the split deployment's controller process
SWAP_IN_WINDOW_S = 10.0  # how long a swapin fault waits for a swap-in to strike in


def add_chaos_args(p) -> None:
    p.add_argument("--chaos", type=float, default=None, metavar="SECONDS",
                   help="chaos benchmark: for SECONDS, repeat the load while random workers are killed (SIGKILL) "
                        "or hung (SIGSTOP) at random moments; outputs are checked against a failure-free pass")
    p.add_argument("--chaos-interval", type=float, default=3.0, metavar="S",
                   help="mean seconds between faults (exponential gaps; default 3)")
    p.add_argument("--chaos-faults", default="kill,stop",
                   help="fault kinds to draw from: kill, stop, swapin (a kill inside a swap-in copy of a --swap "
                        "deployment's CPU workers), controller, controller-stop (SIGKILL or SIGSTOP of a split "
                        "deployment's controller process; default kill,stop)")


def parse_faults(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULTS]
    if not kinds or bad:
        raise ValueError(f"--chaos-faults takes a comma-separated list of {', '.join(FAULTS)}, got {spec!r}")
    return kinds


def _state(pid: int) -> str | None:
    """The process state letter from /proc (None: gone)."""
    return _state_of(f"/proc/{pid}/stat")


def _state_of(stat: str) -> str | None:
    try:
        with open(stat) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _swap_in_thread(pid: int) -> str | None:
    """/proc directory of a worker's swap-in thread (CPU workers copy on a thread named swap-in_N), or None."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("swap-in"):
                    return f"/proc/{pid}/task/{tid}"
    except OSError:
        pass
    return None


def kill_in_swap_in(pid: int, within: float, rng: random.Random) -> bool:
    """SIGKILL `pid` while its swap-in thread copies: stop the process, look where that thread was
    (in user space: copying; in a system call: waiting for work), kill it if copying, else let it
    run on for a moment and look again; after `within` seconds kill it anyway. True: the kill
    landed inside a copy. (/proc/<tid>/syscall needs ptrace rights: the bench runs where the
    server does, as its parent or the same user without Yama restrictions.)"""
    task = _swap_in_thread(pid)
    deadline = time.monotonic() + within
    copying = False
    while task is not None and not copying and time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(200):  # until the thread has stopped
                if _state_of(task + "/stat") == "T":
                    with open(task + "/syscall") as f:
                        copying = f.read().split()[0] == "-1"
                    break
                time.sleep(0.0002)
        except (OSError, IndexError):
            task = None
        if not copying:
            os.kill(pid, signal.SIGCONT)
            time.sleep(rng.uniform(0.0, 0.001))
    os.kill(pid, signal.SIGKILL)
    return copying


def _live(w: dict, struck: set) -> bool:
    return bool(w.get("pid")) and int(w["pid"]) not in struck and _state(int(w["pid"])) not in (None, "T", "Z")


class Injector:
    """Strikes random live workers (or the controller) until `until` seconds after the pass started."""

    def __init__(self, t: Target, kinds: list[str], interval: float, until: float, seed: int):
        self.t, self.kinds, self.interval, self.until = t, kinds, interval, until
        self.rng = random.Random(seed)
        self.faults: list[dict] = []

    async def run(self, start: float) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.interval))
            now = time.perf_counter() - start
            if now >= self.until:
                return
            cluster = await asyncio.to_thread(_cluster, self.t.url, self.t.headers)
            struck = {f["pid"] for f in self.faults}
            procs = cluster.get("workers", [])  # a split deployment's front-end and controllers are listed too
            live = [w for w in procs if w.get("role") not in ("frontend", "controller", "standby-controller")
                    and _live(w, struck)]
            if not live:
                continue
            w, kind = self.rng.choice(live), self.rng.choice(self.kinds)
            if kind in CONTROLLER_FAULTS:  # the serving controller, once up (not while one takes over)
                ctl = [c for c in procs if c.get("role") == "controller" and c.get("state") == "up" and _live(c, struck)]
                if not ctl:
                    continue
                w = ctl[0]
            fault = {"kind": kind, "worker": w.get("worker"), "pid": int(w["pid"]), "t": now, "at": time.time()}
            try:
                if kind == "swapin":
                    fault["in_copy"] = await asyncio.to_thread(kill_in_swap_in, fault["pid"], SWAP_IN_WINDOW_S,
                                                               self.rng)
                else:
                    os.kill(fault["pid"], FAULTS[kind])
            except OSError:
                continue
            self.faults.append(fault)

    def leftovers(self) -> list[dict]:
        """Hung workers still stopped (never replaced): killed here so none outlives the bench."""
        left = [f for f in self.faults if f["kind"] in ("stop", "controller-stop") and _state(f["pid"]) == "T"]
        for f in left:
            try:
                os.kill(f["pid"], signal.SIGKILL)
            except OSError:
                pass
        return left


def _exact(ref: list[dict], got: list[dict]) -> tuple[int, int]:
    """(completed requests whose output equals the reference's, completed requests)."""
    done = [(a, b) for a, b in zip(ref, got) if b.get("ok")]
    return sum(a.get("ok") and a.get("output") == b.get("output") for a, b in done), len(done)


def run_chaos(t: Target, requests: list[Request], rate: float, seconds: float, interval: float, kinds: list[str],
              seed: int = 0, burstiness: float = 1.0, max_concurrency: int | None = None) -> dict:
    from .serve import percentiles

    if not seconds > 0:
        raise ValueError(f"--chaos must be > 0 seconds, got {seconds}")
    if not interval > 0:
        raise ValueError(f"--chaos-interval must be > 0, got {interval}")
    load = dict(seed=seed, burstiness=burstiness, max_concurrency=max_concurrency)
    if any(k in CONTROLLER_FAULTS for k in kinds) and not any(
            w.get("role") == "controller" for w in _cluster(t.url, t.headers).get("workers", [])):
        raise ValueError("--chaos-faults controller / controller-stop need a split deployment (a pipeline or "
                         "disaggregated `dejavu serve`): /v1/cluster lists no controller")
    ref, ref_s = asyncio.run(run_load(t, requests, rate, **load))
    if not all(r.get("ok") for r in ref):
        raise RuntimeError(f"the failure-free pass failed: {sorted({r.get('error') for r in ref if not r.get('ok')})[:3]}")
    ft0 = _cluster(t.url, t.headers).get("fault_tolerance", {})
    before, restarts0 = len(ft0.get("recoveries", [])), len(ft0.get("controller_restarts", []))
    inj = Injector(t, kinds, interval, seconds, seed)

    async def chaos():
        start = time.perf_counter()
        strike = asyncio.create_task(inj.run(start))
        passes = []
        while time.perf_counter() - start < seconds or not passes:
            passes.append((await run_load(t, requests, rate, **load))[0])
            if not any(r.get("ok") for r in passes[-1]):
                break  # the deployment is down: more passes would only count the same failure again
        strike.cancel()
        await asyncio.gather(strike, return_exceptions=True)
        return passes, time.perf_counter() - start

    passes, duration = asyncio.run(chaos())
    left = inj.leftovers()
    ft = _cluster(t.url, t.headers).get("fault_tolerance", {})
    events = ft.get("recoveries", [])[before:]
    takeovers = ft.get("controller_restarts", [])[restarts0:]
    replaced = {r["old_pid"] for r in takeovers}
    records = [r for p in passes for r in p]
    exact = completed = 0
    for p in passes:
        e, c = _exact(ref, p)
        exact, completed = exact + e, completed + c
    return {"url": t.url, "seconds": duration, "passes": len(passes), "requests": len(records),
            "completed": completed, "lost": len(records) - completed, "exact": exact,
            "errors": sorted({r["error"] for r in records if not r.get("ok")})[:5],
            "faults": inj.faults, "never_replaced": [f["worker"] for f in left],
            "recoveries": len(events), "recovery_s": percentiles([e["total_s"] for e in events]),
            "recomputed_tokens": sum(e.get("recomputed_tokens", 0) for e in events),
            "controller_takeovers": len(takeovers), "takeover_s": percentiles([r["restart_s"] for r in takeovers]),
            "controllers_not_replaced": [f["pid"] for f in inj.faults
                                         if f["kind"] in CONTROLLER_FAULTS and f["pid"] not in replaced],
            "output_tokens": sum(r["output_tokens"] for r in records if r.get("ok")),
            "throughput_output_tokens_per_s": sum(r["output_tokens"] for r in records if r.get("ok")) / duration,
            "baseline_throughput_output_tokens_per_s": sum(r["output_tokens"] for r in ref) / ref_s}


def format_chaos(r: dict) -> str:
    kinds = {}
    for f in r["faults"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    rs = r["recovery_s"]
    in_copy = sum(bool(f.get("in_copy")) for f in r["faults"])
    lines = [f"chaos: {r['seconds']:.1f}s, {r['passes']} passes, faults "
             f"{', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'}"
             + (f" ({in_copy} inside a swap-in copy)" if "swapin" in kinds else ""),
             f"  requests: {r['completed']}/{r['requests']} completed, {r['lost']} lost; "
             f"{r['exact']}/{r['completed']} outputs equal to the failure-free pass",
             f"  recoveries: {r['recoveries']}" + (f", p50 {rs['p50']:.2f}s, p99 {rs['p99']:.2f}s" if rs["p50"] is not None
                                                   else "") + f"; {r['recomputed_tokens']} tokens recomputed"]
    lines.append(f"  throughput {r['throughput_output_tokens_per_s']:.1f} output tok/s under chaos, "
                 f"{r['baseline_throughput_output_tokens_per_s']:.1f} in the failure-free pass")
    if r.get("controller_takeovers"):
        ts = r["takeover_s"]
        lines.append(f"  controller take-overs: {r['controller_takeovers']}, p50 {ts['p50']:.2f}s, p99 {ts['p99']:.2f}s")
    if r.get("controllers_not_replaced"):
        lines.append(f"  controllers struck but never replaced: {', '.join(map(str, r['controllers_not_replaced']))}")
    if r["never_replaced"]:
        lines.append(f"  hung workers never replaced: {', '.join(map(str, r['never_replaced']))}")
    if r["errors"]:
        lines.append(f"  errors: {'; '.join(r['errors'])}")
    return "\n".join(lines)


def chaos_ok(r: dict) -> bool:
    return (r["lost"] == 0 and r["exact"] == r["completed"] and not r["never_replaced"]
            and not r.get("controllers_not_replaced"))
