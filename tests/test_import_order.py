"""Packages only look down: every import in the tree, lazy ones inside functions included,
is checked against one declared order (docs/design.md §Architecture).

A library module of a package may import its own package and the packages below it in
`LAYERS`. A package's `__main__` is a command, not a library: it may import any package, and
no library module may import it. `benchmarks` (like the tests) sits above everything and may
run a command in-process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: each may import only itself and what stands before it.
LAYERS = ["cli_common", "traces", "rsr_model", "probes", "evaluation", "dashboard", "benchmarks"]


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a file, at any depth (function bodies too)."""
    here = list(path.relative_to(root).parent.parts)  # the package the file is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from pkg import __main__` names the command module through an alias
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if a.name == "__main__"]
    return out


def violations(root: Path = ROOT, layers: list[str] = LAYERS) -> list[str]:
    """One line per import that runs up the declared order, or that imports a `__main__`."""
    rank = {p: i for i, p in enumerate(layers)}
    found = []
    for package in layers:
        for path in sorted((root / package).rglob("*.py")):
            is_command = path.name == "__main__.py"
            for line, name in imported_modules(path, root):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{line}: imports {name}"
                if "__main__" in name.split(".") and package != "benchmarks":
                    found.append(f"{where} (a command module; move what it shares into a library module)")
                elif top in rank and rank[top] > rank[package] and not is_command:
                    found.append(f"{where} ({top} stands above {package} in {layers})")
    return found


def test_packages_only_look_down():
    found = violations()
    assert not found, "imports that run up the declared order:\n" + "\n".join(found)


def test_every_package_is_declared():
    """A new top-level package must take its place in LAYERS, or its imports go unchecked."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS), f"declare {sorted(packages - set(LAYERS))} in LAYERS"


@pytest.mark.parametrize("source, culprit", [
    ("def f():\n    from probes.stats import gate_entropy\n", "probes.stats"),  # lazy, inside a function
    ("import dashboard.app\n", "dashboard.app"),
    ("from ...evaluation import table\n", "evaluation"),  # relative, out of rsr_model
    ("from rsr_model.__main__ import build_parser\n", "rsr_model.__main__"),
    ("from rsr_model import __main__\n", "rsr_model.__main__"),
])
def test_the_check_sees_back_imports(tmp_path, source, culprit):
    """The checker on a tree made here: each kind of back-import is caught and named by its line."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "rsr_model" / "sub").mkdir()
    (tmp_path / "rsr_model" / "sub" / "__init__.py").write_text("")
    bad = tmp_path / "rsr_model" / "sub" / "mod.py"
    bad.write_text("import numpy\nfrom traces import open_trace\n" + source)
    found = violations(tmp_path)
    line = 3 + source.count("\n") - 1  # the culprit is the source's last line
    assert len(found) == 1 and culprit in found[0] and f"rsr_model/sub/mod.py:{line}:" in found[0], found


def test_commands_may_import_any_package(tmp_path):
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "rsr_model" / "__main__.py").write_text("from evaluation import cli\n")
    assert violations(tmp_path) == []
