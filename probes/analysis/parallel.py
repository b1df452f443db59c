"""The streaming pass over several processes: `analyze(..., workers=N)`, `probes.report --workers N`.

A sampling trace is split into contiguous ranges of sample rows with about equal numbers of
written cells (`sample_ranges`). Each worker process opens the trace itself, builds the same
grid, labels and families as the parent, starts them where the one-process pass would be at
its first row (`ProbeFamily.start_at`), folds its range with `run.stream`, and returns every
family's state (the `Stat` contract's `state_dict`). The parent merges the states in row order
(`Stat.merge`) and computes one report from them.

What the report gets: counts merge exactly, so every count, share, MI, kappa, permutation
null and verdict is the one-process report's; float sums (gate probabilities, latent
distances) are added in another order and agree to float64 rounding (tests/test_parallel.py).

Training traces are folded in one process (their curves follow the events in order); so is a
sampling trace with fewer written samples than two.

Workers are forked where the platform allows it (Linux): the parent has imported numpy, h5py
and the probes already (1.3 s of imports per worker otherwise), and a worker touches none of
the parent's open files. Workers ignore Ctrl-C; the parent stops them when it is interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np

from traces import TraceReader, open_trace

from .families import FAMILIES, ProbeFamily
from .run import stream
from .setup import Context, Options, grid_of, labels_of


def available_cpus() -> int:
    """CPUs this process may run on (a cluster job's share, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sample_ranges(written: np.ndarray, workers: int) -> list[range]:
    """Contiguous ranges of sample rows, at most `workers`, each with about 1/workers of the
    written cells (`written`: the trace's (sample, timestep) mask); ranges with no written cell
    are dropped, so fewer ranges come back when there are fewer written samples."""
    cells = written.reshape(len(written), -1).sum(axis=1)
    cumulative = np.cumsum(cells)  # cells through each row
    total = int(cumulative[-1]) if len(cumulative) else 0
    # range j starts at the first row whose cumulative count passes j/workers of the total
    starts = [0] + [int(np.searchsorted(cumulative, total * j / workers, side="right")) for j in range(1, workers)]
    bounds = sorted(set(starts)) + [len(written)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a and cells[a:b].any()]


def fold_in_workers(trace: TraceReader, families: list[ProbeFamily], context: Context,
                    workers: int) -> tuple[int, int]:
    """Fold the trace into `families` with up to `workers` processes; returns the chunk count
    and the processes used (1 where the trace does not split: see the module doc)."""
    ranges = sample_ranges(trace.written, workers) if context.grid.sampling else []
    if len(ranges) < 2:
        return stream(trace, families, context), 1
    names = [family.name for family in families]
    jobs = [(str(trace.path), context.options, names, rows) for rows in ranges]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Ctrl-C reaches the workers too (the terminal signals the whole process group): they are
    # born with SIGINT blocked and ignore it, and the parent, which holds it back until the
    # pool stands, stops them (Pool.__exit__ terminates) and reports the interrupt
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool = multiprocessing.get_context(method).Pool(len(jobs), initializer=_ignore_interrupt)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:
        results = pool.map(_fold_range, jobs, chunksize=1)  # in row order
    n_chunks = 0
    for states, n in results:
        for family, state in zip(families, states):
            theirs = type(family)(context)
            theirs.load_state_dict(state)
            family.merge(theirs)
        n_chunks += n
    return n_chunks, len(jobs)


def _ignore_interrupt() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it terminates the pool
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _fold_range(job: tuple[str, Options, list[str], range]) -> tuple[list[dict], int]:
    """One worker: the families named, folded over the sample rows `rows`; their states."""
    path, options, names, rows = job
    with open_trace(path) as trace:
        grid = grid_of(trace, options)
        labels, _ = labels_of(trace, grid)
        context = Context(trace, grid, labels, options)
        by_name = {family.name: family for family in (cls(context) for cls in FAMILIES)}
        families = [by_name[name] for name in names]
        for family in families:
            family.start_at(rows.start)
        n = stream(trace, families, context, rows)
        for family in families:
            family.finish()
        return [family.state_dict() for family in families], n
