"""A store written by musubi 0.1.0 (schema 1) opens, migrates and replays all it held."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from musubi_core import Engine, SQLiteStore, run, use_engine
from tests.data.v1_app import v1_count, v1_extract, v1_workflow

V1 = Path(__file__).resolve().parents[1] / "data" / "v1_store.db"


@pytest.fixture()
def v1_copy(tmp_path: Path) -> str:
    target = tmp_path / "v1.db"
    shutil.copy(V1, target)
    return str(target)


def _exec_counts(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT op_name, exec_count FROM musubi_nodes").fetchall())
    finally:
        conn.close()


def test_v1_store_steps_replay(v1_copy: str) -> None:
    before = _exec_counts(v1_copy)
    with Engine(SQLiteStore(v1_copy)) as engine, use_engine(engine):
        facts = v1_extract("One. Two. Three.")
        count = v1_count(facts)
    assert facts.replayed and count.replayed and count.value == 3
    assert _exec_counts(v1_copy) == before


def test_v1_store_langchain_entry_replays(v1_copy: str) -> None:
    from langchain_core.language_models import FakeListChatModel

    from musubi_langchain import MusubiCache

    before = _exec_counts(v1_copy)
    cache = MusubiCache(v1_copy)
    # The same model as in the fixture (its responses are part of its parameters).
    model = FakeListChatModel(responses=["v1 answer"], cache=cache)
    assert model.invoke("v1 question").content == "v1 answer"
    cache.engine.close()
    assert _exec_counts(v1_copy) == before


def test_v1_store_llama_index_entries_replay(v1_copy: str) -> None:
    from llama_index.core.llms import ChatMessage

    from musubi_llama_index import MusubiKVStore, instrument, uninstrument
    from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM

    llm, embed = SlowMockLLM(delay=0.0), SlowMockEmbedding(delay=0.0)
    instrument(v1_copy, llm=llm, embed_model=embed)
    try:
        llm.chat([ChatMessage(role="user", content="v1 llama question")])
        embed.get_text_embedding("v1 text")
    finally:
        uninstrument()
    assert llm.calls == 0 and embed.calls == 0
    assert MusubiKVStore(v1_copy).get("k1", collection="v1") == {"v": 1}


def test_v1_store_durable_run_is_finished(v1_copy: str) -> None:
    before = _exec_counts(v1_copy)
    assert run(v1_copy, v1_workflow, run_id="v1-run") == 3
    after = _exec_counts(v1_copy)
    steps = [op for op in before if op.startswith("run:v1-run:")]
    assert len(steps) == 3 and all(after[op] == before[op] for op in steps)  # no step re-ran


def _runs_table_sql(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'musubi_runs'").fetchone()
        return str(row[0])
    finally:
        conn.close()


def test_runs_append_in_new_files_and_old_files_keep_their_layout(
    v1_copy: str, tmp_path: Path
) -> None:
    """New files keep runs in a rowid table (a run's row appends); a migrated file keeps its
    WITHOUT ROWID table and records runs into it just the same."""
    fresh = str(tmp_path / "fresh.db")
    for path in (fresh, v1_copy):
        with Engine(SQLiteStore(path)) as engine, use_engine(engine):
            first = v1_extract("Four. Five.")
            again = v1_extract("Four. Five.")
        assert again.replayed and again.value == first.value
        with SQLiteStore(path) as store:
            runs = store.list_runs(kind="step", limit=10)
            assert [r.status for r in runs[:2]] == ["done", "done"]
            assert store.get_run(runs[0].run_id) == runs[0]
            assert store.resolve_run(runs[0].run_id[:8]) == runs[0].run_id
    assert "WITHOUT ROWID" not in _runs_table_sql(fresh)
    assert "run_id        TEXT NOT NULL UNIQUE" in _runs_table_sql(fresh)
    assert "WITHOUT ROWID" in _runs_table_sql(v1_copy)
