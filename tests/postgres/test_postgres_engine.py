"""The engine and @step on PostgreSQL: replay from another store object (as
another worker would), invalidation, and the schema check."""

from __future__ import annotations

import uuid

import pytest

from musubi_core import Engine, SchemaError, step, use_engine
from musubi_core.store.postgres import PostgresStore


def test_step_replays_across_store_objects_and_invalidates(pg_dsn: str) -> None:
    schema = f"e{uuid.uuid4().hex[:8]}"
    calls: list[str] = []

    @step
    def extract(text: str) -> tuple[str, ...]:
        calls.append("extract")
        return tuple(text.split())

    @step
    def count(words: object) -> int:
        calls.append("count")
        return len(words.value)  # type: ignore[attr-defined]

    with Engine(PostgresStore(pg_dsn, schema=schema)) as worker_a, use_engine(worker_a):
        words = extract("a b c")
        assert count(words).value == 3
    # A second worker (new connection, same schema) replays both steps.
    with Engine(PostgresStore(pg_dsn, schema=schema)) as worker_b, use_engine(worker_b):
        again = extract("a b c")
        total = count(again)
        assert again.replayed and total.replayed and again.value == ("a", "b", "c")
        assert worker_b.invalidate(again.node_id) == 2
        extract("a b c")
        assert count(extract("a b c")).replayed  # early cutoff: same output
        worker_b.flush()
        stats = worker_b.store.stats()
    assert calls == ["extract", "count", "extract"]
    assert stats["replays"] >= 3 and stats["executions"] == 3


def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    schema = f"v{uuid.uuid4().hex[:8]}"
    PostgresStore(pg_dsn, schema=schema).close()
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"UPDATE {schema}.musubi_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match="newer musubi"):
        PostgresStore(pg_dsn, schema=schema)


def test_password_never_appears_in_messages() -> None:
    with pytest.raises(Exception) as err:
        PostgresStore("postgresql://bob:s3cret@127.0.0.1:1/db", timeout=1)
    assert "s3cret" not in str(err.value)


def test_cli_reads_a_postgres_store(pg_dsn: str) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    with Engine(PostgresStore(pg_dsn)) as engine:  # the default schema, "musubi"
        key = engine.key("cli.pg", {"n": 1})
        engine.record(key, "stored")
        before = engine.store.stats()["nodes"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", pg_dsn, "stats", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(root)),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["nodes"] == before >= 1
    show = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", pg_dsn, "show", key.node_id[:10], "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(root)),
        timeout=120,
    )
    assert json.loads(show.stdout)["value"] == "stored"


def test_cli_gc_on_a_postgres_store(pg_dsn: str) -> None:
    """``musubi gc`` works on PostgreSQL (dry run included); ``--max-size`` and ``--vacuum``,
    which measure and compact a SQLite file, are refused with what to use instead."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    with Engine(PostgresStore(pg_dsn)) as engine:
        engine.record(engine.key("cli.pg.gc", {"n": 1}), "stored")
        nodes = engine.store.stats()["nodes"]
    root = Path(__file__).resolve().parents[2]

    def musubi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "musubi_core.cli", "--db", pg_dsn, *args],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)),
            timeout=120,
        )

    dry = musubi("gc", "--older-than", "1s", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True
    with PostgresStore(pg_dsn) as store:
        assert store.stats()["nodes"] == nodes
    for args, says in ((("--max-size", "1MB"), "--older-than"), (("--vacuum",), "VACUUM")):
        refused = musubi("gc", *args)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_musubi_cache_on_a_postgres_store_object(pg_dsn: str) -> None:
    """``MusubiCache(store=PostgresStore(dsn))``: a second worker's cache (its own store
    object) replays what the first stored; the model runs once."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from musubi_langchain import MusubiCache

    schema = f"c{uuid.uuid4().hex[:8]}"
    first = MusubiCache(store=PostgresStore(pg_dsn, schema=schema))
    model = FakeListChatModel(responses=["stored", "paid twice"], cache=first)
    assert model.invoke("q").content == "stored"
    first.engine.flush()
    second = MusubiCache(store=PostgresStore(pg_dsn, schema=schema))
    again = FakeListChatModel(responses=["stored", "paid twice"], cache=second)
    assert again.invoke("q").content == "stored"
    assert again.invoke("q").content == "stored"
    second.engine.flush()
    stats = second.engine.store.stats()
    assert stats["executions"] == 1 and stats["replays"] == 2


def test_a_langchain_hit_is_one_round_trip(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MusubiCache hit on PostgreSQL sends one statement (no BEGIN / ROLLBACK around it:
    reads run on autocommit connections), counted on the real connection of the calling
    thread (the recorder's background commits are not the hit's)."""
    import threading

    import psycopg
    from langchain_core.outputs import Generation

    from musubi_langchain import MusubiCache

    cache = MusubiCache(store=PostgresStore(pg_dsn, schema=f"h{uuid.uuid4().hex[:8]}"))
    cache.update("p", "[('_type', 'x')]", [Generation(text="hi")])
    assert cache.lookup("p", "[('_type', 'x')]") == [Generation(text="hi")]  # pool warmed
    sent: list[str] = []
    me = threading.get_ident()
    original_execute = psycopg.Connection.execute
    original_rollback = psycopg.Connection.rollback

    def execute(self: psycopg.Connection, query: object, *args: object, **kw: object) -> object:
        if threading.get_ident() == me:
            sent.append(str(query))
        return original_execute(self, query, *args, **kw)  # type: ignore[arg-type]

    def rollback(self: psycopg.Connection) -> None:
        if threading.get_ident() == me:
            sent.append("ROLLBACK")
        original_rollback(self)

    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    monkeypatch.setattr(psycopg.Connection, "rollback", rollback)
    for _ in range(3):
        sent.clear()
        assert cache.lookup("p", "[('_type', 'x')]") == [Generation(text="hi")]
        assert len(sent) == 1 and sent[0].lstrip().startswith("SELECT"), sent
    monkeypatch.undo()
    cache.engine.close()
