"""Durable runs: a workflow that survives ``kill -9`` and resumes where it stopped.

``run(path, workflow)`` calls ``workflow(ctx)``. Each ``ctx.step(name, fn)``
runs ``fn`` once per run and commits its result durably; when the process
dies and the same run is started again, committed steps return their stored
result without running, and the body continues from the first step that had
not committed. ``ctx.sleep(name, duration)`` stores its wake-up time, so a
resumed run sleeps only what is left.

>>> import tempfile, os
>>> db = os.path.join(tempfile.mkdtemp(), "task.db")
>>> calls = []
>>> def fetch():
...     calls.append("fetch")
...     return {"name": "alice"}
>>> def workflow(ctx):
...     user = ctx.step("fetch", fetch)
...     ctx.sleep("cool-off", "10ms")
...     return ctx.step("greet", lambda: f"hi {user['name']}")
>>> run(db, workflow)
'hi alice'
>>> run(db, workflow), calls          # a second invocation replays
('hi alice', ['fetch'])

Without ``run_id`` the file is the task. With ``run_id`` many runs share one
store (e.g. a project's ``.musubi/musubi.db``), each resumable on its own.

Guarantees, and what they cost:

* A step's result, its lineage node (kind ``run_step``), its artifact and the
  ``contains`` edge from the run commit in **one** ``synchronous=FULL``
  transaction: one fsync per step, and the step survives power loss.
* A step that was running when the process died has no commit, so it runs
  again (write steps to be safe to repeat, or make them check first).
* If a resumed body reaches a committed step whose kind (step or sleep) or
  code changed, :class:`~musubi_core.errors.DivergenceError` says which and
  how; ``run(..., rerun_from=name)`` accepts the change by forgetting that
  step and every step recorded after it.
* One writer per run (a ``flock`` on a sidecar file, see :mod:`._lock`);
  readers (``musubi runs``, ``musubi steps RUN``, ``sqlite3``) are safe at
  any time, and see a step in flight as ``pending`` (that marker is a plain,
  un-fsync'd commit: losing it costs nothing, the step re-runs anyway).
* Inside the body the run's engine is current, so ``@step`` functions and
  adapter-recorded LLM calls made within a step land in the same store, as
  children of that step's node.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import socket
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ._duration import Duration, to_seconds
from ._lock import RunLock, lock_path
from .context import current_node, running_node, running_run
from .engine import Engine, use_engine
from .errors import (
    DecodeError,
    DivergenceError,
    DuplicateStepError,
    InvalidStepNameError,
    SerializationError,
    StepFailedError,
)
from .fastpath import count_replay
from .identity import NodeKey, _ast_tree, function_fingerprint
from .policy import StepType
from .probe import artifact_id_for, content_matches
from .record import RunState, current_frame, in_call, new_call_id
from .store import (
    ArtifactWrite,
    CallWrite,
    EdgeWrite,
    FlowWrite,
    NodeWrite,
    PostgresStore,
    RunStepRecord,
    RunStepWrite,
    SQLiteStore,
    is_postgres_target,
    resolve_target,
)
from .store._pglock import PgSessionLock

__all__ = ["DEFAULT_RUN_ID", "Context", "arun", "code_fingerprint", "run", "validate_name"]

T = TypeVar("T")

DEFAULT_RUN_ID = "default"

# fullmatch, not match with "$": "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A run id is part of its sidecar lock file's name ("<store>.<run id>.lock"),
# which the file system caps at 255 bytes: this leaves the store's name room.
MAX_RUN_ID = 128
_HOST = socket.gethostname()

# Test hook: called with the step name after its checkpoint committed and
# before the value is handed back to the body. The crash tests use it to
# kill a process in exactly that window.
_after_checkpoint: Callable[[str], None] | None = None


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid step name, else raise
    :class:`~musubi_core.errors.InvalidStepNameError` (also a ``ValueError``).

    >>> validate_name("fetch-1.v2")
    'fetch-1.v2'
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidStepNameError(name)
    return name


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a valid durable run id (a step name of at most
    :data:`MAX_RUN_ID` characters), else raise :class:`InvalidStepNameError`."""
    if not isinstance(run_id, str) or _NAME.fullmatch(run_id) is None or len(run_id) > MAX_RUN_ID:
        raise InvalidStepNameError(run_id, what="run id", max_length=MAX_RUN_ID)
    return run_id


