"""The controller of a multi-host test (tests/test_multihost.py), run inside a namespace host.

    multihost_controller.py HOST:PORT JSON

JSON: LLM() arguments (launcher external unless given; cluster_address HOST:PORT added here) and "pause_at":
after that many engine steps it prints "paused" and waits for a line on stdin (the test breaks a
host meanwhile); "hold_after_recovery": once a recovery happened it prints "recovered" and waits
for a line again (the test heals the partition meanwhile). It prints "ready" once the workers are up, then one line of JSON: every request's
output token ids, the recoveries and where each rank ended up. The cluster token comes from
$DEJAVU_CLUSTER_TOKEN, as for the workers.
"""
import json
import sys

from dejavu import LLM, SamplingParams

PROMPTS = [[5, 6, 7], [9] * 10, list(range(1, 14)), [100], list(range(200, 231)), [7] * 20]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def main() -> None:
    address, kw = sys.argv[1], json.loads(sys.argv[2])
    pause_at = kw.pop("pause_at", None)
    hold = kw.pop("hold_after_recovery", False)
    kw.setdefault("launcher", "external")
    llm = LLM(model="random:llama-tiny", device="cpu", block_size=4, cluster_address=address, **kw)
    eng = llm.engine
    print("ready", flush=True)
    seqs = [eng.add_request(p, PARAMS) for p in PROMPTS]
    steps = 0
    while eng.has_unfinished():
        if steps == pause_at:
            print("paused", flush=True)
            sys.stdin.readline()
        eng.step()
        steps += 1
        if hold and eng.recovery.failures:
            hold = False
            print("recovered", flush=True)
            sys.stdin.readline()
    out = {"tokens": [s.output_ids for s in seqs], "recoveries": eng.fault_tolerance()["recoveries"],
           "workers": {r: {k: i.get(k) for k in ("addr", "host_id", "local_rank", "pid")}
                       for r, i in eng.worker_info.items()},
           "transports": sorted(getattr(eng, "transports_used", ()))}
    print(json.dumps(out), flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
