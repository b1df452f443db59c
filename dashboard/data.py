"""The dashboard's data layer: which trace files it serves, open readers, cached reports.

Security model: the registry is an allow-list built once from the command line (files given,
or `*.h5` found under the folders given). Pages and callbacks name a trace only by its opaque
id (a hash of its resolved path); an id that is not in the registry is refused, so no path
taken from a request ever reaches the file system.

Reports (`probes.analysis.analyze`, run as `python -m probes.report` in a child process) are cached
in the dashboard's own folder, `.dashboard-cache/<trace>.report.json` beside the trace (`cache_path`),
keyed by the file's SHA-256. The checksum itself is remembered in that file together with the
file's size and mtime, so a second start neither re-hashes nor re-analyses an unchanged trace.
A live (incomplete) trace is analysed in memory and re-analysed when it has grown.

The verdicts come from `probes.verdict` through `probes.report`, the same function and command a
researcher runs by hand. When a `probes.routing_value` result made for the trace's checkpoint lies
beside the trace or beside the checkpoint (the `--ckpt` of the trace's recording command), matched by
the checkpoint's SHA-256, the report is computed with it (`--routing-value`), so the page shows the
verdict `python -m probes.report TRACE --routing-value THAT.json` prints; the cache is keyed by that
file too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from cli_common.errors import UserError
from traces import TraceReader, open_trace
from traces.errors import TraceError

REPORT_SUFFIX = ".report.json"
# Bumped when the views start reading report keys an older cache lacks (2: training_curves.pooled
# and compare.overall, issue 18; 3: issue 19 verdicts and the routing value found for the checkpoint; 4: the
# linear probes' latent subsample drawn per chunk cell, issue 23), so a cache written by an older dashboard
# is recomputed.
CACHE_FORMAT = 4
COMPARE_SUFFIX = ".compare.json"
CAUSAL_SUFFIX = ".causal.json"
ROUTING_VALUE_SCHEMA = "rsr-routing-value"  # probes.routing_value's schema name (that module loads torch)
ROUTING_VALUE_MAX_BYTES = 20 << 20  # larger JSON files beside a trace are not routing values; not read


class DashboardError(UserError):
    """Bad dashboard input (no such trace file, a folder with nothing servable); one line."""


@dataclass
class Entry:
    """One served trace: where it is, and if it cannot be read, why (shown in the page)."""

    id: str
    path: Path
    error: str | None = None
    reader: TraceReader | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    report: dict | None = None
    report_steps: int = -1
    report_time: float = 0.0
    busy: str | None = None  # why the file is withheld (a writer such as probes.derive has it)

    @property
    def label(self) -> str:
        return self.path.name if self.error is None else f"{self.path.name} (unreadable)"


def trace_id(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def find_traces(args: Iterable[str | os.PathLike]) -> list[Path]:
    """Trace files named on the command line, or found (recursively, *.h5) in named folders."""
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.h5") if ".rank" not in q.name and inside(q, p))
        elif p.is_file():
            out.append(p)
        else:
            raise DashboardError(f"{p}: no such file or folder")
    seen, unique = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


class Registry:
    """The allow-list of served traces, their open readers and their reports."""

    def __init__(self, paths: Iterable[Path], n_perm: int = 199, linear_probes: bool = False,
                 live_reanalyse_s: float = 10.0, workers: int = 1) -> None:
        self.entries: dict[str, Entry] = {}
        for p in paths:
            e = Entry(trace_id(p), Path(p).resolve())
            self.entries[e.id] = e
        self.n_perm = n_perm
        self.linear_probes = linear_probes
        self.live_reanalyse_s = live_reanalyse_s
        self.workers = workers  # processes per report of a sampling trace (probes.report --workers)

    # Lookup ------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        return list(self.entries)

    def entry(self, tid: str | None) -> Entry:
        """The entry of an id; anything else (a path, '..', an unknown id) is refused."""
        if not isinstance(tid, str) or tid not in self.entries:
            raise TraceError("unknown trace id: only the traces this dashboard was started with are served")
        return self.entries[tid]

    def options(self) -> list[dict[str, str]]:
        for e in self.entries.values():
            if e.reader is None and e.error is None:
                self._open(e)
        return [{"label": e.label, "value": e.id} for e in self.entries.values()]

    def reader(self, tid: str | None) -> TraceReader:
        """The open reader of a served trace (opened once); TraceError with the reason if unusable."""
        e = self.entry(tid)
        with e.lock:
            if e.busy:
                raise TraceError(f"{e.path.name}: {e.busy}; try again in a moment")
            if e.reader is None:
                self._open(e)
            if e.reader is None:
                raise TraceError(e.error or "unreadable trace")
            return e.reader

    def _open(self, e: Entry) -> None:
        try:
            e.reader = open_trace(e.path)
            e.error = None
        except (TraceError, OSError) as exc:
            e.error = str(exc).replace(str(e.path), e.path.name)
        except Exception as exc:  # a damaged file can raise anything from inside h5py
            e.error = f"{e.path.name}: cannot be read ({type(exc).__name__}: {exc})"

    def release(self, tid: str) -> None:
        """Close our handle (probes.derive needs the file to itself)."""
        e = self.entry(tid)
        with e.lock:
            if e.reader is not None:
                e.reader.close()
                e.reader = None

    @contextmanager
    def exclusive(self, tid: str, why: str) -> Iterator[Path]:
        """Withhold a trace from the page while something writes into it (yields its path)."""
        e = self.entry(tid)
        with e.lock:
            e.busy = why
            if e.reader is not None:
                e.reader.close()
                e.reader = None
        try:
            yield e.path
        finally:
            with e.lock:
                e.busy, e.report = None, None

    def refresh(self, tid: str) -> int:
        """Pick up what a live writer flushed; returns the step counter."""
        e = self.entry(tid)
        with e.lock:
            return self.reader(tid).refresh()

    def close(self) -> None:
        for tid in self.entries:
            self.release(tid)

    # Reports -------------------------------------------------------------------------------
    def report(self, tid: str) -> dict:
        """`probes.analysis.analyze` of the trace: from the cache when the file is unchanged."""
        e = self.entry(tid)
        with e.lock:
            tr = self.reader(tid)
            if tr.complete:
                if e.report is None:
                    e.report = self._cached_report(e)
                return e.report
            steps = tr.refresh()
            stale = steps != e.report_steps and time.monotonic() - e.report_time > self.live_reanalyse_s
            if e.report is None or stale:
                e.report = self._analyse(e.path, self.routing_value(tid), parallel=False)  # still written
                e.report_steps, e.report_time = steps, time.monotonic()
            return e.report

    def routing_value(self, tid: str) -> Path | None:
        """The routing-value JSON of this trace's checkpoint, if one lies beside the trace or the checkpoint."""
        tr = self.reader(tid)
        return find_routing_value(self.entry(tid).path, tr.attrs.get("checkpoint_sha256"), tr.attrs.get("command"))

    def _analyse(self, path: Path, routing_value: Path | None = None, parallel: bool = True) -> dict:
        """The report, computed by `python -m probes.report` in a child process: the server's
        memory stays what serving needs, and a crash inside the analysis cannot take it down.
        With `parallel` (a complete sampling trace) it is folded by `self.workers` processes."""
        with tempfile.TemporaryDirectory(prefix="dashboard-report-") as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "probes.report", str(path), "--json", str(out),
                   "--permutations", str(self.n_perm)] + ([] if self.linear_probes else ["--no-probes"]) \
                + (["--routing-value", str(routing_value)] if routing_value else []) \
                + (["--workers", str(self.workers)] if self.workers > 1 and parallel else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                lines = [x for x in done.stderr.splitlines() if x.strip()] or [f"exit code {done.returncode}"]
                raise TraceError(f"{path.name}: analysis failed: {lines[-1].removeprefix('error: ')}")
            return json.loads(out.read_text())

    def _cached_report(self, e: Entry) -> dict:
        cache = cache_path(e.path, REPORT_SUFFIX)
        sha = file_checksum(e.path, cache)
        value = self.routing_value(e.id)
        options = {"permutations": self.n_perm, "linear_probes": self.linear_probes, "cache_format": CACHE_FORMAT,
                   "routing_value": _file_identity(value)}
        stored = _read_json(cache)
        if stored and stored.get("sha256") == sha and stored.get("dashboard_options") == options:
            return stored["report"]
        report = self._analyse(e.path, value, parallel=self.reader(e.id).kind == "sampling")  # complete here
        st = e.path.stat()
        _write_json(cache, {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                            "dashboard_options": options, "report": report})
        return report

    def compare(self, tid_a: str, tid_b: str) -> dict:
        """`probes.analysis.compare_traces` of two served traces, cached beside the first."""
        from probes.analysis import compare_traces

        a, b = self.entry(tid_a), self.entry(tid_b)
        cache = cache_path(a.path, f".vs-{b.id}{COMPARE_SUFFIX}")
        key = [file_checksum(a.path, cache_path(a.path, REPORT_SUFFIX)),
               file_checksum(b.path, cache_path(b.path, REPORT_SUFFIX)), CACHE_FORMAT]
        stored = _read_json(cache)
        if stored and stored.get("sha256") == key:
            return stored["compare"]
        out = compare_traces(a.path, b.path)
        _write_json(cache, {"sha256": key, "compare": out})
        return out

    def causal(self, tid: str) -> dict | None:
        """A `probes.causal` JSON stored beside the trace (`<trace>.causal.json`), if any."""
        return _read_json(self.entry(tid).path.with_name(self.entry(tid).path.name + CAUSAL_SUFFIX))


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is a regular file that resolves inside `folder`: a symlink found in a served
    folder that points out of it is not served (it would expose, and cache beside, any file)."""
    try:
        return path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


CACHE_FOLDER = ".dashboard-cache"


def _recorded_checkpoint(trace: Path, command: str | None) -> Path | None:
    """The checkpoint named by `--ckpt` in the trace's recording command (relative paths: from the
    trace's folder, then the current one), if it still exists."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w == "--ckpt" and i + 1 < len(words):
            name = words[i + 1]
        elif w.startswith("--ckpt="):
            name = w.split("=", 1)[1]
        else:
            continue
        for base in (trace.parent, Path.cwd()):
            if (base / name).is_file():
                return (base / name).resolve()
    return None


def find_routing_value(trace: Path, checkpoint_sha256: str | None, command: str | None = None) -> Path | None:
    """A `probes.routing_value` JSON for the checkpoint with this SHA-256, beside the trace or beside the
    checkpoint it was recorded from; the newest when there are several. None without a checkpoint hash."""
    if not checkpoint_sha256:
        return None
    ckpt = _recorded_checkpoint(trace, command)
    folders = [trace.parent] + ([ckpt.parent] if ckpt is not None and ckpt.parent != trace.parent else [])
    found = []
    for folder in folders:
        for p in folder.glob("*.json"):
            if p.name.endswith((REPORT_SUFFIX, COMPARE_SUFFIX, CAUSAL_SUFFIX)):
                continue
            try:
                if p.stat().st_size > ROUTING_VALUE_MAX_BYTES:
                    continue
            except OSError:
                continue
            doc = _read_json(p)
            if isinstance(doc, dict) and doc.get("schema") == ROUTING_VALUE_SCHEMA \
                    and doc.get("checkpoint_sha256") == checkpoint_sha256:
                found.append(p)
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _file_identity(path: Path | None) -> list | None:
    if path is None:
        return None
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_path(trace: Path, suffix: str) -> Path:
    """Where the dashboard caches what it derived from `trace` (its report, comparisons): in a
    folder of its own, `.dashboard-cache/` in the trace's folder when that is writable (the
    served folder: nothing is written outside it), else ~/.cache/thinking-pixel/."""
    own = trace.parent / CACHE_FOLDER
    if os.access(trace.parent, os.W_OK):
        own.mkdir(exist_ok=True)
        return own / (trace.name + suffix)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "thinking-pixel"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{trace_id(trace)}{suffix}"


def file_checksum(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of the file; reused from `cache` when size and mtime are unchanged."""
    st = path.stat()
    stored = _read_json(cache) if cache else None
    if stored and stored.get("size") == st.st_size and stored.get("mtime_ns") == st.st_mtime_ns:
        return stored["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only place: the cache is an optimisation only
