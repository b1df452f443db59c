"""One training run per checkpoint path at a time.

Two runs writing one `--out` would each report success while the later save silently replaces
the earlier (and their loss logs interleave). A run therefore holds an exclusive `flock` on
`<out>.lock` from before its first check of the checkpoint until it ends; a second run to the same
path is refused at once with one line naming the holder. The kernel drops the lock when the
process dies (a kill, a crash), so a stale lock never blocks the next run; the file itself is
removed by the run that holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cli_common.errors import UserError


class RunLockError(UserError):
    """Another run holds the lock; one line for users."""


class RunLock:
    def __init__(self, out: str | os.PathLike) -> None:
        out = Path(out)
        self.path = out.with_name(out.name + ".lock")
        # folders made for the lock, removed again if the run is refused before it writes anything there
        self._made = [d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                self._fd = None
                raise RunLockError(f"--out {out} is being written by another training run (process {holder}, "
                                   f"lock {self.path}); wait for it to end or write elsewhere") from None
            # The holder before us may have removed the file between our open and our lock: then we hold
            # a lock on a file nobody else can see, and must lock the one now at the path instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file while still holding it (so no one locks the removed file), then unlock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        for folder in self._made:  # deepest first; one that holds the run's files stays
            try:
                folder.rmdir()
            except OSError:
                break
