"""Turning statistics into the report's JSON values."""

from __future__ import annotations

from typing import Any

import numpy as np

from cli_common.jsonable import jsonable  # noqa: F401 -- re-exported: the report's JSON values


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
