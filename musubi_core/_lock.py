"""One writer per durable run: a non-blocking ``flock`` on a sidecar file.

Why a sidecar (``<db>.<run_id>.lock``) and not the database file itself:

* SQLite locks the database with POSIX record locks (``fcntl``). Those belong
  to the *process*, and closing **any** descriptor of the file drops all of
  them. A lock helper that opened and later closed its own descriptor on the
  database would silently release SQLite's locks while a transaction is open.
* Where ``flock`` is emulated with POSIX locks (Linux on NFS, and reportedly
  macOS in some setups), a ``flock`` on the database collides with SQLite's
  own locks and the writer deadlocks against itself. The usual way out,
  turning SQLite's locking off (``vfs=unix-none``), is what makes a live run
  unsafe to read: a reader can then see, or break, a half-written page.

A separate file has neither problem. SQLite keeps its own locking and WAL, so
``musubi runs``, ``musubi steps RUN`` or a plain ``sqlite3`` shell can read a
live run, and the ``flock`` only arbitrates between would-be writers of the
same run. The kernel drops a ``flock`` when its holder exits, however it
exits (``kill -9`` included), so a crashed run never needs manual unlocking.
Lock files are left in place after use: deleting them would let a waiting
process lock an unlinked inode while a newcomer locks a fresh file.

``flock`` is not reliable on some network file systems (older NFS); keep
durable-run stores on a local disk.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "m.db.default.lock")
>>> with RunLock(path):
...     try:
...         RunLock(path).acquire()
...     except LockedError:
...         print("held")
held
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import weakref

from .errors import LockedError, StoreError

__all__ = ["RunLock", "lock_path"]

# Descriptors of locks held in this process. A child made by fork() (not
# fork+exec) inherits them, and a flock lives as long as any descriptor to it
# stays open: a forked worker outliving the run would keep the run locked. The
# child therefore closes its copies (closing, never LOCK_UN, which would
# release the parent's lock too).
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _close_inherited() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


os.register_at_fork(after_in_child=_close_inherited)


def lock_path(db_path: str, run_id: str) -> str:
    """The sidecar lock file of run ``run_id`` in the store ``db_path``.

    ``run_id`` is validated by the runner (letters, digits, ``.``, ``_``,
    ``-``), so it is always a safe file-name part.
    """
    return f"{db_path}.{run_id}.lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` held until :meth:`release`."""

    def __init__(self, path: str, *, db_path: str | None = None, run_id: str | None = None) -> None:
        self.path = path
        self.db_path = db_path or path
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` at once (never waits)."""
        # os.open descriptors are not inherited across exec (PEP 446), so a
        # subprocess a step launches cannot keep the run locked either.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create the run's lock file {self.path} ({exc.strerror}); durable runs "
                "need a store whose folder is writable",
                path=self.db_path,
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(self.db_path, run_id=self.run_id) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(self)
        # Who holds it, for people looking at the file; never read for logic.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
