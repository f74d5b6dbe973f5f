"""The musubi pytest plugin: record a suite's LLM calls once, replay them offline forever.

Installed with musubi (a ``pytest11`` entry point); inert unless a mode is given::

    pytest --musubi-mode=record  --musubi-store tests/llm-calls.db     # provider reachable
    pytest --musubi-mode=replay  --musubi-store tests/llm-calls.db     # offline, no API key
    pytest --musubi-mode=refresh --musubi-store tests/llm-calls.db     # after a change

With a mode, the plugin installs musubi for the whole session: the LangChain cache and
callback handler (streams included), the LlamaIndex instrumentation (with the models on
``Settings``) and the default engine ``@step`` uses, all on one store. The app under test
contains no musubi code. Each test's calls are one run, named after the test
(``musubi runs --kind test``). In replay mode a call with no recording fails its test with a
:class:`~musubi_core.errors.ReplayMissError` that names the nearest recording and what changed;
nothing reaches the provider (placeholder API keys are set when none is, so clients start).

Options (or ini keys ``musubi_mode``, ``musubi_store``):

* ``--musubi-store PATH``: a SQLite file (default ``.musubi/pytest.db`` under the rootdir), or
  a ``.jsonl`` export (``musubi export``), loaded at the start and, in record and refresh
  mode, written back at the end (one node per line, stable order: it diffs well);
* ``--musubi-per-test``: one store per test, ``PATH`` being a folder of SQLite files;
* ``--musubi-prune``: with a ``.jsonl`` store, write back only what this session reached (run
  it on the whole suite: the file then holds exactly what the suite uses);
* ``--musubi-report FILE``: the session's counts as JSON.

The ``musubi`` fixture gives a test its mode, engine and store, and the calls it made so far
(``musubi.calls()``, ``musubi.counts()``); without a mode, a test that asks for it is skipped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from musubi_core.engine import Engine
from musubi_core.errors import ReplayMissError
from musubi_core.modes import Mode
from musubi_core.record import trace
from musubi_core.replay_miss import prefer_nodes
from musubi_core.store import CallRecord

from ._session import Counts, Session

__all__ = ["MusubiTest"]

_DEFAULT_STORE = ".musubi/pytest.db"
_KEY = pytest.StashKey["MusubiPlugin"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("musubi", "musubi: record LLM calls once, replay them in tests")
    group.addoption(
        "--musubi-mode",
        choices=[m.value for m in Mode],
        default=None,
        help="install musubi for the session: record (replay what is recorded, record the "
        "rest), replay (recordings only: a miss fails the test, nothing reaches the provider), "
        "refresh (re-record what changed) or off",
    )
    group.addoption(
        "--musubi-store",
        metavar="PATH",
        default=None,
        help=f"the recordings: a SQLite file or a .jsonl export (default {_DEFAULT_STORE})",
    )
    group.addoption(
        "--musubi-per-test",
        action="store_true",
        default=False,
        help="one store per test (PATH is then a folder)",
    )
    group.addoption(
        "--musubi-prune",
        action="store_true",
        default=False,
        help="with a .jsonl store: write back only the recordings this session reached",
    )
    group.addoption(
        "--musubi-report", metavar="FILE", default=None, help="write the session's counts as JSON"
    )
    parser.addini("musubi_mode", "musubi mode when --musubi-mode is not given", default="")
    parser.addini("musubi_store", "musubi store when --musubi-store is not given", default="")


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("musubi_mode") or str(config.getini("musubi_mode") or "")
    if not mode:
        return
    store = config.getoption("musubi_store") or str(config.getini("musubi_store") or "")
    if not store:
        store = str(Path(str(config.rootpath)) / _DEFAULT_STORE)
    try:
        session = Session(
            Mode(mode),
            str(Path(store).absolute()),
            per_test=bool(config.getoption("musubi_per_test")),
            prune=bool(config.getoption("musubi_prune")),
        )
    except ValueError as exc:
        raise pytest.UsageError(f"musubi: {exc}") from None
    plugin = MusubiPlugin(session, config.getoption("musubi_report"))
    config.stash[_KEY] = plugin
    config.pluginmanager.register(plugin, "musubi-session")
    session.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(_KEY, None)
    if plugin is not None:
        plugin.session.finish()


@dataclass
class MusubiTest:
    """The ``musubi`` fixture: this test's mode, engine and store, and its calls so far."""

    mode: Mode
    plugin: MusubiPlugin

    @property
    def engine(self) -> Any:
        return self.plugin.session.engine

    @property
    def store(self) -> str:
        engine = self.plugin.session.engine
        return str(engine.store.path) if engine is not None else self.plugin.session.store

    def calls(self) -> list[CallRecord]:
        """The calls this test has made so far (each executed or replayed), in order."""
        engine, run_id = self.plugin.session.engine, self.plugin.run_id
        if engine is None or run_id is None:
            return []
        engine.flush()
        return engine.store.run_calls(run_id)

    def counts(self) -> Counts:
        """What this test's replayable calls did so far (replayed, executed, failed)."""
        counts = Counts()
        counts.add_run(self.calls())
        return counts


