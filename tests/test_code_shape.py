"""The shape rules the code keeps (docs/design.md §Architecture): functions a reader can hold in
one sitting where the analysis, the dashboard and the training loop live; every `# noqa` says
why; and the linter configured in pyproject.toml passes."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
SHORT_FUNCTIONS = ["probes", "dashboard", "rsr_model/train.py"]


def long_functions(paths: list[Path], root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for every function or method longer than `limit` lines."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def python_files(*where: str) -> list[Path]:
    out = []
    for w in where:
        p = ROOT / w
        out += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return out


def test_no_long_functions():
    found = long_functions(python_files(*SHORT_FUNCTIONS))
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines (split them into labelled phases):\n"
                       + "\n".join(found))


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    found = long_functions([tmp_path / "m.py"], root=tmp_path)
    assert found == [f"m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")


def test_every_noqa_says_why():
    """`# noqa: F401 -- re-exported for ...`: a suppression without a reason hides a decision."""
    bare = []
    for path in python_files("cli_common", "traces", "rsr_model", "probes", "evaluation", "dashboard",
                             "benchmarks", "tests"):
        if path.name == "test_code_shape.py":
            continue  # this file names the rule
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = NOQA.search(line)
            if m and not re.match(r":\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*\s+(--|—)\s*\S", m.group("rest")):
                bare.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bare, "`# noqa` without `: CODE -- reason`:\n" + "\n".join(bare)


def test_linter_passes():
    """ruff with the configuration in pyproject.toml (installed by the test extra)."""
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]' (scripts/setup.sh does)")
    run = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
