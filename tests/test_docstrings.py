"""Docstrings say what, how and limits: no internal issue numbers and no "on this CPU" results
(measurements live in bench/results/ and the NOTES.md files)."""

import ast
import doctest
import re
from pathlib import Path

import kvkit.policies

ROOT = Path(__file__).resolve().parents[1]
LAB_NOTEBOOK = re.compile(r"\bissue \d+|\bissue #\d+|\bon this (?:CPU|machine|host)\b", re.I)


def docstrings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if (doc := ast.get_docstring(node)) is not None:
                yield getattr(node, "name", "module"), doc


def test_no_docstring_reads_as_a_lab_notebook():
    found = [f"{path.relative_to(ROOT)}:{name}: {m.group(0)!r}"
             for folder in ("kvkit", "integrations", "triton_kernels") for path in sorted((ROOT / folder).rglob("*.py"))
             for name, doc in docstrings(path) for m in LAB_NOTEBOOK.finditer(doc)]
    assert found == []


def test_policies_package_docstring_runs():
    assert doctest.testmod(kvkit.policies).failed == 0
