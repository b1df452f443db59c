"""`python -m dashboard [TRACE_OR_DIR ...] [--ckpt CKPT] [--results DIR] [--host 127.0.0.1] [--port 8050]`

Serves the given trace files (or the *.h5 files found under the given folders; default
`runs/`) in a Dash app on http://HOST:PORT/. Binds to loopback unless --host says otherwise.
Reports are computed once per trace file and cached in `.dashboard-cache/` in its folder
(`--report-workers N`: a sampling trace's report folded by N processes, the same report).
The Results tab shows what `python -m rsr_model evaluate` wrote under --results (default
`runs/evaluate`, when it exists); it needs no trace.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from cli_common.command import Parser, guard_startup, run_main, worker_count

guard_startup(__name__)  # before dash and h5py load: Ctrl-C while they do exits 130 with one line

from .common import DEFAULT_DIR, DEFAULT_RESULTS, make_context
from .data import DashboardError


def build_parser() -> Parser:
    p = Parser(prog="python -m dashboard", description=__doc__.splitlines()[0], version=True)
    p.add_argument("traces", nargs="*", help=f"trace files or folders (default: {DEFAULT_DIR}/)")
    p.add_argument("--ckpt", type=Path, help="checkpoint for the Intervene view (re-samples with interventions)")
    p.add_argument("--results", type=Path, metavar="DIR",
                   help=f"evaluation results for the Results tab (default: {DEFAULT_RESULTS}/ when it exists)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: only this machine)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--permutations", type=int, default=199, help="permutation-null tables per MI in the reports")
    p.add_argument("--report-workers", type=worker_count, default=1, metavar="N",
                   help="processes that compute a sampling trace's report (probes.report --workers; default 1)")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (reloader, error pop-ups)")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        a = build_parser().parse_args(argv)
        if not 0 < a.port < 65536:
            raise DashboardError(f"--port {a.port}: must be 1..65535")
        if a.permutations < 0:
            raise DashboardError("--permutations must be >= 0")
        check_bind(a.host, a.port)
        ctx = make_context(a.traces, a.ckpt, a.permutations, a.results, a.report_workers)
        ctx.bind = a.host  # requests naming another host are refused (dashboard.security)
        from .app import create_app

        app = create_app(ctx)
        n = len(ctx.registry.entries)
        print(f"serving {n} trace(s) on http://{a.host}:{a.port}/" + ("" if n else " (none found: the page says how "
                                                                       "to make one)"))
        print(f"results tab: {ctx.results}" if ctx.results else f"results tab: no {DEFAULT_RESULTS}/ (the tab says how "
                                                                 "to make results)")
        if a.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: bound to {a.host}: anyone who reaches this address can read the served traces",
                  file=sys.stderr)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        from .app import warm_up

        threading.Thread(target=warm_up, args=(ctx,), daemon=True, name="warm-up").start()
        app.run(host=a.host, port=a.port, debug=a.debug)
        # werkzeug's server swallows Ctrl-C and returns; that is the only way it returns
        raise KeyboardInterrupt

    return run_main(body, interrupted="stopped (Ctrl-C)")


def check_bind(host: str, port: int) -> None:
    """Refuse, before any trace is read, an address the server could not listen on: a host that does
    not resolve or is not this machine's, a port in use or reserved. Binds a socket as werkzeug will
    (IPv6 for an address with a colon, address reuse on) and releases it at once."""
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
        return  # the --debug reloader's child: its parent holds the socket it serves on
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError) as e:
        raise DashboardError(f"--host {host}: not an address of this machine ({getattr(e, 'strerror', None) or e})") \
            from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DashboardError(f"--port {port} is in use on {host} (another server?); choose another --port") \
                    from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise DashboardError(f"--host {host} is not an address of this machine; use 127.0.0.1 or one of its "
                                     f"own addresses") from None
            if e.errno == errno.EACCES:
                raise DashboardError(f"--port {port}: permission denied (ports below 1024 need privileges); choose "
                                     f"another --port") from None
            raise DashboardError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


if __name__ == "__main__":
    sys.exit(main())
