"""Engine resolution and the "never break the host" guard shared by the cache and handler.

Every store call an adapter makes goes through :class:`Guard`: a store error (disk full, file
read-only or deleted, schema mismatch) becomes a miss / a skipped record plus ONE warning per
object, so LangChain keeps answering from the provider.

Example:
    >>> g = Guard("demo")
    >>> g.call(lambda: 1 / 0, default=None) is None  # warns once, returns the default
    True
"""

from __future__ import annotations

import contextlib
import json
import json.encoder
import os
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from musubi_core.codec import JSON_ENCODING, JSONCodec
from musubi_core.engine import Engine, Recorded, get_engine
from musubi_core.errors import MusubiError
from musubi_core.fastpath import NOT_PLAIN, count_replay, plain_tree
from musubi_core.identity import NodeKey
from musubi_core.store import ArtifactWrite, EdgeWrite, NodeRecord, NodeWrite, SQLiteStore

T = TypeVar("T")

# What a store failure can look like from the outside. Anything else raised by our own code is a
# bug, but it still must not reach LangChain, so the guard catches Exception and says so.
STORE_ERRORS: tuple[type[BaseException], ...] = (MusubiError, sqlite3.Error, OSError)


class MusubiLangChainWarning(UserWarning):
    """musubi could not read or write its store; LangChain continues without it."""


# This process's id, kept current across fork without a syscall per call.
_PID = [os.getpid()]


def _after_fork() -> None:
    _PID[0] = os.getpid()
    # The parent commits its own staged rows; the child must not repeat them (as the core
    # does for its write-behind buffers).
    for engine in list(_STAGING_ENGINES):
        engine._reset_staging()


os.register_at_fork(after_in_child=_after_fork)


# Rows the callback handler hands over (see :meth:`WriteBehindEngine.stage`): plain tuples in
# the field order of NodeWrite, ArtifactWrite and EdgeWrite. They are staged flat (their fields
# appended to one list per kind), so rows waiting up to a second for the writer thread are no
# objects the garbage collector counts, scans or promotes: the write objects of the core, which
# stay tracked, made a chain's allocations outnumber its deallocations and so triggered young
# collections and, by promoting them, full ones over the whole heap.
NodeRow = tuple[
    str,
    str,
    str,
    str,
    str,
    str,
    str,
    "str | None",
    str,
    "float | None",
    "float | None",
    "float | None",
    "float | None",
    "int | None",
    "int | None",
    "str | None",
    "str | None",
    "str | None",
    "str | None",
    "str | None",
    int,
]
ArtifactRow = tuple[str, str, bytes, str]
EdgeRow = tuple[str, str, str, "str | None"]
_NODE_WIDTH = 21  # len(NodeWrite._fields), checked in the tests
_EDGE_WIDTH = 4
_ARTIFACT_WIDTH = 4

_STAGING_ENGINES: weakref.WeakSet[WriteBehindEngine] = weakref.WeakSet()


def _json_text(*, sort_keys: bool) -> Callable[[Any], str]:
    """``json.JSONEncoder(sort_keys=..., separators=(",", ":"), ensure_ascii=False).encode``
    with its C encoder made once instead of per call (the same text: these are the settings of
    ``musubi_core.fastpath``'s canonical and payload encoders)."""
    encoder = json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
    # allow_nan), as JSONEncoder.iterencode passes them, but without the circular-reference
    # markers (state shared by every caller): a plain tree is acyclic (``plain_tree`` recurses
    # through it first), so the instance keeps no state and serves every thread.
    iterencode = make(
        None,
        encoder.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        sort_keys,
        False,
        True,
    )

    def text(value: Any) -> str:
        return "".join(iterencode(value, 0))

    return text


# Text of a plain tree (see ``musubi_core.fastpath.plain_tree``): canonical (sorted keys, what
# ``plain_input_hash`` hashes) and compact (what ``plain_payload`` stores).
canonical_json = _json_text(sort_keys=True)
compact_json = _json_text(sort_keys=False)


class Precoded:
    """A value already encoded as the JSONCodec would encode it (see :class:`PlainAwareCodec`)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class PlainAwareCodec(JSONCodec):
    """The JSON codec, taking :class:`Precoded` values as they are (same encoding, same bytes:
    any engine decodes what it wrote)."""

    def encode(self, value: Any) -> tuple[str, bytes]:
        if type(value) is Precoded:
            return JSON_ENCODING, value.payload
        return super().encode(value)


def storable(engine: Engine, plain: Any) -> Any:
    """``plain`` (already reduced to JSON-shaped data) as ``engine.record`` should get it:
    pre-encoded by the C JSON encoder when the engine's codec accepts that, else as is."""
    if type(engine.codec) is PlainAwareCodec:
        tree = plain_tree(plain)
        if tree is not NOT_PLAIN:
            try:
                return Precoded(compact_json(tree).encode("utf-8", "surrogatepass"))
            except ValueError:  # e.g. an int too long to print: the codec says why
                return plain
    return plain