@pytest.fixture
def musubi(request: pytest.FixtureRequest) -> MusubiTest:
    """This test's musubi session (skipped when pytest runs without ``--musubi-mode``)."""
    plugin = request.config.stash.get(_KEY, None)
    if plugin is None:
        pytest.skip("musubi is not installed for this session: run pytest with --musubi-mode")
    return MusubiTest(plugin.session.mode, plugin)


class MusubiPlugin:
    """The hooks of an active session (registered by :func:`pytest_configure`)."""

    def __init__(self, session: Session, report: str | None) -> None:
        self.session = session
        self.report_path = report
        self.run_id: str | None = None
        self.missed: list[tuple[str, str]] = []  # (test id, the error's first line)

    def pytest_report_header(self, config: pytest.Config) -> str:
        where = f"per-test stores in {self.session.store}" if self.session.per_test else (
            f"store {self.session.store}"
        )
        return f"musubi: {self.session.mode.value} mode, {where}"

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.session.per_test and self.session.mode is not Mode.OFF:
            self.session.use(self.session.test_path(item.nodeid))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, Any]:
        engine = self.session.engine
        if engine is None:
            return (yield)
        with trace(item.nodeid, kind="test", engine=engine) as run:
            self.run_id = run.run_id
            earlier = functools.partial(_reached_before, engine, item.nodeid, run.run_id)
            try:
                with prefer_nodes(earlier):
                    return (yield)
            finally:
                self.run_id = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[Any]
    ) -> Generator[None, Any, Any]:
        report = yield
        if call.excinfo is not None:
            miss = _replay_miss(call.excinfo.value)
            if miss is not None:
                what = miss.differences[0] if miss.differences else f"{miss.reason}"
                self.missed.append((item.nodeid, f"{miss.kind} {miss.op_name}: {what}"))
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        data = self.session.report()
        if self.report_path:
            Path(self.report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.report_path).write_text(json.dumps(data, indent=2), encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        counts = self.session.finish()
        mode = self.session.mode.value
        terminalreporter.section("musubi")
        terminalreporter.write_line(
            f"{mode} mode, {self.session.store}: {counts.replayed} call(s) replayed, "
            f"{counts.executed} executed, {counts.misses} replay miss(es); replay saved "
            f"{counts.tokens_saved} tokens and {counts.seconds_saved:.2f} s"
        )
        if counts.unrecorded:
            kinds = ", ".join(
                f"{k} {v['unrecorded']}" for k, v in counts.by_kind.items() if v["unrecorded"]
            )
            terminalreporter.write_line(
                f"warning: {counts.unrecorded} model call(s) went past musubi ({kinds}): they "
                "are neither recorded nor replayed (a LangChain model with cache=False, a "
                "LlamaIndex model given straight to a component instead of Settings)",
                yellow=True,
            )
        for nodeid, first in self.missed[:10]:
            terminalreporter.write_line(f"miss in {nodeid}: {first}", red=True)
        if counts.misses:
            terminalreporter.write_line(
                "record what changed with --musubi-mode=refresh (the provider reachable)"
            )


def _reached_before(engine: Engine, test: str, current: str) -> set[str]:
    """The nodes this test's calls reached the last time it ran (a miss compares the call with
    them first: the same call, before the change)."""
    engine.flush()
    runs = [
        r for r in engine.store.list_runs(kind="test", limit=10_000)
        if r.name == test and r.run_id != current
    ]
    if not runs:
        return set()
    latest = max(runs, key=lambda r: r.started_at or r.created_at)
    return {c.node_id for c in engine.store.run_calls(latest.run_id) if c.node_id}


def _replay_miss(error: BaseException | None) -> ReplayMissError | None:
    """The ReplayMissError behind ``error`` (frameworks may wrap it), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ReplayMissError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
