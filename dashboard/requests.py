"""What a request may ask for: the selection values and intervention settings a callback
receives, checked against the selected trace before any view reads with them.

Callbacks get their values from an HTTP body that anyone on the allowed hosts can write, not
only from the page's controls. A negative index would wrap (sample -1 is the last sample), a
string or a float would fail deep inside NumPy or h5py, and an intervention whose window or
region selects nothing would run and look like a result. Each check here refuses such a value
with one line naming it and the valid range (`RequestError`, shown by `guarded`).
"""

from __future__ import annotations

import math
from typing import Any

from cli_common.errors import UserError
from traces import TraceReader

# selection control id -> the name used in messages
SELECTION_IDS = {"sel-sample": "sample", "sel-t": "timestep", "sel-step": "recursion step",
                 "sel-expert": "expert", "sel-layer": "layer", "sel-branch": "branch"}
KINDS = ("force", "ablate")


class RequestError(UserError):
    """A request value outside what the selected trace (or the page) offers; one line."""


def position(value: Any, n: int, what: str) -> int:
    """`value` as a position 0..n-1: an int (not a bool, not a float or string), in range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what} {value!r}: must be a whole number 0..{n - 1}")
    if not 0 <= value < n:
        raise RequestError(f"{what} {value}: this trace has {what}s 0..{n - 1}" if n else
                           f"{what} {value}: this trace has none")
    return value


def check_selection(tr: TraceReader, values: dict[str, Any]) -> None:
    """Refuse selection values (control id -> value; None = the view's default) that do not
    name a sample, timestep, step, expert, layer or branch of `tr`."""
    c = tr.coords
    sizes = {"sel-step": len(c["step"]), "sel-expert": len(c["expert"])}
    if tr.kind == "sampling":
        sizes.update({"sel-sample": len(c["sample"]), "sel-t": len(c["timestep_value"])})
    for cid, value in values.items():
        if value is None or cid not in SELECTION_IDS:
            continue
        what = SELECTION_IDS[cid]
        if cid == "sel-layer":
            layers = [int(x) for x in c["layer"]]
            if isinstance(value, bool) or value not in layers:
                raise RequestError(f"layer {value!r}: this trace has layers {', '.join(map(str, layers))}")
        elif cid == "sel-branch":
            branches = [str(b) for b in c.get("branch", [])]
            if value not in branches:
                raise RequestError(f"branch {value!r}: this trace has branches {', '.join(branches) or 'none'}")
        elif cid in sizes:
            position(value, sizes[cid], what)


def window(value: Any) -> tuple[float, float]:
    """A timestep window [lo, hi] from the page's range slider: two finite numbers, lo <= hi."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestError(f"timestep window {value!r}: must be two numbers [from, to]")
    lo, hi = value
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (lo, hi)):
        raise RequestError(f"timestep window {value!r}: must be two finite numbers")
    if lo > hi:
        raise RequestError(f"timestep window {lo:g}..{hi:g} is reversed")
    return float(lo), float(hi)


def covered(timestep_values: list[float], lo: float, hi: float) -> list[float]:
    """The sampled timestep values a window [lo, hi] covers (the intervention acts at those only)."""
    return [t for t in timestep_values if lo <= t <= hi]


def region(value: Any, grid: tuple[int, int]) -> dict[str, list[int]] | None:
    """A painted region {"rows": [r0, r1], "cols": [c0, c1]} (half-open, inside the token grid,
    non-empty), or None for the whole image."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"rows", "cols"}:
        raise RequestError(f"region {value!r}: must be {{'rows': [r0, r1], 'cols': [c0, c1]}}")
    for axis, n in (("rows", grid[0]), ("cols", grid[1])):
        span = value[axis]
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in span)):
            raise RequestError(f"region {axis} {span!r}: must be two whole numbers [start, stop)")
        if not 0 <= span[0] < span[1] <= n:
            raise RequestError(f"region {axis} {span[0]}:{span[1]}: must satisfy 0 <= start < stop <= {n} "
                               f"(the {grid[0]}x{grid[1]} token grid); it would select nothing")
    return {"rows": list(value["rows"]), "cols": list(value["cols"])}


def kind(value: Any) -> str:
    if value not in KINDS:
        raise RequestError(f"intervention {value!r}: must be one of {', '.join(KINDS)}")
    return value
