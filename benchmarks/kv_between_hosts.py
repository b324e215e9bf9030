"""KV streamed between two network-namespace hosts (DéjàVuLib's TCP destination) against a raw
socket copy of the same bytes between the same namespaces, in the same run. Needs root and iproute2
(the hosts come from tests/netns.py). The roles are python/dejavu/bench/kvhosts.py's.

    python benchmarks/kv_between_hosts.py [--total-mib 128] [--repeat 5] [--rate 1gbit] [--json FILE]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import netns  # noqa: E402

from dejavu.bench import write_json  # noqa: E402
from dejavu.kvstream.transports import new_cluster_token  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total-mib", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rate", default=None, help="shape the sender's link with tbf (e.g. 1gbit); default unshaped")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cluster = netns.bench_cluster(2, "kv_between_hosts")
    if cluster is None:
        return 2
    env = dict(os.environ, DEJAVU_CLUSTER_TOKEN=new_cluster_token(), PYTHONUNBUFFERED="1")
    try:
        a_host, b_host = cluster[0], cluster[1]
        if a.rate:
            a_host.rate_limit(a.rate, burst="256kb")
        recv = b_host.popen([sys.executable, "-m", "dejavu.bench.kvhosts", "recv", "--bind", b_host.addr],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ports = json.loads(recv.stdout.readline())
        r = a_host.run([sys.executable, "-m", "dejavu.bench.kvhosts", "send", "--peer", b_host.addr,
                        "--kv-port", str(ports["kv_port"]), "--raw-port", str(ports["raw_port"]),
                        "--total-mib", str(a.total_mib), "--repeat", str(a.repeat)], env=env, timeout=1800)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        result = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        cluster.close()
    result.update({"cpu": f"{netns.cpu_model()} ({os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
                   "link": f"veth + bridge between network namespaces{', tbf ' + a.rate if a.rate else ''}"})
    print(f"KV between namespace hosts on {result['cpu']}, {result['date']}; {result['link']}; cache "
          f"{result['layers']} layers x {result['kv_heads']} KV heads x {result['head_dim']}, fp16, "
          f"{result['block_tokens']}-token blocks; ratio = median over rounds of raw time / DéjàVuLib time")
    print(f"{'puts':>9} {'MiB':>6} {'spans':>6} {'DéjàVuLib GB/s':>15} {'raw GB/s':>9} {'ratio':>6}")
    for row in result["rows"]:
        print(f"{row['mode']:>9} {row['bytes'] >> 20:>6} {row['spans']:>6} {row['dejavulib_GBps']:>15.2f} {row['raw_GBps']:>9.2f} "
              f"{row['ratio']:>6.2f}")
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
