"""`dejavu plan`: how many machines for prompt and token work, and whether to disaggregate.

For D machines (each with `memory` bytes), a microbatch of b requests with P prompt and N output
tokens: the memory-driven minimum depths (weights share + KV share per stage), the closed-form
inverse throughput of the FT pipeline and of every feasible disaggregated split (section 4.2.1 of
the paper), the balanced split, the win condition, then each feasible candidate simulated on the
workload; the choice is the best simulated throughput (the closed form ranks ties).
"""
from __future__ import annotations

import json
import math

from .model import (PlanError, Profile, balanced_split, disagg_inverse_throughput, disagg_threshold,
                    ft_inverse_throughput, min_depth)
from .simulator import simulate
from .workload import Deployment, SimOptions


def plan(profile: Profile, machines: int, microbatch: int, prompt_len: int, output_len: int, m: float = 1.0,
         memory: int | None = None, requests: int = 0, simulate_candidates: bool = True) -> dict:
    if machines <= 0:
        raise PlanError(f"--machines must be > 0, got {machines}")
    if microbatch <= 0 or prompt_len <= 0 or output_len <= 0:
        raise PlanError("microbatch, prompt length and output length must be > 0")
    if not 1.0 <= m < 2.0:
        raise PlanError(f"m (prompt-side cost factor of disaggregation) must be in [1, 2), got {m}")
    if machines > profile.num_layers:
        raise PlanError(f"{machines} machines for a {profile.num_layers}-layer model: a stage needs a layer")
    mem = profile.memory_bytes if memory is None else memory
    D, b, P, N = machines, microbatch, prompt_len, output_len
    ctx = P + N / 2  # mean context of a decode step
    Y = profile.prompt_time(D, b, P)
    t = profile.token_time(D, b, ctx)
    reasons = []
    d_ft = min_depth(profile.weight_bytes, profile.kv_bytes_per_token, b, P + N, mem)
    d_prompt = min_depth(profile.weight_bytes, profile.kv_bytes_per_token, b, P, mem)
    d_token = min_depth(profile.weight_bytes, profile.kv_bytes_per_token, b, P + N, mem)
    if d_ft > D:
        raise PlanError(f"infeasible: the weights and a microbatch's KV need at least {d_ft} machines of "
                        f"{mem / 2**30:.1f} GiB, only {D} given")
    thr = disagg_threshold(D, m)
    ft_inv = ft_inverse_throughput(Y, t, N, D)
    cands = [{"deployment": f"ft:{D}", "closed_form_s": ft_inv, "closed_form_tokens_per_s": b * N / ft_inv}]
    for dp in range(d_prompt, D - d_token + 1):
        inv = disagg_inverse_throughput(Y, t, N, D, dp, D - dp, m)
        cands.append({"deployment": f"disagg:{dp}+{D - dp}", "closed_form_s": inv,
                      "closed_form_tokens_per_s": b * N / inv})
    if len(cands) == 1:
        reasons.append(f"no disaggregated split fits: prompt side needs >= {d_prompt} and token side >= {d_token} "
                       f"machines of {D}")
    if simulate_candidates:
        n = requests or max(4 * D * b, 32)
        for c in cands:
            r, _ = simulate(profile, Deployment.parse(c["deployment"]), [(P, N)] * n,
                            opts=SimOptions(microbatch=b, m=m, receive_slots=2 * D * b))
            c["simulated_tokens_per_s"] = r["tokens_per_s"]
            c["simulated_latency_p50_s"] = r["latency_s"]["p50"]
    key = "simulated_tokens_per_s" if simulate_candidates else "closed_form_tokens_per_s"
    best = max(cands, key=lambda c: (c[key], c["closed_form_tokens_per_s"]))
    bal = balanced_split(Y, t, N, D, m)
    reasons.append(f"Y/t = {Y / t:.2f} (Y = {Y * 1e3:.3f} ms, t = {t * 1e3:.3f} ms per stage at depth {D}); "
                   f"disaggregation wins when Y/t > {thr:.2f}" + (" (never at this m)" if math.isinf(thr) else ""))
    reasons.append(f"balanced split: Dp = {bal:.2f} of {D}")
    reasons.append(f"chosen {best['deployment']}: {best[key]:.1f} tok/s "
                   f"({'simulated' if simulate_candidates else 'closed form'}); FT pipeline "
                   f"{cands[0][key]:.1f} tok/s")
    out = {"profile_model": profile.model, "machines": D, "microbatch": b, "prompt_len": P, "output_len": N, "m": m,
           "memory_bytes": mem, "Y_s": Y, "t_s": t, "ratio": Y / t, "threshold": thr if math.isfinite(thr) else None,
           "disaggregation_wins": Y / t > thr, "balanced_prompt_stages": bal,
           "min_depth": {"ft": d_ft, "prompt": d_prompt, "token": d_token},
           "candidates": cands, "choice": best["deployment"], "reasons": reasons}
    dep = Deployment.parse(best["deployment"])
    out["serve_args"] = ({"pp": dep.stages} if dep.mode == "ft" else
                         {"prompt_stages": dep.prompt_stages, "token_stages": dep.token_stages})
    out["serve_args"]["microbatch_size"] = b
    return out


def explicit_profile(Y: float, t: float, num_layers: int, weight_bytes: int, kv_bytes_per_token: int,
                     depth: int) -> Profile:
    """A profile from hand-given stage times of a whole microbatch at `depth` (proportional to the
    layers a stage holds; the same for any batch and length)."""
    from .model import Fit

    if Y <= 0 or t <= 0:
        raise PlanError(f"Y and t must be > 0, got {Y} and {t}")
    per = num_layers / depth  # the times were for this many layers
    return Profile(model="explicit", device="n/a", num_layers=num_layers, weight_bytes=weight_bytes,
                   kv_bytes_per_token=kv_bytes_per_token,
                   prompt_one=Fit(Y / per, 0.0, 0.0), prompt_all=Fit(Y * num_layers / per, 0.0, 0.0),
                   token_one=Fit(t / per, 0.0, 0.0), token_all=Fit(t * num_layers / per, 0.0, 0.0))


def load_choice(path: str) -> dict:
    """The serve arguments `dejavu plan --json` chose."""
    try:
        with open(path) as f:
            d = json.load(f)
        args = d["serve_args"]
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PlanError(f"{path} is not a plan written by `dejavu plan --json`") from None
    allowed = {"pp", "prompt_stages", "token_stages", "microbatch_size"}
    if not isinstance(args, dict) or not set(args) <= allowed or not all(
            isinstance(v, int) and v > 0 for v in args.values()):
        raise PlanError(f"{path}: serve_args must map {sorted(allowed)} to positive integers")
    return args
