"""Issue 14's "done when", end to end: ``examples/tested_app``'s suite recorded against the local
OpenAI-compatible server, then run offline with ``--musubi-mode=replay`` (the server stopped),
a prompt edited (replay fails naming the change; refresh re-records that call only), and the
suite replayed from ``musubi export`` -> ``musubi import`` into an empty store.

Every pytest run is a real subprocess in a copy of the app (its own rootdir and config), with
real ``ChatOpenAI``, LlamaIndex ``OpenAI`` / ``OpenAIEmbedding`` and the OpenAI SDK talking
HTTP to :class:`~tests.support.openai_server.OpenAIServer`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.tested_app import (
    SuiteRun,
    copy_app,
    edit_prompt,
    free_port,
    provider,
    run_suite,
)

APP_TESTS = 8  # the tests of examples/tested_app/tests
KEY = "sk-test-key-for-the-local-server"


@dataclass
class Recorded:
    app: Path
    port: int
    store: Path
    run: SuiteRun
    counts: dict[str, int]
    streams: int
    tool_requests: int


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """The suite recorded once (record mode, server running), then the server stopped."""
    base = tmp_path_factory.mktemp("recorded")
    app = copy_app(base)
    port = free_port()
    store = base / "llm-calls.db"
    server = provider(port).start()
    try:
        run = run_suite(app, port, "--musubi-mode=record", f"--musubi-store={store}",
                        report=base / "record.json")
        counts = server.counts()
        streams = sum(1 for r in server.requests if r.stream)
        tools = sum(1 for r in server.requests if isinstance(r.body, dict) and r.body.get("tools"))
    finally:
        server.stop()
    assert run.passed, run.output
    return Recorded(app, port, store, run, counts, streams, tools)


def _copy(recorded: Recorded, dest: Path) -> tuple[Path, Path]:
    """A copy of the recorded app and store (a test that edits a prompt works on its own)."""
    app = dest / "tested_app"
    shutil.copytree(recorded.app, app)
    store = dest / "llm-calls.db"
    shutil.copyfile(recorded.store, store)
    return app, store


def _replayed_kinds(report: dict[str, Any]) -> set[str]:
    return {kind for kind, n in report["by_kind"].items() if n["replayed"]}


def test_recording_sends_every_kind_of_call(recorded: Recorded) -> None:
    report = recorded.run.report
    assert report is not None and report["mode"] == "record"
    assert f"{APP_TESTS} passed" in recorded.run.output
    # Chat completions (two of them streamed, one with tools), embeddings and the SDK calls of
    # the @step pipeline all reached the provider, and were recorded.
    assert recorded.counts == {"chat": 7, "embeddings": 3}
    assert recorded.streams == 2 and recorded.tool_requests == 1
    assert report["executed"] >= recorded.counts["chat"]
    assert {"chat_model", "embedding", "llm", "step"} <= set(report["by_kind"])


def test_replay_passes_offline_with_no_request_and_no_execution(
    recorded: Recorded, tmp_path: Path
) -> None:
    app, store = _copy(recorded, tmp_path)
    assert _refused(recorded.port)  # the provider is gone
    run = run_suite(app, recorded.port, "--musubi-mode=replay", f"--musubi-store={store}",
                    key=None, report=tmp_path / "replay.json")
    assert run.passed, run.output
    assert f"{APP_TESTS} passed" in run.output
    report = run.report
    assert report is not None
    # Nothing executed: no model call, no embedding, no step body; no call went past musubi.
    assert report["executed"] == 0 and report["unrecorded"] == 0, report
    assert report["failed"] == 0 and report["misses"] == 0
    assert _replayed_kinds(report) == {"chat_model", "embedding", "llm", "step"}
    assert report["replayed"] >= recorded.run.report["executed"]  # type: ignore[index]
    assert report["tokens_saved"] > 0
    assert "replay mode" in run.output and "0 executed" in run.output
    _assert_stream_and_tool_calls_replayed(store)


def _assert_stream_and_tool_calls_replayed(store: Path) -> None:
    """The agent's streamed planning turn (tool calls in chunks) was served from the store."""
    from musubi_core import Engine, SQLiteStore

    with Engine(SQLiteStore(str(store))) as engine:
        runs = [r for r in engine.store.list_runs(kind="test", limit=100)
                if r.name == "tests/test_agent.py::test_the_agent_looks_up_the_weather"]
        latest = max(runs, key=lambda r: r.started_at or 0)
        calls = engine.store.run_calls(latest.run_id)
        models = [c for c in calls if c.kind == "chat_model"]
        assert len(models) == 2 and all(c.replayed for c in models), models
        served = [engine.store.get_node_and_artifact(c.node_id) for c in models if c.node_id]
    # The planning turn's stored answer is the tool call the agent then ran.
    assert any(f is not None and b"get_weather" in bytes(f[2] or b"") for f in served)
    tools = [c for c in calls if c.kind == "tool"]
    assert [t.op_name for t in tools] == ["get_weather"]


