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
    """Answer a request that fails outside any view's guard (a malformed callback body, a value
    of the wrong type for the selection's own callbacks) with status 500 and one line naming the
    error, not an HTML page; the server keeps serving."""
    import logging

    from werkzeug.exceptions import HTTPException

    from .jobs import no_paths

    @server.errorhandler(Exception)
    def one_line(exc):
        if isinstance(exc, HTTPException):  # 400, 404, 405...: werkzeug's status, one line
            return f"{exc.code} {exc.name}: {no_paths(exc.description or '')}".strip() + "\n", exc.code, \
                {"Content-Type": "text/plain; charset=utf-8"}
        logging.getLogger("dashboard").warning("request failed: %s: %s", type(exc).__name__, exc)
        text = " ".join(no_paths(f"{type(exc).__name__}: {exc}").split())[:300]
        return f"error: {text}\n", 500, {"Content-Type": "text/plain; charset=utf-8"}
