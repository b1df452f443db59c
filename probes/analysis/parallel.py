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
sampling trace with fewer written samples than two, and an incomplete one whose writer may still
run (workers that each open a file still being written could see other snapshots). A killed run's
trace whose writer ran on this host and is gone is split (`splittable`).

Workers are forked on Linux (spawned elsewhere: `START_METHOD`): the parent has imported numpy, h5py
and the probes already (1.3 s of imports per worker otherwise), and a worker touches none of
the parent's open files. Workers ignore Ctrl-C; the parent stops them when it is interrupted,
and a worker that dies ends the pass with one error (`run_workers`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.connection import wait

import numpy as np

from cli_common.errors import UserError
from traces import TraceReader, open_trace

from .families import FAMILIES, ProbeFamily
from .run import stream
from .setup import Context, Options, context_of

# fork where it is safe (Linux): no re-import; spawn elsewhere (macOS forbids fork after threads)
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


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


def splittable(trace: TraceReader) -> bool:
    """Whether workers may each open the trace: it is complete, or its writer is known to be gone
    (a killed run's, on this host). A trace that may still be written is not: workers opening a
    file still being appended to could each see another snapshot."""
    return trace.complete or trace.writer_gone


class WorkerError(UserError):
    """A worker process ended without its result (killed: out of memory, say)."""


def fold_in_workers(trace: TraceReader, families: list[ProbeFamily], context: Context,
                    workers: int) -> tuple[int, int]:
    """Fold the trace into `families` with up to `workers` processes; returns the chunk count
    and the processes used (1 where the trace does not split: see the module doc)."""
    ranges = sample_ranges(trace.written, workers) if context.grid.sampling and splittable(trace) else []
    if len(ranges) < 2:
        return stream(trace, families, context), 1
    names = [family.name for family in families]
    results = run_workers([(str(trace.path), context.options, names, rows) for rows in ranges])
    scratch = [type(family)(context) for family in families]  # built once; each worker's state loaded in turn
    n_chunks = 0
    for states, n in results:  # in row order
        for family, theirs, state in zip(families, scratch, states):
            theirs.load_state_dict(state)
            family.merge(theirs)
        n_chunks += n
    return n_chunks, len(ranges)


def run_workers(jobs: list[tuple]) -> list:
    """`_fold_range(job)` of every job, each in its own process; the results in job order.

    Ctrl-C reaches the workers too (a terminal signals the whole process group): they are born
    with SIGINT blocked and then ignore it; the parent, which holds it back until they stand,
    stops them and raises KeyboardInterrupt. A worker that dies (killed, out of memory) ends
    the fold with a `WorkerError`, not a wait for a result that never comes; a worker's own
    error is raised in the parent. When several fail, the first range's error is raised, as
    the one-process pass would meet it first. Workers get SIGTERM if the parent dies (Linux)."""
    context = multiprocessing.get_context(START_METHOD)
    processes, pipes = [], []
    hold = hasattr(signal, "pthread_sigmask")  # POSIX; Windows has no signal masks
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hold else None
    try:
        try:
            for job in jobs:
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(job, send), daemon=True)
                process.start()
                send.close()  # only the worker writes: its death closes the pipe (EOFError below)
                processes.append(process)
                pipes.append(receive)
        finally:
            if hold:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a held-back Ctrl-C is raised here
        results: list = [None] * len(jobs)
        errors: dict[int, BaseException] = {}
        pending = {pipe: i for i, pipe in enumerate(pipes)}
        while pending:
            for pipe in wait(list(pending)):
                i = pending.pop(pipe)
                ok, value = _receive(pipe, processes[i], i, len(jobs))
                if ok:
                    results[i] = value
                else:
                    errors[i] = value
        if errors:
            raise errors[min(errors)]
        return results
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()


def _receive(pipe, process, i: int, n: int) -> tuple[bool, object]:
    """A worker's (ok, result or exception); a worker that died or sent what cannot be read
    gives a `WorkerError`."""
    try:
        return pipe.recv()
    except (EOFError, OSError):  # closed before (EOFError) or during (OSError) the message: it died
        process.join()
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        return False, WorkerError(f"report worker {i + 1} of {n} {how} before it sent its result "
                                  "(out of memory? try fewer --workers)")
    except Exception as e:  # sent, but does not unpickle
        return False, WorkerError(f"report worker {i + 1} of {n} sent a result that cannot be read "
                                  f"({type(e).__name__}: {e})")


def _worker(job: tuple, send) -> None:
    _end_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it stops the workers
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        result = (True, _fold_range(job))
    except Exception as e:  # raised again in the parent (a TraceError stays one error line there)
        result = (False, e)
    try:
        send.send(result)
    except OSError:
        pass  # the parent is gone (it was killed or stopped the workers): nobody to tell
    except Exception as e:  # an exception that does not pickle
        send.send((False, RuntimeError(f"report worker: {type(e).__name__}: {e}")))
    send.close()


def _end_with_parent() -> None:
    """Linux: SIGTERM this worker when its parent dies (killed), so no fold outlives the command."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fold_range(job: tuple[str, Options, list[str], range]) -> tuple[list[dict], int]:
    """One worker: the families named, folded over the sample rows `rows`; their states."""
    path, options, names, rows = job
    with open_trace(path) as trace:
        context, _ = context_of(trace, options)
        by_name = {cls.name: cls for cls in FAMILIES}
        families = [by_name[name](context) for name in names]  # the parent's running families, in its order
        for family in families:
            family.start_at(rows.start)
        n = stream(trace, families, context, rows)
        for family in families:
            family.finish()
        return [family.state_dict() for family in families], n
