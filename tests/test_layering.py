"""Layering rules that keep a family in one place and modules small (issue 22):

- outside python/prolora/families/, no code names a model family: no string constant equal to a
  registered family's name or member (docstrings aside), so plan, api, cli, engine, refine, bench
  and the jobs ask the family record instead;
- no module of the package is over 450 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

from prolora import families

ROOT = Path(__file__).resolve().parents[1] / "python" / "prolora"
MAX_LINES = 450


def _names() -> set[str]:
    out = set()
    for fam in families.families():
        out.add(fam.name)
        out.update(fam.members)
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def family_names_outside(root: Path, names: set[str]) -> list[str]:
    """'path:line: "name"' for every string constant equal to a family name outside families/."""
    found = []
    for f in sorted(root.rglob("*.py")):
        if "families" in f.relative_to(root).parts:
            continue
        tree = ast.parse(f.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names \
                    and id(node) not in docs:
                found.append(f"{f.relative_to(root)}:{node.lineno}: {node.value!r}")
    return found


def test_the_scan_finds_a_family_name(tmp_path):
    (tmp_path / "plan.py").write_text('"""flux"""\nif model.family == "flux":\n    pass\n')
    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "flux.py").write_text('FAMILY = "flux"\n')
    assert family_names_outside(tmp_path, {"flux"}) == ["plan.py:2: 'flux'"]


def test_no_family_name_outside_families():
    found = family_names_outside(ROOT, _names())
    assert not found, "family names outside families/ (ask the family record): " + "; ".join(found)


def test_no_module_over_450_lines():
    long = {str(f.relative_to(ROOT)): n for f in ROOT.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_at_least_five_family_packages():
    packages = [p for p in (ROOT / "families").iterdir() if (p / "__init__.py").is_file()]
    assert len(packages) >= 5, packages
    assert len(families.families()) == len(families.PACKAGES) == len(packages)
