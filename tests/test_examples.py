"""Every shell script the project ships parses (bash -n), so a typo cannot hide in an example."""
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for d in ("examples", "benchmarks", ".ci") for p in (ROOT / d).glob("*")
                 if p.is_file() and (p.suffix == ".sh" or p.read_text(errors="replace").startswith("#!/usr/bin/env bash")))


def test_scripts_were_found():
    assert any(p.name == "mpirun_pipeline.sh" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, f"{script}: {r.stderr}"
