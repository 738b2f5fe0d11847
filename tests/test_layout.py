"""The layout shows the pipeline (issue 13): packages for files, the objective, the algorithms,
the runtime and the command line; no module imports a private name from another package; the
README's tree names every package and top-level module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hesscli"


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts)
    return ".".join(parts[:-1])


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("hesscli"):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node.lineno, "." * node.level + (node.module or ""), None


def test_no_private_name_crosses_a_package():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mine = _package_of(path)
        for line, module, name in _imports(path):
            if module.startswith("."):
                bad.append(f"{path.relative_to(ROOT)}:{line}: relative import {module}")
                continue
            theirs = module if (ROOT / Path(*module.split("."))).is_dir() else module.rpartition(".")[0]
            if name and name.startswith("_") and not name.startswith("__") and theirs != mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} from {module}")
    assert not bad, "\n".join(bad)


def test_readme_tree_matches_the_layout():
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("## How it works"):]
    tree = tree[tree.index("```") + 3 :]
    tree = tree[: tree.index("```")]
    named = set(re.findall(r"[├└]── ([\w.]+/?)", tree))
    packages = {p.name + "/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert named == packages | modules


def test_each_package_has_a_docstring():
    for init in PKG.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), init
