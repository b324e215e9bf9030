"""Summarise Chrome traces from torch.profiler (e.g. `dejavu bench kvpeer --trace-dir`): per trace,
the GPU kernels in time order (stream, start, duration), busy time per kernel family, and how much
of the NCCL kernels' time overlaps the other kernels'.

    python benchmarks/trace_overlap.py DIR_OR_FILES... [--rows 24]
"""
import argparse
import glob
import json
import os


def _union(iv):
    out = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _overlap(a, b):
    a, b = _union(a), _union(b)
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        tot += max(0.0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def summarise(path, rows):
    ev = json.load(open(path))
    ev = ev.get("traceEvents", ev)
    k = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not k:
        print(f"{path}: no kernels")
        return
    t0 = min(e["ts"] for e in k)
    k.sort(key=lambda e: e["ts"])
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in k if "nccl" in e["name"].lower()]
    other = [(e["ts"], e["ts"] + e["dur"]) for e in k if "nccl" not in e["name"].lower()]
    span = max(e["ts"] + e["dur"] for e in k) - t0
    busy_n = sum(e - s for s, e in _union(nccl))
    busy_o = sum(e - s for s, e in _union(other))
    print(f"{os.path.basename(path)}: span {span:.0f} us, NCCL busy {busy_n:.0f} us, other kernels busy {busy_o:.0f} us, "
          f"overlap {_overlap(nccl, other):.0f} us, {len(k)} kernels")
    for e in k[:rows]:
        print(f"   s{e.get('args', {}).get('stream', '?'):<4} {e['ts'] - t0:9.1f} +{e['dur']:8.1f}  {e['name'][:70]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--rows", type=int, default=24)
    a = ap.parse_args()
    files = []
    for p in a.paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    for f in files:
        summarise(f, a.rows)


if __name__ == "__main__":
    main()
