"""`python -m dashboard [TRACE_OR_DIR ...] [--ckpt CKPT] [--results DIR] [--host 127.0.0.1] [--port 8050]`

Serves the given trace files (or the *.h5 files found under the given folders; default
`runs/`) in a Dash app on http://HOST:PORT/. Binds to loopback unless --host says otherwise.
Reports are computed once per trace file and cached in `.dashboard-cache/` in its folder.
The Results tab shows what `python -m rsr_model evaluate` wrote under --results (default
`runs/evaluate`, when it exists); it needs no trace.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cli_common.command import Parser, run_main

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
    p.add_argument("--debug", action="store_true", help="Dash debug mode (reloader, error pop-ups)")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        a = build_parser().parse_args(argv)
        if not 0 < a.port < 65536:
            raise DashboardError(f"--port {a.port}: must be 1..65535")
        if a.permutations < 0:
            raise DashboardError("--permutations must be >= 0")
        ctx = make_context(a.traces, a.ckpt, a.permutations, a.results)
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
        app.run(host=a.host, port=a.port, debug=a.debug)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