def test_an_edited_prompt_fails_replay_naming_the_change_and_refresh_records_only_it(
    recorded: Recorded, tmp_path: Path
) -> None:
    app, store = _copy(recorded, tmp_path)
    edit_prompt(app, "Use only the context below", "Use only the facts below")

    run = run_suite(app, recorded.port, "--musubi-mode=replay", f"--musubi-store={store}",
                    key=None)
    assert not run.passed
    assert "ReplayMissError" in run.output
    # The message shows the changed text, old -> new, at its place in the request.
    assert "messages[0].content:" in run.output
    assert '"...questions about musubi. Use only the context below and answer' in run.output
    assert '-> "...questions about musubi. Use only the facts below and answer' in run.output
    assert "nothing was sent to the provider" in run.output
    # Only the tests that use the edited prompt fail.
    assert "3 failed, 5 passed" in run.output
    assert "FAILED tests/test_rag.py::test_answer" in run.output

    server = provider(recorded.port).start()
    try:
        refreshed = run_suite(app, recorded.port, "--musubi-mode=refresh",
                              f"--musubi-store={store}", report=tmp_path / "refresh.json")
        sent = [r.body for r in server.requests]
    finally:
        server.stop()
    assert refreshed.passed, refreshed.output
    # One request: the chat call whose prompt changed. Everything else replayed.
    assert len(sent) == 1, sent
    assert "Use only the facts below" in sent[0]["messages"][0]["content"]
    assert refreshed.report is not None and refreshed.report["executed"] == 1

    again = run_suite(app, recorded.port, "--musubi-mode=replay", f"--musubi-store={store}",
                      key=None, report=tmp_path / "again.json")
    assert again.passed, again.output
    assert again.report is not None and again.report["executed"] == 0


def _musubi(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "musubi_core.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_suite_replays_from_an_export_imported_into_an_empty_store(
    recorded: Recorded, tmp_path: Path
) -> None:
    app, store = _copy(recorded, tmp_path)
    exported = _musubi("--db", str(store), "export")
    assert exported.returncode == 0, exported.stderr
    assert _musubi("--db", str(store), "export").stdout == exported.stdout  # stable
    assert KEY not in exported.stdout and "sk-" not in exported.stdout  # no secrets
    calls = tmp_path / "calls.jsonl"
    calls.write_text(exported.stdout, encoding="utf-8")

    fresh = tmp_path / "fresh" / "imported.db"
    assert not fresh.exists()
    loaded = _musubi("--db", str(fresh), "import", str(calls))
    assert loaded.returncode == 0, loaded.stderr
    assert f"imported {len(exported.stdout.splitlines())} new recording(s)" in loaded.stdout

    # A provider is listening this time, and counts: the replay must not ask it anything.
    tripwire = provider(recorded.port).start()
    try:
        run = run_suite(app, recorded.port, "--musubi-mode=replay", f"--musubi-store={fresh}",
                        key=None, report=tmp_path / "imported.json")
        from_jsonl = run_suite(app, recorded.port, "--musubi-mode=replay",
                               f"--musubi-store={calls}", key=None,
                               report=tmp_path / "jsonl.json")
        assert tripwire.count() == 0, tripwire.counts()
    finally:
        tripwire.stop()
    for result in (run, from_jsonl):
        assert result.passed, result.output
        assert result.report is not None and result.report["executed"] == 0
        assert _replayed_kinds(result.report) == {"chat_model", "embedding", "llm", "step"}
    # Replay mode does not write a .jsonl store back.
    assert calls.read_text(encoding="utf-8") == exported.stdout
