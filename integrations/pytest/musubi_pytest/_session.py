"""What the pytest plugin installs for a session, and what it counts.

A :class:`Session` owns the engine(s) of a test session: it opens the store (a SQLite file, a
``.jsonl`` export loaded into a temporary one, or one file per test), makes it the process
default (so ``@step`` uses it), installs the LangChain cache and handler and the LlamaIndex
instrumentation (with its ``Settings`` models) when those frameworks are installed, and puts
everything back at the end. The app under test contains no musubi code.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from musubi_core.cassette import export_lines, import_lines
from musubi_core.engine import Engine, swap_default_engine
from musubi_core.modes import MODE_ENV, Mode
from musubi_core.policy import is_replayable_kind
from musubi_core.replay_miss import clear_misses, recent_misses
from musubi_core.store import CallRecord, SQLiteStore

__all__ = ["Counts", "Session"]

# Placeholders for provider keys in replay mode: clients that refuse to start without a key
# start, and nothing they send could reach a provider anyway (musubi answers or raises).
_PLACEHOLDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
_PLACEHOLDER = "musubi-replay-no-key"
_ALL = 2**62


@dataclasses.dataclass
class Counts:
    """What a session did with the calls that can replay: ``replayed`` (served from the
    store), ``executed`` (run and recorded), ``failed`` (raised, a replay miss included),
    ``unrecorded`` (a model call musubi did not see: a LangChain model with ``cache=False``,
    a LlamaIndex model given straight to a component), ``misses`` (ReplayMissErrors)."""

    replayed: int = 0
    executed: int = 0
    failed: int = 0
    unrecorded: int = 0
    misses: int = 0
    tokens_saved: int = 0
    seconds_saved: float = 0.0
    by_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def add_run(self, calls: list[CallRecord]) -> None:
        """Count the calls of one run (a span that only wraps a model call is not one)."""
        with_node: set[str] = set()
        parents = {c.call_id: c.parent_call_id for c in calls}
        for call in calls:
            if call.node_id is not None:
                parent = call.parent_call_id
                while parent is not None and parent not in with_node:
                    with_node.add(parent)
                    parent = parents.get(parent)
        for call in calls:
            if is_replayable_kind(call.kind) and (
                call.node_id is not None or call.call_id not in with_node
            ):
                self._add(call)

    def _add(self, call: CallRecord) -> None:
        kind = self.by_kind.setdefault(
            call.kind, {"replayed": 0, "executed": 0, "failed": 0, "unrecorded": 0}
        )
        if call.status != "done":
            name = "failed"
        elif call.node_id is None:
            name = "unrecorded"
        elif call.replayed:
            name = "replayed"
            self.tokens_saved += (call.tokens_in or 0) + (call.tokens_out or 0)
            self.seconds_saved += call.saved_s or 0.0
        else:
            name = "executed"
        setattr(self, name, getattr(self, name) + 1)
        kind[name] += 1


def _adapter(framework: str, module: str) -> ModuleType | None:
    """The musubi adapter ``module`` when ``framework`` is installed (imported on demand: a
    session that uses neither framework never imports one)."""
    if importlib.util.find_spec(framework) is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:  # the framework is there, but not what the adapter needs
        return None


def _adapters() -> tuple[ModuleType | None, ModuleType | None]:
    return (
        _adapter("langchain_core", "musubi_langchain"),
        _adapter("llama_index", "musubi_llama_index"),
    )


def _slug(nodeid: str) -> str:
    """A file name for a test id (``tests/test_x.py::test_y[1]`` -> ``tests_test_x.py__test_y_1_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:180] or "test"


