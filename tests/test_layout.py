"""One concept per file, read top to bottom: no module under python/ over 400 lines, no class over
300 (docs/ARCHITECTURE.md)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "python"
MODULE_LINES, CLASS_LINES = 400, 300


def sizes(root: pathlib.Path = ROOT):
    """(modules over MODULE_LINES, classes over CLASS_LINES), each as 'path[:Class] lines'."""
    modules, classes = [], []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        rel = path.relative_to(root)
        n = len(src.splitlines())
        if n > MODULE_LINES:
            modules.append(f"{rel} {n}")
        for node in ast.walk(ast.parse(src, str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                classes.append(f"{rel}:{node.name} {node.end_lineno - node.lineno + 1}")
    return modules, classes


def test_no_module_over_400_lines_and_no_class_over_300():
    modules, classes = sizes()
    assert not modules, f"modules over {MODULE_LINES} lines: {modules}"
    assert not classes, f"classes over {CLASS_LINES} lines: {classes}"


def test_the_scan_sees_oversized_modules_and_classes(tmp_path):
    (tmp_path / "big.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    (tmp_path / "fat.py").write_text("class Fat:\n" + "    a = 1\n" * CLASS_LINES)
    (tmp_path / "ok.py").write_text("class Ok:\n" + "    a = 1\n" * (CLASS_LINES - 1))
    modules, classes = sizes(tmp_path)
    assert modules == [f"big.py {MODULE_LINES + 1}"]
    assert classes == [f"fat.py:Fat {CLASS_LINES + 1}"]
