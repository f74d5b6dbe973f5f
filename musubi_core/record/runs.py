"""Runs and calls as they happen: which run is current, which call is running, and the rows
that record them.

A *run* is one trace: a root LangChain run, a LlamaIndex root span or workflow run, a durable
run, a top-level ``@step`` call tree, or a block named with :func:`trace`. A *call* is one
execution or one replay inside a run, with its parent call (the call tree) and its order in the
run. Whoever executes something (``@step``, the runner, an adapter's handler) asks for the
current :class:`Frame`; inside one it records its call in that run, under that call, and
otherwise it starts a run of its own.

>>> import os, tempfile
>>> from musubi_core import Engine, SQLiteStore, step, use_engine
>>> @step
... def double(x: int) -> int:
...     return 2 * x
>>> with Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))) as engine:
...     with use_engine(engine), trace("nightly") as run:
...         _ = double(1), double(2)
...     engine.flush()
...     [(r.name, r.calls) for r in engine.store.list_runs()]
[('nightly', 2)]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

from .._pid import PID as _PID
from ..store import CallWrite, FlowWrite, RunWrite
from .preview import preview, storable_text

if TYPE_CHECKING:
    from ..engine import Engine
    from .recorder import Recorder

__all__ = [
    "Frame",
    "RunState",
    "current_frame",
    "enter_call",
    "in_call",
    "leave_call",
    "new_call_id",
    "new_run_id",
    "trace",
]

_HOST = socket.gethostname()
_new = tuple.__new__
# Run totals are updated under one lock for all runs (a batch's counts at a time: short).
_COUNT_LOCK = threading.Lock()
_REPLAYED = CallWrite._fields.index("replayed")
_TOKENS_IN = CallWrite._fields.index("tokens_in")
_TOKENS_OUT = CallWrite._fields.index("tokens_out")
_SAVED_S = CallWrite._fields.index("saved_s")


class _Ids:
    """Call ids: a per-process random token, then a counter (hex, 24 characters): unique
    across processes and machines, and increasing within a process, so the calls table (keyed
    by them) grows by appending."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.token = os.urandom(7).hex()
        self.counter = itertools.count(1)
        # Run ids are typed by people (`musubi steps 5c1e0f`): random from the first
        # character, so a short prefix tells runs apart (a generator seeded from the system
        # once, not a system call per run).
        self.random = random.Random(os.urandom(16))


_IDS = _Ids()


def _after_fork_in_child() -> None:
    _IDS.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def new_call_id() -> str:
    return f"{_IDS.token}{next(_IDS.counter):010x}"


def new_run_id() -> str:
    """A run id: 16 random hex characters (no system call per run: ``os.urandom`` costs up
    to 150 µs on a busy VM)."""
    return f"{_IDS.random.getrandbits(64):016x}"


