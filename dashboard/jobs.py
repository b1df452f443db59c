"""Long work (projections, interventions) in a background thread, polled by the page.

A job has an opaque id; the page keeps the id in a `dcc.Store` and a `dcc.Interval` asks
`status(id)` until it is done. One job per key runs at a time (a second click while the
first runs returns the running job).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from cli_common.errors import UserError


@dataclass
class Job:
    id: str
    key: str
    started: float = field(default_factory=time.monotonic)
    done: bool = False
    result: Any = None
    error: str | None = None
    message: str = "starting"

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "done": self.done, "error": self.error, "message": self.message,
                "elapsed_s": round(time.monotonic() - self.started, 1)}


class Jobs:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def start(self, key: str, fn: Callable[[Job], Any]) -> Job:
        with self._lock:
            for job in self._jobs.values():
                if job.key == key and not job.done:
                    return job
            job = Job(f"job{next(self._ids)}", key)
            self._jobs[job.id] = job

        def run() -> None:
            try:
                job.result = fn(job)
            except UserError as e:
                job.error = no_paths(str(e))
            except Exception as e:  # shown in the page; the server stays up
                job.error = no_paths(f"{type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                job.done = True

        threading.Thread(target=run, daemon=True, name=job.id).start()
        return job

    def get(self, job_id: str | None) -> Job | None:
        return self._jobs.get(job_id) if isinstance(job_id, str) else None


_ABSOLUTE = re.compile(r"(?<![\w.:/])(?:/[^/\s'\",:;()\[\]]+)+/([^/\s'\",:;()\[\]]+)")


def no_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (a trace's listed name): messages go
    to whoever can reach the page, who need not learn the server's folders."""
    return _ABSOLUTE.sub(r"\1", text)