# -- code fingerprints ---------------------------------------------------------------

_FINGERPRINTS: dict[object, str] = {}


def code_fingerprint(fn: Callable[..., Any]) -> str:
    """What "the step's code" means for divergence detection.

    Functions use :func:`~musubi_core.identity.function_fingerprint` (their
    AST, docstrings and comments ignored). A lambda is narrowed to the lambda
    expression itself when it can be found unambiguously on its line, so
    renaming the variable that receives the step's result is not a change.
    Cached per code object: a step in a loop is fingerprinted once.

    >>> code_fingerprint(lambda: 1) == code_fingerprint(lambda: 1)
    True
    >>> code_fingerprint(lambda: 1) == code_fingerprint(lambda: 2)
    False
    """
    target = inspect.unwrap(fn)
    code = getattr(target, "__code__", None)
    if code is None:
        return function_fingerprint(target)
    cached = _FINGERPRINTS.get(code)
    if cached is None:
        cached = (_lambda_fingerprint(target, code) if code.co_name == "<lambda>" else None) or (
            function_fingerprint(target)
        )
        if len(_FINGERPRINTS) > 4096:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[code] = cached
    return cached


def _lambda_fingerprint(fn: Callable[..., Any], code: Any) -> str | None:
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    line = code.co_firstlineno - start + 1
    params = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda)
        and node.lineno == line
        and [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
        == params
    ]
    if len(found) != 1:
        return None
    rendered = json.dumps(_ast_tree(found[0]), separators=(",", ":"))
    return "lambda:" + hashlib.sha256(rendered.encode("utf-8")).hexdigest()[:32]


# -- what a step consumes ------------------------------------------------------------

_ATOMS = (int, float, bool, type(None), bytes)


def _traceable(value: Any) -> bool:
    """Can ``value`` be recognised by identity? Not numbers, None or short strings: those
    are shared objects (small ints, interned strings) that any step may hand out."""
    if isinstance(value, _ATOMS):
        return False
    return not (isinstance(value, str) and len(value) < 4)


