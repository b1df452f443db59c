"""Who may talk to the dashboard (the Host-header check against DNS rebinding) and what a failed
request gets back (one line, `install_error_line`).

A page on another site can make the browser send requests to 127.0.0.1:8050 under its own
host name (DNS rebinding) and read the answers; the browser's same-origin rule does not stop
it, because to the browser the origin *is* that site. The server therefore answers only
requests whose Host header names this machine by a loopback name, or the address given with
`--host`. Bound to every interface (`--host 0.0.0.0` or `::`), any name must be accepted (the
machine's names are not known here), and the command line warns.
"""

from __future__ import annotations

from typing import Iterable

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVERY_INTERFACE = ("0.0.0.0", "::", "")


def allowed_hosts(bind: str | None) -> tuple[str, ...] | None:
    """The host names accepted when bound to `bind`: loopback names, plus `bind` itself; None
    (any) when bound to every interface."""
    if bind in EVERY_INTERFACE:
        return None
    return LOOPBACK + ((bind.strip("[]").lower(),) if bind and bind not in LOOPBACK else ())


def host_name(header: str) -> str:
    """'127.0.0.1:8050' -> '127.0.0.1', '[::1]:8050' -> '::1', 'LocalHost' -> 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def install_host_check(server, hosts: Iterable[str] | None) -> None:
    """Refuse (403, one line) every request to the Flask `server` whose Host is not in `hosts`
    (None: accept any)."""
    if hosts is None:
        return
    accepted = frozenset(hosts)

    @server.before_request
    def check_host():
        from flask import request

        name = host_name(request.host or "")
        if name not in accepted:
            return (f"host {name!r} refused: this dashboard answers only to {', '.join(sorted(accepted))} "
                    "(start it with --host NAME to be reached by another name)\n", 403,
                    {"Content-Type": "text/plain; charset=utf-8"})
        return None


def install_error_line(server) -> None:
    """Answer a request that fails outside every guard (malformed callback bodies are refused
    earlier, `install_callback_check`, and callbacks are `guarded`: this is the last resort for a
    bug) with status 500 and one line naming the error, not an HTML page; the server keeps serving."""
    import logging

    from werkzeug.exceptions import HTTPException

    from .jobs import no_paths

    @server.errorhandler(Exception)
    def one_line(exc):
        if isinstance(exc, HTTPException):  # 400, 404, 405...: werkzeug's status, one line
            return f"{exc.code} {exc.name}: {no_paths(exc.description or '')}".strip() + "\n", exc.code, \
                {"Content-Type": "text/plain; charset=utf-8"}
        if type(exc).__name__ == "DependencyException":  # Dash: a script path it does not serve
            return "404 Not Found: no such script\n", 404, {"Content-Type": "text/plain; charset=utf-8"}
        logging.getLogger("dashboard").warning("request failed: %s: %s", type(exc).__name__, exc)
        text = " ".join(no_paths(f"{type(exc).__name__}: {exc}").split())[:300]
        return f"error: {text}\n", 500, {"Content-Type": "text/plain; charset=utf-8"}


CALLBACK_ROUTE = "_dash-update-component"
WILDCARDS = ('["ALL"]', '["ALLSMALLER"]')  # pattern-matching ids whose value is a list of components


def callback_problem(body, callbacks: dict) -> str | None:
    """What makes `body` (a parsed JSON body POSTed to /_dash-update-component) something other
    than a callback request of this app, or None. The page always sends: an object naming one of
    the app's callbacks by its `output`, its outputs, and one {id, property, value} per Input and
    State in the callback's order (a list of them for a pattern-matching ALL id). Dash itself
    would fail on anything else with a KeyError or TypeError deep inside, which is a 500."""
    if not isinstance(body, dict):
        return "the body must be a JSON object (a Dash callback request)"
    output = body.get("output")
    if not isinstance(output, str) or output not in callbacks or "callback" not in callbacks[output]:
        # (a clientside callback, such as a view's gate, is listed with no server function)
        return f"no server callback has the output {str(output)[:80]!r}"
    cb = callbacks[output]
    n_out = len(output.strip(".").split("...")) if output.startswith("..") else 1
    outs = body.get("outputs")
    if not (isinstance(outs, dict) if n_out == 1 else isinstance(outs, list) and len(outs) == n_out):
        return f"outputs: expected {'an object' if n_out == 1 else f'a list of {n_out} objects'} for this callback"
    for item in outs if isinstance(outs, list) else [outs]:
        if not _component(item):
            return "outputs: each must be an object with an id and a property"
    for key in ("inputs", "state"):
        got, want = body.get(key, []), cb[key]
        if not isinstance(got, list) or len(got) != len(want):
            return f"{key}: expected a list of {len(want)} for this callback"
        for item, spec in zip(got, want):
            many = any(w in spec["id"] for w in WILDCARDS)
            items = item if many and isinstance(item, list) else [item]
            if (many and not isinstance(item, list)) or not all(_component(i, spec["property"]) for i in items):
                return (f"{key}: {spec['id']}.{spec['property']} must be " +
                        ("a list of " if many else "") + "{id, property, value}")
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        return "changedPropIds: expected a list of strings"
    return None


def _component(item, prop: str | None = None) -> bool:
    """Whether `item` is {id, property, ...} as the page sends it (with `prop` as its property)."""
    return (isinstance(item, dict) and isinstance(item.get("id"), (str, dict)) and isinstance(item.get("property"), str)
            and (prop is None or item["property"] == prop))


def install_callback_check(app) -> None:
    """Refuse (400, one line saying what is wrong: `callback_problem`) a callback request that is
    not one of `app`'s, before Dash reads it; the page never sends one."""
    import json

    route = app.config.routes_pathname_prefix + CALLBACK_ROUTE

    @app.server.before_request
    def check_callback():
        from flask import request

        if request.path != route or request.method != "POST":
            return None
        try:
            body = json.loads(request.get_data(cache=True) or b"null")
        except ValueError:
            body = ValueError
        problem = "the body is not JSON" if body is ValueError else callback_problem(body, app.callback_map)
        if problem:
            return f"400 Bad Request: {problem}\n", 400, {"Content-Type": "text/plain; charset=utf-8"}
        return None
