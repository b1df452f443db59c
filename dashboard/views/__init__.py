"""The dashboard's views, one module each, and `VIEWS`: the one list the page is built from.

Each module here ends with `VIEW = View(key, label, layout, register)` (`dashboard.common.View`).
`VIEWS` puts them in tab order; the app builds its tabs and callbacks from it and the selection
accepts a link's `view=` only for its keys. `checked` (run when the app is built) fails, naming
the module, when a module here declares no view or one that is not in `VIEWS`, or when two views
share a key: under `suppress_callback_exceptions=True` such a view would otherwise just be
missing from the page, with no error anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..common import View, ViewError
from . import compare, expert, filmstrip, flow, intervene, latent, overview, results, routing, training

VIEWS: list[View] = [overview.VIEW, routing.VIEW, flow.VIEW, latent.VIEW, expert.VIEW, filmstrip.VIEW,
                     intervene.VIEW, training.VIEW, compare.VIEW, results.VIEW]


def view_modules() -> dict[str, ModuleType]:
    """Every module of this package, by name."""
    return {m.name: importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)}


def checked(views: list[View], modules: dict[str, ModuleType]) -> list[View]:
    """`views`, after checking that they are `View`s with distinct keys and that every module of
    `modules` declares one of them as its `VIEW`; ViewError naming the culprit otherwise."""
    for view in views:
        if not isinstance(view, View):
            raise ViewError(f"VIEWS holds {view!r}, not a dashboard.common.View")
    keys = [v.key for v in views]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ViewError(f"more than one view has the key {', '.join(twice)}")
    for name, module in sorted(modules.items()):
        view = getattr(module, "VIEW", None)
        where = f"dashboard/views/{name}.py"
        if not isinstance(view, View):
            raise ViewError(f"{where} declares no view: end it with `VIEW = View(key, label, layout, register)` "
                            f"(helpers shared by views belong in dashboard/, not dashboard/views/)")
        if not any(v is view for v in views):
            raise ViewError(f"{where} declares the view {view.key!r}, but it is not in VIEWS "
                            f"(dashboard/views/__init__.py): add it where its tab should be")
    return views
