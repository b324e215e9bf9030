"""Offline generation with the Python API.

    python examples/generate.py --model smollm2
"""
import argparse

from dejavu import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

llm = LLM(model=args.model, device=args.device)
prompts = ["The capital of France is", "A good name for a cat is", "def fibonacci(n):"]
greedy = llm.generate(prompts, SamplingParams(max_tokens=24))
sampled = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=42))
for p, g, s in zip(prompts, greedy, sampled):
    print(f"--- {p!r}\n greedy : {g.text!r}\n sampled: {s.text!r}")