def _captured(fn: Callable[..., Any]) -> list[Any]:
    """What a step function closes over or is given ahead of the call: closure cells,
    defaults, a bound method's receiver, a ``functools.partial``'s arguments."""
    out: list[Any] = []
    seen: set[int] = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, functools.partial):
            out.extend(f.args)
            out.extend(f.keywords.values())
            todo.append(f.func)
            continue
        receiver = getattr(f, "__self__", None)
        if receiver is not None and not inspect.ismodule(receiver):
            out.append(receiver)
        target = getattr(f, "__func__", f)
        for cell in getattr(target, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                out.append(cell.cell_contents)
        out.extend(getattr(target, "__defaults__", None) or ())
        out.extend((getattr(target, "__kwdefaults__", None) or {}).values())
    return out


def _one_level(value: Any) -> list[Any]:
    """``value`` and, for a list, tuple or dict, its items (one level)."""
    if isinstance(value, (list, tuple)):
        return [value, *value]
    if isinstance(value, dict):
        return [value, *value.values()]
    return [value]


def _call_kind(kind: str) -> str:
    return "run_step" if kind == "step" else kind


def _duration(started: float | None, finished: float | None) -> float | None:
    if started is None or finished is None:
        return None
    return max(0.0, finished - started)


# -- one invocation of a run ---------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """A step about to execute: everything its checkpoint will need."""

    name: str
    kind: str
    seq: int
    fingerprint: str | None
    key: NodeKey
    parent: str
    started_at: float
    # Its call: the record of this execution, under ``parent_call`` (None: the run's body).
    call_id: str
    parent_call: str | None
    call_seq: int
    # (call id, artifact id, node id) of the earlier steps whose results ``fn`` consumes.
    consumes: tuple[tuple[str, str | None, str | None], ...]
    t0: float


class _Invocation:
    """State of one ``run()`` call: the lock, the store, what is recorded."""

    def __init__(self, path: str, run_id: str, lock: RunLock | PgSessionLock, engine: Engine,
                 recorded: list[RunStepRecord]) -> None:
        self.path = path
        self.run_id = run_id
        self.lock = lock
        self.engine = engine
        self.store: SQLiteStore | PostgresStore = engine.store  # type: ignore[assignment]
        self.recorded = {r.name: r for r in recorded}
        self.run_key = engine.key(f"run:{run_id}", {"run": run_id})
        self.seen: set[str] = set()
        self.seq = 0
        self.mutex = threading.Lock()
        self.closed = False
        # The run as the recorder sees it: its calls continue the order of earlier
        # invocations. Its row is the durable run's own (begin_run / finish_run).
        self.state = RunState(
            engine.recorder, "durable", None, run_id=run_id, namespace=engine.namespace
        )
        first = self.store.next_call_seq(run_id)
        for _ in range(first):
            self.state.next_seq()
        # Values handed to the body, by identity: (value, call id, artifact id, node id).
        self.handed: dict[int, tuple[Any, str, str | None, str | None]] = {}

    # -- before a step --------------------------------------------------------------

    def begin(self, name: object, kind: str, fn: Callable[..., Any] | None) -> tuple[bool, Any]:
        """Validate and claim ``name``; return ``(True, stored value)`` for a
        committed step, else ``(False, plan)``. Writes nothing on error."""
        if self.closed:
            raise RuntimeError("this run has finished; its Context cannot be used any more")
        step_name = validate_name(name)
        fingerprint = code_fingerprint(fn) if fn is not None else None
        with self.mutex:
            if step_name in self.seen:
                raise DuplicateStepError(step_name)
            self.seen.add(step_name)
            seq = self.seq
            self.seq += 1
        try:
            consumes = self._consumed_by(fn) if fn is not None else ()
            replayed, found = self._replay_or_plan(step_name, kind, seq, fingerprint, consumes)
        except BaseException:
            self.forget(step_name)
            raise
        if replayed:
            # A committed step served to the body: a replay, recorded as a call of this run.
            recorded = self.recorded[step_name]
            frame = current_frame()
            call_id = new_call_id()
            self.state.record(
                call_id, frame.call_id if frame is not None else None, _call_kind(kind),
                step_name, node_id=recorded.node_id, artifact_id=recorded.artifact_id,
                replayed=True, duration_s=0.0, output=found,
                saved_s=_duration(recorded.started_at, recorded.finished_at),
                flows=[FlowWrite(call_id, c, a) for c, a, _n in consumes],
            )
            self._hand(found, call_id, recorded.artifact_id, recorded.node_id)
            if recorded.node_id is not None:
                # Counted on the step's node as any replay is: `musubi stats` and the
                # eviction order (least recently used) see resumed runs' steps being used.
                count_replay(self.engine, recorded.node_id)
        return replayed, found

    def _consumed_by(self, fn: Callable[..., Any]) -> tuple[tuple[str, str | None, str | None], ...]:
        """The earlier steps whose results ``fn`` closes over, is bound to or gets as
        defaults (by identity: the very objects the body was handed), one container deep."""
        handed = self.handed
        if not handed:
            return ()
        found: dict[str, tuple[str, str | None, str | None]] = {}
        for value in _captured(fn):
            for candidate in _one_level(value):
                entry = handed.get(id(candidate))
                if entry is not None and entry[0] is candidate:
                    found[entry[1]] = entry[1:]
        return tuple(found.values())

    def _hand(self, value: Any, call_id: str, artifact_id: str | None, node_id: str | None) -> None:
        """Remember a value given to the body (so later steps consuming it are linked)."""
        if _traceable(value):
            self.handed[id(value)] = (value, call_id, artifact_id, node_id)

    def _replay_or_plan(
        self,
        name: str,
        kind: str,
        seq: int,
        fingerprint: str | None,
        consumes: tuple[tuple[str, str | None, str | None], ...] = (),
    ) -> tuple[bool, Any]:
        recorded = self.recorded.get(name)
        if recorded is not None and recorded.status == "done":
            if recorded.kind != kind:
                raise DivergenceError(
                    name, what="kind", expected=kind, recorded=recorded.kind, run_id=self.run_id
                )
            if recorded.fingerprint != fingerprint:
                raise DivergenceError(
                    name, what="code", expected=str(fingerprint),
                    recorded=str(recorded.fingerprint), run_id=self.run_id,
                )
            if recorded.encoding is None or recorded.payload is None:
                raise DecodeError(
                    f"step {name!r} of run {self.run_id!r} committed but its stored result is "
                    f"missing; re-run it with run(..., rerun_from={name!r})",
                    artifact_id=recorded.artifact_id,
                )
            if self.engine._verify_artifacts and not content_matches(
                recorded.artifact_id, recorded.encoding, recorded.payload
            ):
                raise DecodeError(
                    f"step {name!r} of run {self.run_id!r}: its stored result does not match its "
                    f"content id {str(recorded.artifact_id)[:12]} (the store file was changed "
                    f"after the step committed); re-run it with run(..., rerun_from={name!r})",
                    artifact_id=recorded.artifact_id,
                )
            try:
                return True, self.engine.codec.decode(recorded.encoding, recorded.payload)
            except DecodeError as err:
                raise DecodeError(
                    f"step {name!r} of run {self.run_id!r}: stored result cannot be decoded "
                    f"({err}); re-run it with run(..., rerun_from={name!r})",
                    artifact_id=recorded.artifact_id,
                ) from err
        key = self.engine.key(
            f"run:{self.run_id}:{name}",
            {"run": self.run_id, "step": name},
            fingerprint={"kind": kind, "code": fingerprint},
        )
        frame = current_frame()
        plan = _Plan(
            name, kind, seq, fingerprint, key, current_node() or self.run_key.node_id,
            time.time(), new_call_id(), frame.call_id if frame is not None else None,
            self.state.next_seq(), consumes, time.perf_counter(),
        )
        if kind == "step":
            # Not fsync'd: it only lets readers see the step in flight. If it
            # is lost, the step has not committed and re-runs anyway.
            self.store.mark_step_started(self._row(plan, "pending"))
        return False, plan

    def forget(self, name: str) -> None:
        """A step that failed may be called again by the same body (retry)."""
        with self.mutex:
            self.seen.discard(name)

    def _row(self, plan: _Plan, status: str, **extra: Any) -> RunStepWrite:
        return RunStepWrite(
            run_id=self.run_id, name=plan.name, seq=plan.seq, kind=plan.kind, status=status,
            fingerprint=plan.fingerprint, node_id=plan.key.node_id, started_at=plan.started_at,
            **extra,
        )

    def _node(self, plan: _Plan, status: str, now: float, **extra: Any) -> NodeWrite:
        key = plan.key
        return NodeWrite(
            node_id=key.node_id, op=key.op, op_name=key.op_name, kind="run_step",
            step_type=StepType.DETERMINISTIC.value, input_hash=key.input_hash, status=status,
            namespace=self.engine.namespace, started_at=plan.started_at, finished_at=now,
            duration_s=now - plan.started_at, label=plan.name, run_id=self.run_id, **extra,
        )

    # -- after a step ----------------------------------------------------------------

    def commit(self, plan: _Plan, value: Any, *, wake_at: float | None = None) -> Any:
        """Checkpoint ``value`` durably; return the decoded copy, so a first
        run and a resumed one hand the body identical values."""
        codec = self.engine.codec
        try:
            encoding, payload = codec.encode(value)
            decoded = codec.decode(encoding, payload)
        except (SerializationError, DecodeError) as err:
            path = getattr(err, "path", "$")
            failure = SerializationError(
                f"step {plan.name!r} of run {self.run_id!r} returned a value that cannot be "
                f"stored: {err} (the value is attached as .value; return plain data, or "
                "register an encoder / allow() its class)",
                path=path, value=value,
            )
            self.fail(plan, failure)
            raise failure from None
        now = time.time()
        artifact_id = artifact_id_for(encoding, payload)
        call = self._call(plan, "done", artifact_id=artifact_id, output=decoded)
        # Anything an adapter buffered inside the step lands before the step.
        try:
            self.engine.flush()
            self.store.checkpoint_step(
                self._row(plan, "done", artifact_id=artifact_id, finished_at=now, wake_at=wake_at),
                self._node(plan, "done", now, artifact_id=artifact_id),
                ArtifactWrite(artifact_id, encoding, payload, plan.key.node_id),
                [EdgeWrite(plan.parent, plan.key.node_id, "contains")]
                + [
                    EdgeWrite(node, plan.key.node_id, "data", art)
                    for _c, art, node in plan.consumes
                    if node is not None
                ],
                calls=[call],
                flows=[FlowWrite(plan.call_id, c, art) for c, art, _n in plan.consumes],
            )
        except BaseException:
            # Not committed (disk full, read-only file...): the step counts as
            # not run, and the body may call it again.
            self.forget(plan.name)
            raise
        self.state.count(call)
        self._hand(decoded, plan.call_id, artifact_id, plan.key.node_id)
        hook = _after_checkpoint
        if hook is not None:
            hook(plan.name)
        return decoded

    def _call(self, plan: _Plan, status: str, **fields: Any) -> CallWrite:
        """The call row of a step that ran (committed with its checkpoint)."""
        return self.state.record(
            plan.call_id, plan.parent_call, _call_kind(plan.kind), plan.name,
            seq=plan.call_seq, node_id=plan.key.node_id, status=status,
            started_at=plan.started_at, duration_s=time.perf_counter() - plan.t0,
            submit=False, count=False, **fields,
        )

    def fail(self, plan: _Plan, exc: BaseException) -> None:
        now = time.time()
        text = f"{type(exc).__name__}: {exc}"[:4000]
        self.forget(plan.name)
        # Recording the failure must not hide the step's own exception.
        with contextlib.suppress(Exception):
            self.store.record_step_failure(
                self._row(plan, "failed", error=text, finished_at=now),
                self._node(plan, "failed", now, error=text),
                [EdgeWrite(plan.parent, plan.key.node_id, "contains")],
                calls=[self._call(plan, "failed", error=text)],
            )

    # -- the run as a whole ------------------------------------------------------------

    def finish(self, status: str, result: Any = None, error: BaseException | None = None) -> None:
        self.closed = True
        now = time.time()
        artifact = None
        if status == "done":
            # The workflow's return value is kept when it can be (for `musubi
            # show`); a value the codec refuses is simply not stored.
            with contextlib.suppress(SerializationError):
                encoding, payload = self.engine.codec.encode(result)
                artifact = ArtifactWrite(artifact_id_for(encoding, payload), encoding, payload,
                                         self.run_key.node_id)
        key = self.run_key
        node = NodeWrite(
            node_id=key.node_id, op=key.op, op_name=key.op_name, kind="run",
            step_type=StepType.DETERMINISTIC.value, input_hash=key.input_hash,
            status="done" if status == "done" else "failed",
            artifact_id=artifact.artifact_id if artifact else None,
            namespace=self.engine.namespace, finished_at=now, label=self.run_id,
            run_id=self.run_id,
            error=None if error is None else f"{type(error).__name__}: {error}"[:4000],
        )
        # The run's totals count every call recorded in it, nested ones included.
        with contextlib.suppress(Exception):
            self.engine.flush()
        self.store.finish_run(self.run_id, status=status, error=node.error, node=node,
                              artifact=artifact, now=now)


@contextlib.contextmanager
def _invocation(
    path: str | os.PathLike[str], workflow: Callable[..., Any], run_id: str | None,
    rerun_from: str | None,
) -> Iterator[_Invocation]:
    db = os.fspath(path)
    rid = validate_run_id(DEFAULT_RUN_ID if run_id is None else run_id)
    if rerun_from is not None:
        validate_name(rerun_from)
    target = resolve_target(db)
    lock: RunLock | PgSessionLock
    engine: Engine | None = None
    if is_postgres_target(target):
        # One writer per run: a session-level advisory lock, freed when its holder's
        # connection ends (a worker killed mid-step included).
        pg = PostgresStore(target)
        lock = pg.session_lock("run", rid, run_id=rid)
        try:
            lock.acquire()
        except BaseException:
            pg.close()
            raise
        engine = Engine(pg)
    else:
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        lock = RunLock(lock_path(os.path.abspath(target), rid), db_path=target, run_id=rid)
        lock.acquire()
    try:
        if engine is None:
            engine = Engine(SQLiteStore(target))
        store: SQLiteStore | PostgresStore = engine.store  # type: ignore[assignment]
        if rerun_from is not None and not store.discard_steps_from(rid, rerun_from):
            known = [s.name for s in store.run_steps(rid)]
            raise ValueError(
                f"rerun_from={rerun_from!r}: run {rid!r} has no step of that name "
                f"(recorded: {', '.join(known[:10]) or 'none'})"
            )
        run_key = engine.key(f"run:{rid}", {"run": rid})
        recorded = store.begin_run(
            rid, name=getattr(workflow, "__qualname__", None), node_id=run_key.node_id,
            parent_node=current_node(), host=_HOST, pid=os.getpid(), now=time.time(),
        )
        yield _Invocation(store.path if is_postgres_target(target) else db, rid, lock, engine,
                          recorded)
    finally:
        try:
            if engine is not None:
                engine.close()
        finally:
            lock.release()


# -- the public API ------------------------------------------------------------------


class Context:
    """What a workflow body receives. Step and sleep names must match
    ``^[A-Za-z0-9][A-Za-z0-9._-]*$`` and be unique within the body (a step
    that raised may be called again with the same name, to retry it).

    >>> import tempfile, os
    >>> def body(ctx):
    ...     pages = [ctx.step(f"page-{i}", lambda i=i: i * 10) for i in range(3)]
    ...     ctx.sleep("rate-limit", 0.01)
    ...     return sum(pages)
    >>> run(os.path.join(tempfile.mkdtemp(), "t.db"), body)
    30
    """

    def __init__(self, invocation: _Invocation) -> None:
        self._inv = invocation

    @property
    def run_id(self) -> str:
        return self._inv.run_id

    @property
    def path(self) -> str:
        return self._inv.path

    def step(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn()`` once for this run and return its (stored) result.

        Raises :class:`StepFailedError` wrapping what ``fn`` raised (the step
        runs again next time), :class:`SerializationError` when the result
        cannot be stored, :class:`DivergenceError` when a committed step's
        kind or code changed.
        """
        replayed, found = self._inv.begin(name, "step", fn)
        if replayed:
            return found  # type: ignore[no-any-return]
        plan: _Plan = found
        with self._executing(plan):
            value = fn()
        return self._inv.commit(plan, value)  # type: ignore[no-any-return]

    async def astep(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Async :meth:`step`: ``fn()`` returns an awaitable (a plain value is
        accepted too)."""
        replayed, found = self._inv.begin(name, "step", fn)
        if replayed:
            return found  # type: ignore[no-any-return]
        plan: _Plan = found
        with self._executing(plan):
            value: Any = fn()
            if inspect.isawaitable(value):
                value = await value
        return self._inv.commit(plan, value)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _executing(self, plan: _Plan) -> Iterator[None]:
        """The step's body runs as its node, inside this run; what it raises
        is recorded (a failure re-runs next time) and wrapped."""
        try:
            with (
                running_run(self._inv.run_id),
                running_node(plan.key.node_id),
                in_call(self._inv.state, plan.call_id),
            ):
                yield
        except Exception as exc:
            self._inv.fail(plan, exc)
            raise StepFailedError(plan.name, exc) from exc
        except BaseException:
            # KeyboardInterrupt, SystemExit: the step stays pending and re-runs.
            self._inv.forget(plan.name)
            raise

    def sleep(self, name: str, duration: Duration) -> None:
        """Sleep durably: the wake-up time is committed first, so a resumed
        run sleeps only the remainder. ``duration`` is ``"500ms"``, ``"5m"``,
        ``"1h30m"``, a number of seconds or a ``timedelta`` (validated on
        every call, also when resuming)."""
        remaining = self._sleep_plan(name, duration)
        if remaining > 0:
            time.sleep(remaining)

    async def asleep(self, name: str, duration: Duration) -> None:
        """Async :meth:`sleep`."""
        remaining = self._sleep_plan(name, duration)
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _sleep_plan(self, name: str, duration: Duration) -> float:
        validate_name(name)
        seconds = to_seconds(duration)
        replayed, found = self._inv.begin(name, "sleep", None)
        if replayed:
            wake_at, seconds = float(found["wake_at"]), float(found["seconds"])
        else:
            wake_at = time.time() + seconds
            self._inv.commit(found, {"wake_at": wake_at, "seconds": seconds}, wake_at=wake_at)
        # Capped by the recorded duration: a wall clock set backwards after
        # the wake time was stored cannot stretch the sleep.
        return min(wake_at - time.time(), seconds)


@contextlib.contextmanager
def _body(inv: _Invocation) -> Iterator[Context]:
    """The workflow body's context (engine, run, run node), and its run marked failed (or
    interrupted) if it raises; shared by :func:`run` and :func:`arun`."""
    with (
        use_engine(inv.engine),
        running_run(inv.run_id),
        running_node(inv.run_key.node_id),
        in_call(inv.state, None),
    ):
        try:
            yield Context(inv)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                inv.finish("failed" if isinstance(exc, Exception) else "interrupted", error=exc)
            raise


def run(
    path: str | os.PathLike[str],
    workflow: Callable[[Context], T],
    *,
    run_id: str | None = None,
    rerun_from: str | None = None,
) -> T:
    """Run (or resume) ``workflow`` against the store at ``path``.

    ``run_id`` picks one of many runs in a shared store (default: the file is
    the task, run id ``"default"``). ``rerun_from`` accepts a change reported
    by :class:`DivergenceError`: that step and every step recorded after it
    are forgotten and run again. Raises :class:`LockedError` at once when
    another process is executing the same run.

    >>> import tempfile, os
    >>> db = os.path.join(tempfile.mkdtemp(), "task.db")
    >>> run(db, lambda ctx: ctx.step("one", lambda: 1) + 1, run_id="job-7")
    2
    """
    with _invocation(path, workflow, run_id, rerun_from) as inv:
        with _body(inv) as ctx:
            result = workflow(ctx)
        inv.finish("done", result)
        return result


async def arun(
    path: str | os.PathLike[str],
    workflow: Callable[[Context], Awaitable[T]],
    *,
    run_id: str | None = None,
    rerun_from: str | None = None,
) -> T:
    """Async :func:`run`: ``workflow`` is a coroutine function and may use
    ``await ctx.astep(...)`` and ``await ctx.asleep(...)``.

    >>> import asyncio, tempfile, os
    >>> async def wf(ctx):
    ...     return await ctx.astep("one", lambda: asyncio.sleep(0, result=1))
    >>> asyncio.run(arun(os.path.join(tempfile.mkdtemp(), "t.db"), wf))
    1
    """
    with _invocation(path, workflow, run_id, rerun_from) as inv:
        with _body(inv) as ctx:
            result = await workflow(ctx)
        inv.finish("done", result)
        return result
