"""Pipeline and tensor parallelism from Python: 2 stages x 2 shards on this machine.

    python examples/pipeline.py --model smollm2
"""
import argparse

from dejavu import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--pp", type=int, default=2)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--launcher", default="local", choices=["local", "mpirun"])
args = parser.parse_args()

with LLM(model=args.model, pp=args.pp, tp=args.tp, launcher=args.launcher, microbatch_size=2) as llm:
    for w in llm.engine.cluster():
        print("worker", w)
    outs = llm.generate(["The capital of France is", "Water boils at"], SamplingParams(max_tokens=16))
    for o in outs:
        print(repr(o.prompt), "->", repr(o.text))