class Session:
    """The musubi side of one pytest session (see the module docstring)."""

    def __init__(self, mode: Mode, store: str, *, per_test: bool, prune: bool) -> None:
        self.mode = mode
        self.store = store
        self.per_test = per_test
        self.prune = prune
        self.started = time.time()
        self.engine: Engine | None = None
        self.engines: list[Engine] = []  # every engine the session used (per test: many)
        self._tmp: str | None = None
        self._previous_default: Engine | None = None
        self._env: dict[str, str | None] = {}
        self._reached: set[str] = set()
        self.counts: Counts | None = None
        self.cassette = store.endswith(".jsonl")
        if self.cassette and per_test:
            raise ValueError("--musubi-per-test keeps one SQLite file per test in a folder; "
                             "give it a folder, not a .jsonl file")

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        clear_misses()
        self._setenv(MODE_ENV, self.mode.value)
        if self.mode is Mode.REPLAY:
            for name in _PLACEHOLDER_KEYS:
                if not os.environ.get(name):
                    self._setenv(name, _PLACEHOLDER)
        if self.mode is Mode.OFF:
            return
        if not self.per_test:
            self.use(self._session_path())

    def _session_path(self) -> str:
        if not self.cassette:
            Path(self.store).parent.mkdir(parents=True, exist_ok=True)
            return self.store
        self._tmp = tempfile.mkdtemp(prefix="musubi-pytest-")
        path = os.path.join(self._tmp, "session.db")
        if os.path.exists(self.store):
            with SQLiteStore(path) as store, open(self.store, encoding="utf-8") as handle:
                import_lines(store, handle.read().splitlines())
        return path

    def test_path(self, nodeid: str) -> str:
        folder = Path(self.store)
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder / f"{_slug(nodeid)}.db")

    def use(self, path: str) -> Engine:
        """Make the store at ``path`` the one every framework records into and replays from."""
        if self.engine is not None and os.path.abspath(self.engine.store.path) == os.path.abspath(
            path
        ):
            return self.engine
        self._uninstall()
        engine = Engine(SQLiteStore(path), mode=self.mode)
        self.engine = engine
        self.engines.append(engine)
        previous = swap_default_engine(engine)
        if len(self.engines) == 1:
            self._previous_default = previous
        self._setenv("MUSUBI_DB", path)
        langchain, llama_index = _adapters()
        if langchain is not None:
            langchain.instrument(engine=engine, mode=self.mode, replay_streams=True)
        if llama_index is not None:
            llama_index.instrument(engine=engine, mode=self.mode)
        return engine

    def _uninstall(self) -> None:
        if self.engine is None:
            return
        for adapter in _adapters():
            if adapter is not None:
                adapter.uninstrument()
        self.engine.flush()

    def finish(self) -> Counts:
        """Uninstall, count, write a ``.jsonl`` store back (record and refresh), close."""
        if self.counts is not None:
            return self.counts
        self._uninstall()
        counts = Counts(misses=len(recent_misses()))
        for engine in self.engines:
            for calls in self._session_runs(engine):
                counts.add_run(calls)
                self._reached.update(c.node_id for c in calls if c.node_id is not None)
        self.counts = counts
        if self.cassette and self.engine is not None and self.mode in (Mode.RECORD, Mode.REFRESH):
            self._write_cassette(self.engine)
        swap_default_engine(self._previous_default)
        for engine in self.engines:
            engine.close()
        self.engine = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return counts

    def _write_cassette(self, engine: Engine) -> None:
        lines: Iterator[str] = export_lines(engine.store)
        if self.prune:
            reached = self._reached
            lines = (line for line in lines if _node_of(line) in reached)
        partial = f"{self.store}.partial"
        Path(self.store).parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", encoding="utf-8", newline="\n") as out:
            for line in lines:
                out.write(line + "\n")
        os.replace(partial, self.store)

    def _session_runs(self, engine: Engine) -> Iterator[list[CallRecord]]:
        engine.flush()
        for run in engine.store.list_runs(limit=_ALL, since=self.started):
            yield engine.store.run_calls(run.run_id)

    def _setenv(self, name: str, value: str) -> None:
        if name not in self._env:
            self._env[name] = os.environ.get(name)
        os.environ[name] = value

    def report(self) -> dict[str, Any]:
        counts = self.finish()
        return {
            "mode": self.mode.value,
            "store": self.store,
            "per_test": self.per_test,
            **dataclasses.asdict(counts),
        }


def _node_of(line: str) -> str | None:
    import json

    try:
        node = json.loads(line).get("node")
    except ValueError:
        return None
    return node if isinstance(node, str) else None