class RunState:
    """A run being recorded in this process: its identity, its call counter and its totals
    (written on its row when it ends)."""

    __slots__ = (
        "_seq",
        "calls",
        "kind",
        "name",
        "namespace",
        "recorder",
        "replays",
        "root_call_id",
        "run_id",
        "seconds_saved",
        "started_at",
        "t0",
        "tokens_in",
        "tokens_out",
        "tokens_saved",
    )

    def __init__(
        self,
        recorder: Recorder,
        kind: str,
        name: str | None,
        *,
        run_id: str | None = None,
        namespace: str = "default",
        first_seq: int = 0,
    ) -> None:
        self.recorder = recorder
        self.kind = kind
        self.name = name
        self.run_id = run_id or new_run_id()
        self.namespace = namespace
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        # A run recorded by several processes (one joined another's run): each numbers its
        # calls from where the run was handed over.
        self._seq = itertools.count(first_seq)
        self.root_call_id: str | None = None
        self.calls = self.replays = 0
        self.tokens_in = self.tokens_out = self.tokens_saved = 0
        self.seconds_saved = 0.0

    def next_seq(self) -> int:
        return next(self._seq)

    def row(
        self, status: str, error: str | None = None, *, duration: float | None = None
    ) -> RunWrite:
        """The run's row now (or, with ``duration``, as it ended that long after it started:
        a recorder that writes it later)."""
        if duration is None and status != "running":
            duration = time.perf_counter() - self.t0
        return _new(  # RunWrite(...), without its Python-level __new__
            RunWrite,
            (
            self.run_id,
            self.kind,
            self.name,
            status,
            self.started_at,
            self.started_at + duration if duration is not None else None,
            duration,
            _HOST,
            _PID[0],
            error,
            self.namespace,
            self.root_call_id,
            self.calls,
            self.replays,
            self.tokens_in,
            self.tokens_out,
            self.tokens_saved,
            self.seconds_saved,
            ),
        )

    def start(self) -> None:
        """Record the run as running (a reader sees it at the next commit)."""
        self.recorder.submit(runs=(self.row("running"),))

    def finish(self, status: str = "done", error: BaseException | str | None = None) -> None:
        text = error if isinstance(error, str) or error is None else _error_text(error)
        self.recorder.submit(runs=(self.row(status, text),))

    def count(self, call: CallWrite) -> None:
        """Add one recorded call to the run's totals."""
        self.count_rows((call,))

    def count_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add recorded calls (rows in :class:`CallWrite`'s field order) to the run's totals:
        one lock for a whole batch (an adapter that buffers a trace's rows counts them when
        it hands them over)."""
        calls = replays = tokens_in = tokens_out = saved_tokens = 0
        saved = 0.0
        for row in rows:
            calls += 1
            tin, tout = row[_TOKENS_IN] or 0, row[_TOKENS_OUT] or 0
            if row[_REPLAYED]:
                replays += 1
                saved_tokens += tin + tout
                saved += row[_SAVED_S] or 0.0
            else:
                tokens_in += tin
                tokens_out += tout
        with _COUNT_LOCK:
            self.calls += calls
            self.replays += replays
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            self.tokens_saved += saved_tokens
            self.seconds_saved += saved

    def record(
        self,
        call_id: str,
        parent_call_id: str | None,
        kind: str,
        op_name: str,
        *,
        seq: int | None = None,
        node_id: str | None = None,
        artifact_id: str | None = None,
        replayed: bool = False,
        status: str = "done",
        error: BaseException | str | None = None,
        started_at: float | None = None,
        duration_s: float | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        saved_s: float | None = None,
        model: str | None = None,
        inputs: Any = None,
        output: Any = None,
        input_preview: str | None = None,
        output_preview: str | None = None,
        flows: Sequence[FlowWrite] = (),
        submit: bool = True,
        count: bool = True,
    ) -> CallWrite:
        """Record one call of this run (previews are made of ``inputs``/``output`` unless
        given as text). ``submit=False`` only builds the row, for a caller that commits it
        itself (a durable checkpoint) and then counts it with :meth:`count`."""
        row = _new(  # CallWrite(...), without its Python-level __new__
            CallWrite,
            (
            call_id,
            self.run_id,
            parent_call_id,
            self.next_seq() if seq is None else seq,
            kind,
            op_name,
            node_id,
            artifact_id,
            1 if replayed else 0,
            status,
            storable_text(error) if isinstance(error, str) else (
                None if error is None else _error_text(error)
            ),
            time.time() if started_at is None else started_at,
            duration_s,
            tokens_in,
            tokens_out,
            saved_s,
            model,
            input_preview if input_preview is not None else preview(inputs),
            output_preview if output_preview is not None else (
                _replayed_preview(artifact_id, output)
                if replayed and artifact_id is not None
                else preview(output)
            ),
            self.namespace,
            ),
        )
        if parent_call_id is None and self.root_call_id is None:
            self.root_call_id = call_id
        if count:
            self.count(row)
        if submit:
            self.recorder.call(row, flows)
        return row


# (artifact id, type of the value served) -> the preview of that value. A replay's output is
# built from the artifact's bytes, and the artifact id is the hash of those bytes: the same id
# served as the same type, the same value, the same preview. Bounded: emptied when full.
_REPLAYED_PREVIEWS: dict[tuple[str, type], str | None] = {}
_MAX_REPLAYED_PREVIEWS = 4096
_UNSEEN = object()  # not a preview (None is one): a cold replay raises no KeyError


def _replayed_preview(artifact_id: str, output: Any) -> str | None:
    key = (artifact_id, type(output))
    text = _REPLAYED_PREVIEWS.get(key, _UNSEEN)
    if text is not _UNSEEN:
        return text  # type: ignore[return-value]
    text = preview(output)
    if len(_REPLAYED_PREVIEWS) >= _MAX_REPLAYED_PREVIEWS:
        _REPLAYED_PREVIEWS.clear()
    _REPLAYED_PREVIEWS[key] = text
    return text


def _error_text(error: BaseException) -> str:
    return storable_text(f"{type(error).__name__}: {error}"[:4000])


class Frame(NamedTuple):
    """Where recording is now: the current run, and the call running in it (None at the top
    of a :func:`trace` block or a durable run's body)."""

    run: RunState
    call_id: str | None


_FRAME: ContextVar[Frame | None] = ContextVar("musubi_frame", default=None)


def current_frame() -> Frame | None:
    """The run and call being recorded here, if any (per thread and asyncio task; submit
    ``contextvars.copy_context().run`` to a thread pool so its workers inherit it)."""
    return _FRAME.get()


def joinable(frame: Frame | None, recorder: Recorder) -> Frame | None:
    """``frame`` if a call recorded through ``recorder`` belongs in its run (one store per run:
    a component writing to another store starts a run of its own there)."""
    if frame is None:
        return None
    mine = frame.run.recorder
    if mine is recorder or mine.store.path == recorder.store.path:
        return frame
    return None


def enter_call(run: RunState, call_id: str | None) -> Token[Frame | None]:
    """Make ``call_id`` of ``run`` the current call from now on in this context, without a
    block (a handler restoring a run handed over from another process); :func:`leave_call`
    with the token undoes it."""
    return _FRAME.set(Frame(run, call_id))


def leave_call(token: Token[Frame | None]) -> None:
    """Undo :func:`enter_call` (in the context that entered)."""
    _FRAME.reset(token)


@contextlib.contextmanager
def in_call(run: RunState, call_id: str | None) -> Iterator[Frame]:
    """Make ``call_id`` of ``run`` the current call inside the block."""
    frame = Frame(run, call_id)
    token = _FRAME.set(frame)
    try:
        yield frame
    finally:
        _FRAME.reset(token)


@contextlib.contextmanager
def trace(
    name: str, *, kind: str = "script", engine: Engine | None = None
) -> Iterator[RunState]:
    """Group what the block records into one named run (instead of one run per top-level
    call). The run's status is ``failed`` when the block raises.

    ``engine`` defaults to the current one (:func:`~musubi_core.use_engine`, else the process
    default on ``$MUSUBI_DB``).
    """
    from ..engine import get_engine
    from .recorder import recorder_for

    eng = engine or get_engine()
    run = RunState(recorder_for(eng.store), kind, name, namespace=eng.namespace)
    run.start()
    try:
        with in_call(run, None):
            yield run
    except BaseException as exc:
        run.finish("failed" if isinstance(exc, Exception) else "interrupted", exc)
        raise
    run.finish("done")
