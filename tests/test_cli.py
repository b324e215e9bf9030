"""The console script, as a user runs it."""
import json
import os
import subprocess
import sys


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dejavu", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_generate_json():
    r = run("generate", "--model", "random:gpt2-tiny", "--prompt", "hello", "--prompt", "a longer prompt here",
            "--max-tokens", "5", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["hello", "a longer prompt here"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    assert "tok/s" in r.stderr


def test_generate_errors_are_clear():
    r = run("generate", "--model", "random:nope", "--prompt", "x")
    assert r.returncode == 2 and "unknown random model 'nope'" in r.stderr
    r = run("generate", "--model", "random:gpt2-tiny", "--prompt", "x", "--max-tokens", "0")
    assert r.returncode == 2 and "--max-tokens must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
