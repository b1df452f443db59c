"""Turning statistics into the report's JSON values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """numpy -> python, NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def stats_at(stats: Any, index: tuple, drop: tuple[str, ...] = ()) -> dict:
    """The fields of a result dataclass (arrays over group axes first) at one group `index`;
    fields with fewer axes than the index are taken whole, fields in `drop` left out."""
    out = {}
    for name, value in vars(stats).items():
        if name in drop:
            continue
        array = np.asarray(value)
        out[name] = array[index] if array.ndim >= len(index) else array
    return out
