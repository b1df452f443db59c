"""The dashboard's own plotly.js bundle (dashboard/assets/plotly-dashboard.min.js, built by
scripts/plotly_bundle/build.sh): the plotly.js of the installed Python plotly, and every trace type
the Python code builds. The browser side (the page loads this bundle and not the full plotly.min.js,
and draws a Sankey and a WebGL scatter with it) is `test_browser_uses_the_dashboard_bundle` in
tests/test_dashboard.py."""

import ast
import re
from pathlib import Path

import plotly.graph_objects as go
from plotly.basedatatypes import BaseTraceType
from plotly.offline import get_plotlyjs_version

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "dashboard" / "assets" / "plotly-dashboard.min.js"
ENTRY = ROOT / "scripts" / "plotly_bundle" / "entry.js"
PACKAGES = ("dashboard", "probes", "evaluation")  # every package whose figures the dashboard may show


def bundle_header() -> tuple[str, set[str]]:
    """(plotly.js version, trace types) from the bundle's first line, written by build.js."""
    first = BUNDLE.open(encoding="utf-8").readline()
    match = re.match(r"/\*! plotly\.js v(\S+) \(custom bundle of the Thinking Pixel dashboard: traces ([a-z0-9,]+)\)",
                     first)
    assert match, f"{BUNDLE.name} has no build.js header: rebuild it with scripts/plotly_bundle/build.sh"
    return match.group(1), set(match.group(2).split(","))


def trace_types_built() -> set[str]:
    """The plotly trace types the Python code builds: every `go.<Trace>(...)` call whose name is a
    trace class of plotly.graph_objects."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "go"):
                    cls = getattr(go, node.func.attr, None)
                    if isinstance(cls, type) and issubclass(cls, BaseTraceType):
                        found.add(cls().type)
    return found


def test_bundle_is_the_installed_plotlys_plotlyjs():
    version, _ = bundle_header()
    assert version == get_plotlyjs_version(), (
        f"the bundle is plotly.js {version}, the Python plotly draws with {get_plotlyjs_version()}: "
        "set that version in scripts/plotly_bundle/package.json and run scripts/plotly_bundle/build.sh")


def test_bundle_holds_every_trace_type_the_code_builds():
    _, bundled = bundle_header()
    built = trace_types_built()
    assert {"heatmap", "sankey", "scattergl"} <= built  # the scan finds the views' figures
    assert built <= bundled, f"missing from the bundle: {sorted(built - bundled)}: add them to {ENTRY.name}, rebuild"


def test_bundle_was_built_from_the_entry_point():
    listed = set(re.findall(r"require\('plotly\.js/lib/(\w+)'\)", ENTRY.read_text())) - {"core"}
    assert bundle_header()[1] == listed | {"scatter"}, "entry.js changed since the bundle was built: rebuild it"
