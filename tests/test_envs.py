"""Every DEJAVU_* environment variable the code reads is in the registry (python/dejavu/envs.py),
and docs/envs.md shows the registry as it is."""
import pathlib
import re

from dejavu.envs import VARS, markdown_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Build-system options and C++ macros share the prefix but are not environment variables.
NOT_ENV = {"DEJAVU_WITH_CUDA", "DEJAVU_PYTHON", "DEJAVU_BUILD_TESTS", "DEJAVU_HEAD_DIMS", "DEJAVU_HEAD_DIM_IS",
           "DEJAVU_HEAD_DIM_CASE", "DEJAVU_HOST_DEVICE"}


def test_every_variable_in_the_code_is_registered():
    names = set()
    for folder, pattern in (("python", "*.py"), ("csrc", "*.*"), ("benchmarks", "*.*"), ("examples", "*.*")):
        for f in (ROOT / folder).rglob(pattern):
            names |= set(re.findall(r"DEJAVU_[A-Z0-9_]*[A-Z0-9]", f.read_text(errors="replace")))
    assert names, "no DEJAVU_ names found: the scan is broken"
    missing = sorted(names - NOT_ENV - set(VARS))
    assert not missing, f"DEJAVU_* names used in the code but not in dejavu/envs.py: {missing}"
    unused = sorted(set(VARS) - names)
    assert not unused, f"registered but never read: {unused}"


def test_docs_show_the_registry():
    assert markdown_table() in (ROOT / "docs" / "envs.md").read_text()
