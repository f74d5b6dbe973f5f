"""The one writer: every call, run, flow, deferred node and replay count goes through here.

A :class:`Recorder` belongs to one store object (:func:`recorder_for`) and is shared by every
engine, adapter and run writing to it. Writers hand it rows; a background thread commits them
in batches, one transaction each, so a LangChain callback or a LlamaIndex span never waits for
the disk. Its contract, which the tests hold it to:

* **Bounded.** At most ``max_backlog`` rows wait, and none waits longer than ``max_lag``
  (1 s), counting the rows of a commit in flight. Past either bound the submitting thread
  waits for the commit (backpressure) before its rows are accepted, so memory stays flat and
  a starved writer thread (a busy machine) cannot let acknowledged rows age.
* **Timely.** A commit starts once the oldest waiting row is ``interval`` old (0.25 s), or
  sooner once ``batch_rows`` are waiting.
* **Nothing acknowledged is dropped.** A row is acknowledged when ``submit`` returns. A commit
  that fails (disk full, a locked or read-only file) puts its rows back, in order, ahead of
  newer ones, and the next commit retries them; ``flush()`` raises the error to its caller.
  Only when the backlog is full *and* the inline commit fails does ``submit`` raise
  :class:`~musubi_core.errors.StoreError`, and then the new rows were not accepted.
* **Flushed on close.** Closing the store, closing an engine, interpreter exit and
  ``flush()`` commit everything waiting.
* **Loss window.** A SIGKILL loses at most the rows acknowledged since the last commit: under
  ``max_lag`` plus what is left of one commit, a second or so of calls, stated as two seconds
  (docs/core.md states it; a test measures it).
* **Fork safe.** A child process starts with an empty backlog (the parent commits its own
  rows) and its own writer thread.

Deferred node writes (a batch of embeddings) stay visible to lookups while they wait:
:meth:`Recorder.pending_node` returns them, so a node written a moment ago replays at once.

>>> import os, tempfile
>>> from musubi_core.store import SQLiteStore
>>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
>>> rec = recorder_for(store)
>>> rec is recorder_for(store)
True
>>> rec.flush(); store.close()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from .._pid import PID as _PID
from ..errors import ReadOnlyStoreError, StoreError
from ..store import ArtifactWrite, CallWrite, EdgeWrite, FlowWrite, NodeWrite, RunWrite, Store
from .writer_process import Helpers

__all__ = ["Batch", "Recorder", "flush_recorders", "recorder_for"]

# What a source hands over (see Recorder.add_source): the arguments of Recorder.submit, in
# order (nodes, artifacts, edges, calls, flows, runs, replays).
Batch = tuple[
    Sequence[NodeWrite],
    Sequence[ArtifactWrite],
    Sequence[EdgeWrite],
    Sequence[CallWrite],
    Sequence[FlowWrite],
    Sequence[RunWrite],
    Iterable[str],
]

_RECORDERS: weakref.WeakKeyDictionary[Any, Recorder] = weakref.WeakKeyDictionary()
_RECORDERS_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()


def recorder_for(store: Store) -> Recorder:
    """The recorder of ``store`` (made on first use; one per store object)."""
    rec = _RECORDERS.get(store)
    if rec is not None:
        return rec
    with _RECORDERS_LOCK:
        rec = _RECORDERS.get(store)
        if rec is None:
            rec = Recorder(store)
            _RECORDERS[store] = rec
            hook = getattr(store, "add_close_hook", None)
            if hook is not None:
                hook(rec.close)
        return rec


def flush_recorders(path: str | None = None) -> None:
    """Commit what every recorder of this process holds (only those writing to ``path``, when
    given): an invalidation or a reader in this process then sees everything recorded."""
    for rec in list(_LIVE):
        if not rec.closed and (path is None or getattr(rec.store, "path", None) == path):
            rec.flush()


class Recorder:
    """Write-behind queue of one store; see the module docstring for its contract."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 0.25,
        batch_rows: int = 8192,
        max_backlog: int = 30_000,
        max_lag: float = 1.0,
    ) -> None:
        self.store = store
        self.interval = interval
        self.max_lag = max_lag
        self.batch_rows = batch_rows
        self.max_backlog = max_backlog
        # Called (from the writer thread) with the error of a failed background commit; the
        # rows stay queued and are retried. Owners set it to their one warning.
        self.on_error: Callable[[BaseException], None] | None = None
        self.closed = False
        # A read-only store (see SQLiteStore.read_only) can never take a row.
        self.read_only = bool(getattr(store, "read_only", False))
        self._warned_read_only = False
        # May a steady load hand the commits to a helper process (see writer_process)? False:
        # always commit on this process's writer thread (as MUSUBI_WRITER=thread does).
        self.helper = True
        self.commits = 0  # successful commits (for tests and `stats`)
        self.failures = 0  # failed commits since the last success
        # Where rows are pulled from before each commit (see add_source); kept across fork:
        # the owners (a callback handler) live on in the child.
        self._sources: list[Callable[[], Callable[[], Batch | None] | None]] = []
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """An empty backlog, new locks, no writer (also after fork, in the child)."""
        helpers: Helpers | None = getattr(self, "_helpers", None)
        if helpers is not None:
            helpers.abandon()  # a forked child: the parent's helper serves the parent only
        self._helpers = Helpers(self.store)  # the helper process, once a steady load starts one
        self._lock = threading.Lock()  # guards the backlog
        self._io = threading.Lock()  # one commit at a time
        self._committed = threading.Condition()  # notified after every commit attempt
        self._wake = threading.Event()
        self._writer: tuple[int, threading.Thread] | None = None
        self._nodes: list[NodeWrite] = []
        self._artifacts: list[ArtifactWrite] = []
        self._edges: list[EdgeWrite] = []
        self._calls: list[CallWrite] = []
        self._flows: list[FlowWrite] = []
        self._runs: dict[str, RunWrite] = {}  # the latest row of each run wins
        self._replays: Counter[str] = Counter()
        self._aliases: list[tuple[bytes, str]] = []
        # Deferred node writes by id, for lookups (see pending_node).
        self._pending: dict[str, tuple[NodeWrite, ArtifactWrite | None]] = {}
        self._size = 0
        self._since = time.monotonic()  # when the oldest waiting row arrived
        # When the oldest row of the commit in flight arrived (None: no commit in flight).
        self._committing: float | None = None

    # -- accepting rows -------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Rows waiting to be committed."""
        return self._size

    def submit(
        self,
        *,
        nodes: Sequence[NodeWrite] = (),
        artifacts: Sequence[ArtifactWrite] = (),
        edges: Sequence[EdgeWrite] = (),
        calls: Sequence[CallWrite] = (),
        flows: Sequence[FlowWrite] = (),
        runs: Sequence[RunWrite] = (),
        replays: Iterable[str] = (),
        aliases: Sequence[tuple[bytes, str]] = (),
    ) -> None:
        """Queue rows for the next commit (acknowledged when this returns). On a read-only
        store nothing is queued: the rows are dropped with one warning (they could never be
        written; the store still serves replays)."""
        if self.read_only:
            self.skip_read_only()
            return
        if self.closed:
            self.refuse_closed()
        if self._size and (self._size >= self.max_backlog or self._lagging()):
            self._backpressure()
        self._kick(self._accept(nodes, artifacts, edges, calls, flows, runs, replays, aliases))

    def _accept(
        self,
        nodes: Sequence[NodeWrite] = (),
        artifacts: Sequence[ArtifactWrite] = (),
        edges: Sequence[EdgeWrite] = (),
        calls: Sequence[CallWrite] = (),
        flows: Sequence[FlowWrite] = (),
        runs: Sequence[RunWrite] = (),
        replays: Iterable[str] = (),
        aliases: Sequence[tuple[bytes, str]] = (),
    ) -> int:
        """Add rows to the backlog; returns its size."""
        with self._lock:
            size = self._size
            if not size:
                self._since = time.monotonic()
            if nodes:
                self._nodes.extend(nodes)
                by_id = {a.artifact_id: a for a in artifacts}
                for n in nodes:
                    self._pending[n.node_id] = (n, by_id.get(n.artifact_id or ""))
                size += len(nodes)
            if artifacts:
                self._artifacts.extend(artifacts)
            if edges:
                self._edges.extend(edges)
                size += len(edges)
            if calls:
                self._calls.extend(calls)
                size += len(calls)
            if flows:
                self._flows.extend(flows)
                size += len(flows)
            for r in runs:
                self._runs[r.run_id] = r
                size += 1
            for node_id in replays:
                self._replays[node_id] += 1
                size += 1
            if aliases:
                self._aliases.extend(aliases)
                size += len(aliases)
            self._size = size
        return size

    def _appendable(self) -> bool:
        """May a hot path append to the backlog directly? Only while it is non-empty (the
        first row starts the lag clock, in ``_accept``) and within its bounds; anything else
        goes through :meth:`submit` (backpressure, a closed or read-only store)."""
        size = self._size
        return not (
            self.closed
            or self.read_only
            or not size
            or size >= self.max_backlog
            or self._lagging()
        )

    def call(self, row: CallWrite, flows: Sequence[FlowWrite] = ()) -> None:
        """Queue one call and the flows into it (the hot path of every adapter)."""
        if not self._appendable():
            self.submit(calls=(row,), flows=flows)
            return
        with self._lock:
            self._calls.append(row)
            if flows:
                self._flows.extend(flows)
            size = self._size = self._size + 1 + len(flows)
        self._kick(size)

    def replay(self, node_id: str) -> None:
        """Count one replay of ``node_id`` (the hot path of every cache hit, as :meth:`call`)."""
        if not self._appendable():
            self.submit(replays=(node_id,))
            return
        with self._lock:
            self._replays[node_id] += 1
            size = self._size = self._size + 1
        self._kick(size)

    def hold(self, waiting: int, since: float) -> None:
        """A source (see :meth:`add_source`) holds ``waiting`` acknowledged rows, the oldest
        since ``since`` (``time.monotonic()``): they count against the bounds as if they
        waited here. Past ``max_backlog`` or ``max_lag`` the caller waits for a commit, which
        pulls them (backpressure, as in :meth:`submit`); below them this only makes sure a
        writer runs. Raises :class:`~musubi_core.errors.StoreError` once the recorder is
        closed (nothing could commit the rows)."""
        if self.read_only:
            return  # dropped at the pull, with the one warning
        if self.closed:
            self.refuse_closed()
        size = self._size + waiting
        if size >= self.max_backlog or (
            not self.failures and time.monotonic() - since > self.max_lag
        ):
            self._backpressure(pull=True)
        else:
            self._kick(size)

    def refuse_closed(self) -> NoReturn:
        """Raise the :class:`~musubi_core.errors.StoreError` a row offered to a closed
        recorder gets (nothing could commit it)."""
        raise StoreError(
            f"the recorder of {self.store.path} is closed; open the store again",
            path=self.store.path,
        )

    def skip_read_only(self, category: type[Warning] = RuntimeWarning) -> None:
        """A write was skipped because the store is read-only: say so, once per store (through
        ``on_error`` when an owner set it, else as a ``category`` warning)."""
        if self._warned_read_only:
            return
        self._warned_read_only = True
        path = self.store.path
        handler = self.on_error
        if handler is not None:
            handler(ReadOnlyStoreError(path, action="record"))
            return
        warnings.warn(
            f"musubi: {path} is read-only: stored results are replayed, but nothing new is "
            "recorded (make the file and its folder writable to record)",
            category,
            stacklevel=4,
        )

    def pending_node(self, node_id: str) -> tuple[NodeWrite, ArtifactWrite | None] | None:
        """A deferred write of ``node_id`` not committed yet (its newest), else None."""
        pending = self._pending
        return pending.get(node_id) if pending else None

    def _kick(self, size: int) -> None:
        writer = self._writer
        if writer is not None and writer[0] == _PID[0]:
            if size >= self.batch_rows and not self._wake.is_set():
                self._wake.set()
            return
        if not self._ensure_writer():
            self.flush()  # no thread can start (interpreter exit): commit inline

    def _backpressure(self, *, pull: bool = False) -> None:
        """The backlog is full, or its oldest row has waited past ``max_lag`` (the writer
        thread is starved or its store slow): this thread waits until it is committed before
        adding more, so neither memory nor what a crash can lose grows without bound.

        The writer thread does the commit (woken now; the waiting thread gives it the GIL): its
        connection is the one tuned for batches, while a lookup connection that committed
        batches would fill its large page cache with them. Without a live writer thread, or
        when it makes no progress within a few seconds, this thread commits itself."""
        writer = self._writer
        if writer is not None and writer[0] == _PID[0] and writer[1] is not threading.current_thread():
            commits = self.commits
            self._wake.set()
            with self._committed:
                self._committed.wait_for(
                    lambda: self.commits != commits or self.failures or self.closed, timeout=5.0
                )
            if self.commits != commits:
                return
        with self._io:
            if pull:  # a source's rows passed a bound (see hold): commit them now
                self._pull()
            if self._size and (pull or self._size >= self.max_backlog or self._lagging()):
                self._commit()  # raises StoreError when it cannot: the new rows are refused

    def _lagging(self) -> bool:
        """Has the oldest uncommitted row, waiting or in the commit in flight, waited past
        ``max_lag`` while commits succeed? (A store that is failing is not hurried: its rows
        wait for the retries, up to the size bound.)

        The commit in flight counts: on a busy machine the writer thread needs the GIL for
        every statement of its commit, and an application thread that keeps the interpreter
        busy hands it over only every switch interval, so a commit can crawl while new rows
        are acknowledged. Once its oldest row is ``max_lag`` old, new rows wait for it (see
        :meth:`_backpressure`): what a SIGKILL can lose stays bounded by time, not by how fast
        the writer happens to get the interpreter."""
        if self.failures:
            return False
        committing = self._committing
        oldest = self._since if self._size else committing
        if oldest is None:
            return False
        if committing is not None and committing < oldest:
            oldest = committing
        return time.monotonic() - oldest > self.max_lag

    # -- committing -------------------------------------------------------------------

    def flush(self) -> None:
        """Commit everything waiting now; raises the store's error (the rows stay queued)."""
        with self._io:
            self._commit()

    def add_source(self, pull: Callable[[], Batch | None]) -> None:
        """Register a source of rows the recorder pulls before every commit (held weakly when
        it is a bound method). An adapter that buffers what a trace records, so its hot path
        only appends, registers one: its rows then reach the store at least every
        ``interval`` even while the trace is still running."""
        ref: Callable[[], Callable[[], Batch | None] | None]
        if hasattr(pull, "__self__") and hasattr(pull, "__func__"):
            ref = weakref.WeakMethod(pull)
        else:
            ref = lambda: pull  # noqa: E731
        with self._lock:
            self._sources.append(ref)

    def _pull(self) -> None:
        """Take what the sources hold into the backlog (the caller holds ``_io``)."""
        if not self._sources:
            return
        for ref in list(self._sources):
            pull = ref()
            if pull is None:
                with self._lock, contextlib.suppress(ValueError):
                    self._sources.remove(ref)
                continue
            try:
                batch = pull()
            except Exception as exc:  # a source's failure must not stop the commit
                handler = self.on_error
                if handler is not None:
                    with contextlib.suppress(Exception):
                        handler(exc)
                continue
            if batch is not None:
                if self.read_only:
                    self.skip_read_only()  # never written: said once, as submit() says it
                else:
                    self._accept(*batch)

    def _commit(self) -> None:
        """Take the backlog and write it in one transaction (the caller holds ``_io``)."""
        self._pull()
        with self._lock:
            if not self._size and not self._artifacts:
                return
            nodes, artifacts, edges = self._nodes, self._artifacts, self._edges
            calls, flows, runs, replays = self._calls, self._flows, self._runs, self._replays
            aliases = self._aliases
            size, since = self._size, self._since
            self._nodes, self._artifacts, self._edges = [], [], []
            self._calls, self._flows, self._runs, self._replays = [], [], {}, Counter()
            self._aliases = []
            self._size = 0
            self._committing = since
        try:
            in_process = self._write(
                nodes, artifacts, edges, calls, flows, list(runs.values()), replays, aliases, size
            )
        except BaseException:
            with self._lock:
                # Back in front of anything newer, in the order they were accepted.
                self._nodes = nodes + self._nodes
                self._artifacts = artifacts + self._artifacts
                self._edges = edges + self._edges
                self._calls = calls + self._calls
                self._flows = flows + self._flows
                newer, self._runs = self._runs, runs
                self._runs.update(newer)
                self._replays.update(replays)
                self._aliases = aliases + self._aliases
                self._size += size
                self._since = min(since, self._since) if self._size > size else since
                self._committing = None
            with self._committed:
                self.failures += 1
                self._committed.notify_all()
            raise
        self.failures = 0
        self._committing = None
        with self._committed:
            self.commits += 1
            self._committed.notify_all()
        after = getattr(self.store, "after_batch" if in_process else "written_elsewhere", None)
        if after is not None:
            with contextlib.suppress(Exception):
                after()  # e.g. a checkpoint in the background once the WAL has grown
        if nodes:
            with self._lock:
                pending = self._pending
                for n in nodes:
                    entry = pending.get(n.node_id)
                    if entry is not None and entry[0] is n:
                        del pending[n.node_id]

    def _write(
        self,
        nodes: list[NodeWrite],
        artifacts: list[ArtifactWrite],
        edges: list[EdgeWrite],
        calls: list[CallWrite],
        flows: list[FlowWrite],
        runs: list[RunWrite],
        replays: Counter[str],
        aliases: list[tuple[bytes, str]],
        size: int,
    ) -> bool:
        """Commit one batch of ``size`` rows: by the helper process when it has one and it
        commits it, else on this thread's connection (the store's own error, if any, is raised
        from here). True when this process wrote it."""
        writer = self._writer
        on_writer = writer is not None and writer[1] is threading.current_thread()
        batch = (nodes, artifacts, edges, calls, flows, runs, replays, aliases)
        allowed = self.helper and not self.closed
        if self._helpers.write(batch, size, on_writer=on_writer, allowed=allowed):
            return False
        self.store.write(
            nodes, artifacts, edges, calls=calls, flows=flows, runs=runs, replays=replays,
            aliases=aliases,
        )
        return True

    @property
    def helper_pid(self) -> int | None:
        """The helper process's id while one commits this recorder's batches (else None)."""
        return self._helpers.pid

    def _ensure_writer(self) -> bool:
        pid = _PID[0]
        writer = self._writer
        if writer is not None and writer[0] == pid and writer[1].is_alive():
            return True
        with self._lock:
            writer = self._writer
            if writer is not None and writer[0] == pid and writer[1].is_alive():
                return True
            thread = threading.Thread(
                target=self._run_writer, name="musubi-recorder", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down
                return False
            self._writer = (pid, thread)
        return True

    # The writer thread ends after this many idle intervals, so a recorder nobody uses any
    # more holds no thread; the next submit starts a new one.
    IDLE_INTERVALS = 30

    def _run_writer(self) -> None:
        me = threading.current_thread()
        idle = 0
        tune = getattr(self.store, "tune_for_writing", None)
        if tune is not None:
            # Under the commit lock, and never once closed: closing the store closes this
            # thread's connection, and a statement running on a closed connection crashes.
            with self._io, contextlib.suppress(Exception):
                if not self.closed:
                    tune()  # e.g. a small page cache for a connection that only writes
        try:
            while not self.closed:
                # Commit once the oldest waiting row is ``interval`` old (not ``interval``
                # after the last commit ended): a slow commit does not age the next batch. A
                # failing store is retried every ``interval``.
                wait = self.interval
                if self._size and not self.failures:
                    wait = min(wait, max(0.0, self._since + self.interval - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()
                if self._sources:
                    with self._io:
                        self._pull()  # what running traces buffered counts as waiting
                if not self._size and not self._artifacts:
                    idle += 1
                    if idle < self.IDLE_INTERVALS:
                        continue
                    with self._lock:
                        # Retire, unless rows arrived meanwhile (their submitter saw us alive)
                        # or a source may still buffer rows (a handler that is alive).
                        if self._size or self._artifacts or self._sources:
                            idle = 0
                            continue
                        if self._writer is not None and self._writer[1] is me:
                            self._writer = None
                    with self._io:
                        self._helpers.stop()  # an idle recorder keeps no process either
                    return
                idle = 0
                try:
                    with self._io:
                        self._commit()
                except Exception as exc:
                    handler = self.on_error
                    if handler is not None:
                        with contextlib.suppress(Exception):
                            handler(exc)
        finally:
            with self._lock:
                if self._writer is not None and self._writer[1] is me:
                    self._writer = None

    def close(self) -> None:
        """Commit what is waiting and stop (a failure to commit is raised)."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            with self._io:  # no commit or tuning of the writer's connection runs past here
                self.closed = True
                self._helpers.stop()
            self._wake.set()
            with self._committed:
                self._committed.notify_all()  # nobody waits for a commit that will not come


# Fork safety: no recorder thread may be inside SQLite (a commit, opening its connection) at
# the moment of a fork, or the child inherits SQLite's internal mutexes locked by a thread that
# does not exist there, and its first connect waits forever. Every commit runs under the
# recorder's ``_io`` lock, so a fork takes them all first (waiting for commits in flight).
_FORK_HELD: list[threading.Lock] = []


def _before_fork() -> None:
    for rec in list(_LIVE):
        lock = rec._io
        lock.acquire()
        _FORK_HELD.append(lock)


def _after_fork_in_parent() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop().release()


def _after_fork_in_child() -> None:
    _FORK_HELD.clear()  # the child's recorders get new locks below
    for rec in list(_LIVE):
        rec._reset()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


@atexit.register
def _flush_at_exit() -> None:
    for rec in list(_LIVE):
        if not rec.closed:
            with contextlib.suppress(Exception):
                rec.flush()
            with contextlib.suppress(Exception), rec._io:
                rec._helpers.stop()  # the store is quiet once the process has exited
