"""The recorder's batches committed by a helper process, outside the application's interpreter.

Why a process: a batch of rows costs SQLite ~10 µs of CPU per replay to commit, but committing
it on a thread of the application costs the application 2-3 times that. The writer thread needs
the GIL between statements, so every time the application's thread releases it (each SQLite
statement of its own lookups does) the two threads hand the interpreter back and forth, each
hand-off a futex wake and a context switch. Measured on ``@step`` replays in a loop: 74 µs a
replay with a writer thread, 48 µs with the rows never written, 55 µs with the batches sent to
a process that commits them (docs/benchmarks.md, "Fourth pass").

The contract of :class:`~musubi_core.record.recorder.Recorder` does not change: a batch counts
as committed only when this process has read the helper's answer that its transaction
committed. Anything else (the helper cannot start, dies, answers with an error, or takes too
long) makes :meth:`WriterProcess.write` return False, and the recorder commits that batch on
its own connection as it always did, getting the store's real error if there is one. A
SIGKILL of the application loses no more than before: what the helper has read it commits
(it sees end-of-file when the application dies, and exits).

When it is used (:func:`spawnable`): a SQLite file store opened for writing, on a POSIX system,
run by an interpreter that is a plain ``python`` executable (not a frozen app, not an embedding
server such as uWSGI, whose ``sys.executable`` is not Python), and not turned off with
``MUSUBI_WRITER=thread``. The recorder's writer thread starts it when a batch of
:data:`SPAWN_ROWS` rows or more is due (a steady load; a script making a few calls never starts
one) and hands it that batch, waiting up to half a second while it starts: that first big batch
committed in-process, under the interpreter's lock hand-offs, is what made the replays around it
slow (measured: probes' p90 46 -> 32 µs in a loop of cold ``@step`` replays). Any other thread
committing (``flush()``, backpressure, exit) does not wait and commits in-process.

The pipe carries :mod:`marshal` frames of plain tuples (strings, numbers, bytes, None): nothing
is pickled, and the helper builds only the store's write tuples from them.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import select
import subprocess
import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SPAWN_ROWS", "Helpers", "WriterProcess", "serve", "spawnable"]

# A commit of at least this many rows (four times a second, so ~2,000 rows/s) starts a helper.
SPAWN_ROWS = 512

# How long the recorder waits for the helper's answer to one batch before it gives up on the
# helper (the store's own busy timeout bounds a healthy helper's commit well below this).
_ANSWER_GRACE_S = 30.0

# The helper's entry. The first line drops the current directory from sys.path before any
# import (a `json.py` in the folder the app ran from must not shadow the standard library);
# the app's own sys.path then replaces the helper's, so musubi_core imports from wherever the
# application imported it.
# Its answers go out on a copy of stdout, and stdout itself then points at stderr: anything an
# import prints cannot garble them. Ctrl-C in a terminal reaches the whole process group: the
# helper ignores it and ends when the application does (end of file on stdin).
_BOOT = (
    "import sys; del sys.path[0]\n"
    "import json, os, signal\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "answers = os.dup(1); os.dup2(2, 1)\n"
    "spec = json.loads(sys.argv[1]); sys.path[:] = spec['sys_path']\n"
    "from musubi_core.record.writer_process import serve\n"
    "serve(spec, answers)\n"
)


def _python_executable() -> str | None:
    exe = sys.executable
    if not exe or getattr(sys, "frozen", False):
        return None
    name = os.path.basename(exe).lower()
    return exe if name.startswith(("python", "pypy")) else None


def spawnable(store: Any) -> dict[str, Any] | None:
    """What a helper needs to open ``store`` (None: this store is written in-process)."""
    if os.name != "posix" or os.environ.get("MUSUBI_WRITER", "").strip().lower() == "thread":
        return None
    spec = getattr(store, "writer_process_spec", None)
    target = spec() if spec is not None else None
    exe = _python_executable()
    if target is None or exe is None:
        return None
    # Absolute: the helper starts in this process's current folder, which may not be the one
    # a relative entry ('' included) was resolved against when musubi_core was imported.
    sys_path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {"exe": exe, "store": target, "sys_path": sys_path}


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def _read_exact(fd: int, n: int, timeout: float | None) -> bytes | None:
    """``n`` bytes from ``fd`` (None: end of file, or nothing within ``timeout`` seconds)."""
    chunks: list[bytes] = []
    while n:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, timeout: float | None) -> Any:
    head = _read_exact(fd, 4, timeout)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "little"), timeout)
    return None if body is None else marshal.loads(body)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class WriterProcess:
    """One helper process committing the batches of one recorder (see the module docstring).
    Used by one thread at a time (the recorder calls it under its commit lock)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.ready = False
        self.dead = False
        self.commits = 0  # batches the helper committed
        self._seq = 0
        args = {"store": spec["store"], "sys_path": spec["sys_path"]}
        self._proc = subprocess.Popen(
            [spec["exe"], "-c", _BOOT, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to = self._proc.stdin.fileno()
        self._from = self._proc.stdout.fileno()
        # A recorder dropped without close() still ends its helper (which then exits).
        self._finalizer = weakref.finalize(self, _shut_down, self._proc)
        # Not at interpreter exit: the recorder's own exit hook flushes through the helper and
        # then ends it; closing the pipes first would pull them from under a commit.
        self._finalizer.atexit = False

    @property
    def child_pid(self) -> int:
        """The helper's process id."""
        return self._proc.pid

    def usable(self, wait: float = 0.0) -> bool:
        """Has the helper said it is ready (waiting up to ``wait`` seconds for it)?"""
        if self.ready:
            return True
        if self.dead:
            return False
        try:
            readable = select.select([self._from], [], [], wait)[0]
        except (OSError, ValueError):  # the pipe is gone
            self._give_up()
            return False
        if not readable:
            if self._proc.poll() is not None:
                self._give_up()
            return False
        if self._answer(1.0) != [0, None]:
            self._give_up()
            return False
        self.ready = True
        return True

    def write(
        self,
        nodes: Sequence[tuple[Any, ...]],
        artifacts: Sequence[tuple[Any, ...]],
        edges: Sequence[tuple[Any, ...]],
        calls: Sequence[tuple[Any, ...]],
        flows: Sequence[tuple[Any, ...]],
        runs: Sequence[tuple[Any, ...]],
        replays: Mapping[str, int],
        aliases: Sequence[tuple[bytes, str]],
        *,
        wait: float = 0.0,
    ) -> bool:
        """Have the helper commit one batch (waiting up to ``wait`` seconds for a helper still
        starting); True once it answered that it committed it."""
        if not self.usable(wait):
            return False
        self._seq += 1
        try:
            payload = marshal.dumps(
                [
                    self._seq,
                    [tuple(r) for r in nodes],
                    [tuple(r) for r in artifacts],
                    [tuple(r) for r in edges],
                    [tuple(r) for r in calls],
                    [tuple(r) for r in flows],
                    [tuple(r) for r in runs],
                    dict(replays),
                    [tuple(r) for r in aliases],
                ]
            )
        except ValueError:  # a value marshal cannot carry: this batch is written in-process
            return False
        try:
            _write_all(self._to, _frame(payload))
        except OSError:
            answer = None
        else:
            answer = self._answer(_ANSWER_GRACE_S)
        if answer is None:  # gone or stuck: from now on the recorder writes in-process
            self._give_up()
            return False
        if answer != [self._seq, None]:
            return False  # the helper's transaction failed: the recorder retries in-process
        self.commits += 1
        return True

    def _answer(self, timeout: float) -> Any:
        """The helper's next answer (None: it is gone, silent for ``timeout`` seconds, or what
        it sent is not a marshal frame)."""
        try:
            return _read_frame(self._from, timeout)
        except (OSError, ValueError, EOFError, TypeError):
            return None

    def _give_up(self) -> None:
        self.dead = True
        self.close(wait=0.0)

    def close(self, wait: float = 10.0) -> None:
        """End the helper: it commits nothing more (the recorder flushed first) and exits. One
        that never said it is ready has committed nothing: it is not waited for (a script that
        ends right after its first big commit does not wait for a helper to start)."""
        self._finalizer.detach()
        _shut_down(self._proc, wait if self.ready else 0.0)

    def abandon(self) -> None:
        """In a forked child: let go of the inherited pipe ends without touching the helper,
        which keeps serving the parent (and sees end-of-file only when the parent exits)."""
        self._finalizer.detach()
        self.dead = True
        for f in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()


class Helpers:
    """Which helper process commits a recorder's batches, and when one starts (the policy; the
    recorder calls it under its commit lock, and makes a new one in a forked child).

    A steady load (a batch of :data:`SPAWN_ROWS` rows or more) starts a helper, and the
    recorder's writer thread hands it that very batch, waiting up to :attr:`START_WAIT` while
    it starts: a commit of thousands of rows on a thread of the application is the cost the
    helper exists to avoid (rows then wait at most the recorder's interval + START_WAIT, within
    its lag bound). Any other thread (``flush()``, backpressure, exit) never waits for one. A
    helper that dies or stalls is replaced by the next steady load, at most :attr:`MAX` times.
    """

    # Helpers one recorder starts at most (one that dies at once must not become a loop).
    MAX = 3
    # How long the writer thread waits for a helper that is still starting (seconds).
    START_WAIT = 0.5

    def __init__(self, store: Any) -> None:
        self.store = store
        # The helper committing batches, once a steady load started one; False once this
        # store cannot have one.
        self.current: WriterProcess | bool | None = None
        self.started = 0

    def write(self, batch: Sequence[Any], size: int, *, on_writer: bool, allowed: bool) -> bool:
        """Have a helper commit ``batch`` (:meth:`WriterProcess.write`'s arguments) of ``size``
        rows; True once one did. ``allowed`` False never starts one (a closed recorder, or
        ``recorder.helper = False``)."""
        if self.current is None and size >= SPAWN_ROWS:
            self._start(allowed)
        helper = self.current
        if not isinstance(helper, WriterProcess):
            return False
        if helper.write(*batch, wait=self.START_WAIT if on_writer else 0.0):
            return True
        if helper.dead:  # gone or stuck: a later steady load may start another
            self.current = None if self.started < self.MAX else False
        return False

    def _start(self, allowed: bool) -> None:
        """Start a helper: it is used once it said it is ready. A store that cannot have one
        never asks again."""
        spec = spawnable(self.store) if allowed else None
        if spec is None:
            self.current = False
            return
        self.started += 1
        try:
            self.current = WriterProcess(spec)
        except (OSError, ValueError):
            self.current = False

    def stop(self) -> None:
        """End the helper, if any; a later steady load starts a new one."""
        helper = self.current
        if isinstance(helper, WriterProcess):
            self.current = None
            helper.close()

    def abandon(self) -> None:
        """In a forked child: let go of the parent's helper (see :meth:`WriterProcess.abandon`)."""
        helper = self.current
        if isinstance(helper, WriterProcess):
            helper.abandon()

    @property
    def pid(self) -> int | None:
        """The helper's process id while one commits the batches (else None)."""
        helper = self.current
        if isinstance(helper, WriterProcess) and helper.ready and not helper.dead:
            return helper.child_pid
        return None


def _shut_down(proc: subprocess.Popen[bytes], wait: float = 10.0) -> None:
    """Close the pipes (the helper sees end of file and exits); wait up to ``wait`` seconds for
    it, then kill it (at once when ``wait`` is 0: a helper given up on)."""
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if f is not None:
                f.close()
    if wait > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def serve(spec: Mapping[str, Any], fd_out: int) -> None:  # pragma: no cover - in the helper
    """The helper's loop: open the store, say ready, commit each batch read from stdin and
    answer ``[seq, None]`` or ``[seq, error]`` on ``fd_out``; at end of file, close the store
    and exit."""
    from ..store import ArtifactWrite, CallWrite, EdgeWrite, FlowWrite, NodeWrite, RunWrite
    from ..store.sqlite import SQLiteStore

    fd_in = sys.stdin.fileno()
    try:
        store = SQLiteStore(**spec["store"])
        store.tune_for_writing()
    except Exception as exc:
        with contextlib.suppress(OSError):
            _write_all(fd_out, _frame(marshal.dumps([0, f"{type(exc).__name__}: {exc}"])))
        return
    try:
        _write_all(fd_out, _frame(marshal.dumps([0, None])))
    except OSError:  # the application ended before it needed us
        store.close()
        return
    try:
        while True:
            batch = _read_frame(fd_in, None)
            if batch is None:
                return
            seq, nodes, artifacts, edges, calls, flows, runs, replays, aliases = batch
            error: str | None = None
            try:
                store.write(
                    [NodeWrite._make(r) for r in nodes],
                    [ArtifactWrite._make(r) for r in artifacts],
                    [EdgeWrite._make(r) for r in edges],
                    calls=[CallWrite._make(r) for r in calls],
                    flows=[FlowWrite._make(r) for r in flows],
                    runs=[RunWrite._make(r) for r in runs],
                    replays=replays,
                    aliases=[tuple(a) for a in aliases],
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            try:
                _write_all(fd_out, _frame(marshal.dumps([seq, error])))
            except OSError:
                return  # the application is gone; what was committed stays committed
            if error is None:
                with contextlib.suppress(Exception):
                    store.after_batch()
    finally:
        with contextlib.suppress(Exception):
            store.close()