class WriteBehindEngine(Engine):
    """An :class:`Engine` whose batched (``defer=True``) writes are committed by a background
    thread, so a LangChain callback never waits for SQLite.

    Inside :meth:`deferring` (the handler's and the cache's bookkeeping), a batch that falls
    due wakes the writer thread instead of committing inline; SQLite releases the GIL while it
    writes, so the commit overlaps with the chain that keeps running. Everywhere else
    :meth:`flush` is what it always was: everything buffered is committed before it returns
    (after any batch the writer thread is committing), so ``engine.flush()`` followed by a read
    sees every recorded node. Lookups still consult the buffer, so nothing is ever invisible to
    this engine. A failure in the writer thread goes to ``on_error`` (the owner's one warning).

    >>> import os, tempfile
    >>> engine = WriteBehindEngine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
    >>> key = engine.key("demo", 1)
    >>> with engine.deferring():
    ...     _ = engine.record(key, 2, defer=True)
    >>> engine.flush(); engine.store.get_node(key.node_id).status
    'done'
    >>> engine.close()
    """

    # A read-only store or a garbled node: the engine's warning is LangChain's (the cache and
    # the handler then see no error, so they add none).
    warning_category = MusubiLangChainWarning

    def __init__(self, store: Any, *, namespace: str = "default") -> None:
        super().__init__(store, codec=PlainAwareCodec(), namespace=namespace)
        self.on_error: Callable[[BaseException], None] | None = None
        self._mode = threading.local()
        self._io = threading.Lock()  # one commit of buffered writes at a time
        self._wake = threading.Event()
        self._writer: tuple[int, threading.Thread] | None = None
        self._writer_lock = threading.Lock()
        self._deferring = WriteBehindEngine._Deferring(self._mode)
        self._reset_staging()
        _STAGING_ENGINES.add(self)

    def _reset_staging(self) -> None:
        """Empty staging (new locks too: in a forked child another thread may hold the old)."""
        self._stage_lock = threading.Lock()
        self._drain_lock = threading.Lock()  # one move of staged rows into the buffer at a time
        # Flat: the fields of row i are [i * width:(i + 1) * width].
        self._staged_nodes: list[Any] = []
        self._staged_artifacts: list[Any] = []
        self._staged_edges: list[Any] = []
        # Node ids of staged rows (and of rows being moved into the buffer): lookups of them
        # move the rows first. A stale entry only costs a needless (cheap) drain.
        self._staged_ids: set[str] = set()

    def stage(
        self, node: NodeRow | None, artifact: ArtifactRow | None, edges: Sequence[EdgeRow]
    ) -> None:
        """Buffer one run's finished rows (the handler's writes), flat (see ``NodeRow``); they
        become the core's write objects only when they are committed (on the writer thread) or
        when something needs them in the buffer first (a lookup or a write of a staged node,
        :meth:`flush`)."""
        with self._stage_lock:
            if node is not None:
                self._staged_nodes.extend(node)
                self._staged_ids.add(node[0])
            if artifact is not None:
                self._staged_artifacts.extend(artifact)
            if edges:
                staged = self._staged_edges
                for edge in edges:
                    staged.extend(edge)
        self.kick()

    def _staged_size(self) -> int:
        return len(self._staged_nodes) // _NODE_WIDTH + len(self._staged_edges) // _EDGE_WIDTH

    def _drain(self) -> None:
        """Move the staged rows into the core's write-behind buffer, in the order staged."""
        if self._staged_nodes or self._staged_artifacts or self._staged_edges:
            self._move_staged()

    def _drain_for(self, node_id: str) -> None:
        if node_id in self._staged_ids:
            # Even when the lists look empty: another thread may be moving this row right now,
            # and the buffer holds it only once that move (under _drain_lock) is done.
            self._move_staged()

    def _take_staged(
        self,
    ) -> tuple[list[NodeWrite], list[ArtifactWrite], list[EdgeWrite]]:
        """Empty staging and return its rows as the core's write objects (tuples; the caller
        holds ``_drain_lock`` and makes them visible elsewhere before releasing it)."""
        with self._stage_lock:
            nodes, artifacts, edges = self._staged_nodes, self._staged_artifacts, self._staged_edges
            self._staged_nodes, self._staged_artifacts, self._staged_edges = [], [], []
        return (
            [
                NodeWrite._make(nodes[i : i + _NODE_WIDTH])
                for i in range(0, len(nodes), _NODE_WIDTH)
            ],
            [
                ArtifactWrite._make(artifacts[i : i + _ARTIFACT_WIDTH])
                for i in range(0, len(artifacts), _ARTIFACT_WIDTH)
            ],
            [
                EdgeWrite._make(edges[i : i + _EDGE_WIDTH])
                for i in range(0, len(edges), _EDGE_WIDTH)
            ],
        )

    def _restage_ids(self) -> None:
        with self._stage_lock:  # the taken rows are visible elsewhere now
            self._staged_ids = set(self._staged_nodes[::_NODE_WIDTH])

    def _move_staged(self) -> None:
        with self._drain_lock:
            nodes, artifacts, edges = self._take_staged()
            buffer = self._buffer
            with buffer.lock:
                buffer.nodes.update([(n.node_id, n) for n in nodes])
                buffer.artifacts.update([(a.artifact_id, a) for a in artifacts])
                buffer.edges.extend(edges)
            self._restage_ids()

    def _commit(self) -> None:
        """Commit everything buffered and staged, in one transaction (the caller holds ``_io``).

        Staged rows go to the store as they are (write objects are tuples: no trip through the
        buffer's maps). Buffered rows go first: a write of the core drains the staged rows of
        its node before it buffers its own, so whatever is still staged is newer.
        ``_drain_lock`` is held until the commit is done, so a lookup of a staged node that
        arrives meanwhile waits for it rather than missing it.
        """
        with self._drain_lock:
            nodes, artifacts, edges = self._take_staged()
            buffered_nodes, buffered_artifacts, buffered_edges, replays = self._buffer.take()
            try:  # (an empty write is a no-op for every store: conformance-tested)
                self.store.write(
                    buffered_nodes + nodes, buffered_artifacts + artifacts, buffered_edges + edges
                )
            finally:
                self._restage_ids()
        if replays:
            self.store.add_replays(replays, time.time())

    # Staged rows must be in the buffer before the core looks at (or writes) the same node,
    # so that lookups see them and a newer write of the node is not overwritten by them.
    def _find(self, node_id: str) -> tuple[NodeRecord, str | None, bytes | None] | None:
        self._drain_for(node_id)
        return super()._find(node_id)

    def _unbuffer(self, node_id: str) -> None:
        self._drain_for(node_id)
        super()._unbuffer(node_id)

    def record(self, key: NodeKey, *args: Any, **kwargs: Any) -> Recorded:
        self._drain_for(key.node_id)
        return super().record(key, *args, **kwargs)

    def record_failure(self, key: NodeKey, *args: Any, **kwargs: Any) -> Recorded:
        self._drain_for(key.node_id)
        return super().record_failure(key, *args, **kwargs)

    class _Deferring:
        __slots__ = ("_mode",)

        def __init__(self, mode: threading.local) -> None:
            self._mode = mode

        def __enter__(self) -> None:
            self._mode.on = True

        def __exit__(self, *exc: object) -> None:
            self._mode.on = False

    def deferring(self) -> WriteBehindEngine._Deferring:
        """Context in which a due batch is handed to the writer thread (reusable: the flag it
        sets is per thread)."""
        return self._deferring

    # A deferred batch is committed when it holds this many writes or is this old: SQLite's
    # per-transaction cost is large next to a row's, so batches well past the core's default
    # keep the writer thread's share of the CPU small.
    BATCH_ITEMS = 1024
    BATCH_SECONDS = 1.0

    def flush(self) -> None:
        """Commit everything buffered now (from a deferring context: wake the writer)."""
        if getattr(self._mode, "on", False) and not self._closed:
            buffer = self._buffer
            size = len(buffer.nodes) + len(buffer.edges) + len(buffer.replays) + self._staged_size()
            writer = self._writer
            if size < self.BATCH_ITEMS and writer is not None and writer[0] == _PID[0]:
                return  # the writer's timer commits it
            if self._ensure_writer():
                if size >= self.BATCH_ITEMS and not self._wake.is_set():
                    self._wake.set()
                return
        with self._io:
            self._commit()

    def kick(self) -> None:
        """After writes were added to the buffer (see :func:`push`): make sure the writer
        thread will commit them, waking it at once when the batch is full."""
        writer = self._writer
        if writer is not None and writer[0] == _PID[0]:
            if not self._wake.is_set():
                buffer = self._buffer
                size = (
                    len(buffer.nodes)
                    + len(buffer.edges)
                    + len(buffer.replays)
                    + self._staged_size()
                )
                if size >= self.BATCH_ITEMS:
                    self._wake.set()
            return
        if self._closed or not self._ensure_writer():
            with self._io:  # no writer thread can start (interpreter exit): commit inline
                self._commit()

    def count_replay(self, node_id: str) -> None:
        """Count a replay; the writer thread commits the counts with its next batch."""
        count_replay(self, node_id, flush_when_due=False)  # first: see _writer_loop
        writer = self._writer
        if (
            (writer is None or writer[0] != _PID[0])
            and not self._closed
            and not self._ensure_writer()
        ):
            with self._io:  # no writer thread can start (interpreter exit): commit inline
                self._commit()

    def _ensure_writer(self) -> bool:
        writer = self._writer
        pid = _PID[0]
        if writer is not None and writer[0] == pid and writer[1].is_alive():
            return True
        with self._writer_lock:
            writer = self._writer
            if writer is None or writer[0] != pid or not writer[1].is_alive():
                thread = threading.Thread(
                    target=self._run_writer, name="musubi-langchain-writer", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutting down: commit inline
                    return False
                self._writer = (pid, thread)
        return True

    # The writer thread ends after this many idle periods (nothing to commit), so an engine
    # nobody uses any more can be collected; the next deferred write starts a new one.
    IDLE_PERIODS = 30

    def _pending(self) -> bool:
        buffer = self._buffer
        return bool(
            buffer.nodes
            or buffer.edges
            or buffer.replays
            or buffer.artifacts
            or self._staged_nodes
            or self._staged_artifacts
            or self._staged_edges
        )

    def _run_writer(self) -> None:
        me = threading.current_thread()
        try:
            self._writer_loop(me)
        finally:
            with self._writer_lock:
                if self._writer is not None and self._writer[1] is me:
                    self._writer = None

    def _writer_loop(self, me: threading.Thread) -> None:
        idle = 0
        while not self._closed:
            self._wake.wait(self.BATCH_SECONDS)
            self._wake.clear()
            if not self._pending():
                idle += 1
                if idle < self.IDLE_PERIODS:
                    continue
                # Retire. Recorders only skip waking a writer while ``_writer`` is set, so
                # clear it first, then look once more: a write that slipped in between is
                # either seen here or finds ``_writer`` unset and starts a new thread.
                with self._writer_lock:
                    if self._writer is None or self._writer[1] is not me:
                        return
                    self._writer = None
                if not self._pending():
                    return
                with self._writer_lock:
                    if self._writer is not None:
                        return  # a new writer took over
                    self._writer = (_PID[0], me)
            idle = 0
            try:
                with self._io:
                    if self._closed:
                        return
                    self._commit()
            except Exception as exc:
                handler = self.on_error
                if handler is not None:
                    with contextlib.suppress(Exception):
                        handler(exc)


def make_engine(path: str | os.PathLike[str] | None, store: Any | None, namespace: str) -> Engine:
    """The engine for ``path``/``store``; neither given means the process default engine
    (``$MUSUBI_DB`` or ``.musubi/musubi.db``) viewed under ``namespace``."""
    if store is not None:
        return WriteBehindEngine(store, namespace=namespace)
    if path is not None:
        return WriteBehindEngine(SQLiteStore(path), namespace=namespace)
    default = get_engine()
    if default.namespace == namespace:
        return default
    return WriteBehindEngine(default.store, namespace=namespace)


def push(
    engine: Engine,
    node: NodeRow | None,
    artifact: ArtifactRow | None,
    edges: Sequence[EdgeRow],
) -> None:
    """Add one run's finished rows to ``engine``'s write-behind buffer, as ``record(...,
    defer=True)`` and ``add_edge(..., defer=True)`` do, in one step (the handler builds the
    rows itself).

    A :class:`WriteBehindEngine` stages them as tuples and leaves the commit to its writer
    thread; any other engine gets the write objects and commits inline once its buffer is
    due, as the core's deferred writes do.
    """
    if engine._skips_writes():
        return
    if isinstance(engine, WriteBehindEngine):
        engine.stage(node, artifact, edges)
        return
    buffer = engine._buffer
    with buffer.lock:
        if node is not None:
            buffer.nodes[node[0]] = NodeWrite._make(node)
        if artifact is not None:
            buffer.artifacts[artifact[0]] = ArtifactWrite._make(artifact)
        if edges:
            buffer.edges.extend([EdgeWrite._make(e) for e in edges])
    if buffer.due():
        engine.flush()


class _NoDefer:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_DEFER = _NoDefer()


def deferring(engine: Engine) -> Any:
    """``engine.deferring()`` for a :class:`WriteBehindEngine`, else a no-op context."""
    if isinstance(engine, WriteBehindEngine):
        return engine.deferring()
    return _NO_DEFER


class Guard:
    """Runs store calls, turning failures into a default value and a single warning."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._warned = False
        self._lock = threading.Lock()

    @property
    def warned(self) -> bool:
        return self._warned

    def warn(self, exc: BaseException) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        kind = "store error" if isinstance(exc, STORE_ERRORS) else "internal error"
        warnings.warn(
            f"musubi {self._owner}: {kind} ({type(exc).__name__}: {exc}); continuing without "
            "replay/recording for the affected calls (further errors are not reported)",
            MusubiLangChainWarning,
            stacklevel=3,
        )

    def call(self, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception as exc:
            self.warn(exc)
            return default
