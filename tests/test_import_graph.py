"""DéjàVuLib (dejavu.kvstream) is the bottom floor: nothing in it may import the floors above it."""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "python" / "dejavu"
ABOVE = ("engine", "models", "serving", "parallel", "cluster", "server", "cli", "bench", "planner")
FORBIDDEN = tuple(f"dejavu.{name}" for name in ABOVE)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module `path` imports (relative imports resolved; `from X import name` counts as both
    X and X.name, since name may be a module), with the line it is on."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(path: pathlib.Path) -> list[str]:
    return [f"{path.relative_to(ROOT.parent)}:{line} imports {mod}" for line, mod in imports_of(path)
            if ".".join(mod.split(".")[:2]) in FORBIDDEN]


def test_kvstream_imports_nothing_above_it():
    files = sorted((ROOT / "kvstream").rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    bad = [b for f in files for b in forbidden_imports(f)]
    assert not bad, "DéjàVuLib must not import the floors above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "from ..parallel.wire import recv_exact\n",
    "from .. import engine\n",
    "import dejavu.serving.worker\n",
    "def f():\n    from ..models import registry\n",
    "import importlib\nimportlib.import_module('dejavu.cluster.placement')\n",
])
def test_the_check_catches_each_form_of_import(tmp_path, source, monkeypatch):
    pkg = tmp_path / "dejavu" / "kvstream"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "dejavu")
    assert forbidden_imports(pkg / "x.py")


def test_the_check_allows_the_floor_itself_and_the_core(tmp_path, monkeypatch):
    pkg = tmp_path / "dejavu" / "kvstream"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from .. import _C\nfrom .net import listen\nimport socket\n"
                              "from ..kvstream.auth import derive_key\nimport enginex\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "dejavu")
    assert forbidden_imports(pkg / "x.py") == []
