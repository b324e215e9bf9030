"""`dejavu bench serve` against one deployment on one host and the same deployment spread over
network-namespace hosts, in the same run: same load, same seed. Needs root and iproute2 (the hosts
come from tests/netns.py).

    python benchmarks/serve_across_hosts.py [--deploy "--model random:llama-tiny --device cpu"] [--pp 2]
        [--num-requests 16] [--input-len 64] [--output-len 64] [--rounds 3] [--json FILE]

Host 0 holds the HTTP server with its controller, and the load generator in both layouts. "one host":
`dejavu serve --pp N` starts its N stage workers beside it (loopback). "across hosts": `dejavu serve
--launcher external --cluster-address` on host 0, and `dejavu worker --controller` for stage i on host
i+1, so every hidden state crosses the bridge twice per step. Both deployments are up at once and
the loads alternate between them (a warm-up request each first), so load from other jobs on the
machine falls on both alike; each figure is the median over rounds, the ratio across / one host.
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import netns  # noqa: E402

from dejavu.bench import write_json  # noqa: E402
from dejavu.kvstream.transports import new_cluster_token  # noqa: E402

DJV = [sys.executable, "-m", "dejavu"]
METRICS = [("output_throughput", "tok/s"), ("mean_ttft_ms", "TTFT mean ms"), ("median_ttft_ms", "TTFT p50 ms"),
           ("mean_itl_ms", "ITL mean ms"), ("median_itl_ms", "ITL p50 ms")]


def wait_ready(host, url: str, proc, log: str, timeout: float = 300) -> None:
    """Until the server at `url` answers /v1/models (asked from inside `host`)."""
    probe = [sys.executable, "-c", f"import urllib.request as u; u.urlopen({url + '/v1/models'!r}, timeout=2)"]
    deadline = time.monotonic() + timeout
    while host.run(probe, timeout=30).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not come up (exit {proc.poll()}); its log:\n"
                               + open(log).read()[-4000:])
        time.sleep(1)


def deploy(cluster, layout: str, a, port: int, env: dict, tmp: str) -> str:
    """Start `layout`'s deployment; returns its URL once it answers."""
    h0 = cluster[0]
    log = os.path.join(tmp, f"{layout.replace(' ', '_')}.log")
    cmd = DJV + ["serve", *shlex.split(a.deploy), "--pp", str(a.pp), "--host", h0.addr, "--port", str(port)]
    if layout == "across hosts":
        cmd += ["--launcher", "external", "--cluster-address", f"{h0.addr}:{port + 100}"]
    server = h0.popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    if layout == "across hosts":
        for rank in range(a.pp):
            cluster[rank + 1].popen(DJV + ["worker", "--controller", f"{h0.addr}:{port + 100}", "--rank", str(rank)],
                                    stdout=open(os.path.join(tmp, f"worker{rank}.log"), "w"),
                                    stderr=subprocess.STDOUT, env=env)
    url = f"http://{h0.addr}:{port}"
    wait_ready(h0, url, server, log)
    return url


def load(host, url: str, a, n: int, env: dict, path: str) -> dict:
    r = host.run(DJV + ["bench", "serve", "--url", url, "--num-requests", str(n), "--random-input-len",
                        str(a.input_len), "--random-output-len", str(a.output_len), "--seed", str(a.seed),
                        "--disable-tqdm", "--json", path], env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"dejavu bench serve against {url} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(path) as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deploy", default="--model random:llama-tiny --device cpu",
                   help="`dejavu serve` flags of both deployments (besides --pp, --host, --port, --launcher)")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages: one worker each (one host each when spread)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="loads per deployment, alternating")
    p.add_argument("--port", type=int, default=28000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cluster = netns.bench_cluster(a.pp + 1, "serve_across_hosts")
    if cluster is None:
        return 2
    env = dict(os.environ, DEJAVU_CLUSTER_TOKEN=new_cluster_token(), PYTHONUNBUFFERED="1")
    layouts = ["one host", "across hosts"]
    runs: dict[str, list[dict]] = {k: [] for k in layouts}
    with tempfile.TemporaryDirectory(prefix="serve_hosts") as tmp:
        try:
            urls = {k: deploy(cluster, k, a, a.port + i, env, tmp) for i, k in enumerate(layouts)}
            for k in layouts:  # warm-up: first-request costs stay out of the figures
                load(cluster[0], urls[k], a, 1, env, os.path.join(tmp, "warm.json"))
            for r in range(a.rounds):
                for k in layouts if r % 2 == 0 else layouts[::-1]:
                    runs[k].append(load(cluster[0], urls[k], a, a.num_requests, env, os.path.join(tmp, "run.json")))
            cluster.stop_procs(signal.SIGTERM, wait=20)  # a clean stop first, so nothing is left behind in /dev/shm
        finally:
            cluster.close()
    result = {"date": datetime.date.today().isoformat(), "deploy": f"{a.deploy} --pp {a.pp}",
              "cpu": f"{netns.cpu_model()} ({os.cpu_count()} cores)",
              "load": {"requests": a.num_requests, "input_len": a.input_len, "output_len": a.output_len,
                       "seed": a.seed, "rounds": a.rounds},
              "layouts": {k: {m: statistics.median(x[m] for x in v) for m, _ in METRICS} for k, v in runs.items()},
              "rounds": {k: [{m: x[m] for m, _ in METRICS} for x in v] for k, v in runs.items()}}
    one, across = result["layouts"]["one host"], result["layouts"]["across hosts"]
    result["ratio"] = {m: across[m] / one[m] for m, _ in METRICS}
    print(f"{result['deploy']} on {result['cpu']}, {result['date']}; {a.num_requests} requests of {a.input_len} "
          f"prompt / {a.output_len} output tokens, seed {a.seed}, medians of {a.rounds} alternating rounds")
    print(f"{'':>13}" + "".join(f"{label:>14}" for _, label in METRICS))
    for k in layouts:
        print(f"{k:>13}" + "".join(f"{result['layouts'][k][m]:>14.1f}" for m, _ in METRICS))
    print(f"{'ratio':>13}" + "".join(f"{result['ratio'][m]:>14.2f}" for m, _ in METRICS))
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
