"""Cold hits: what an application's *next run* pays, where no per-process memo holds anything.

Every replay path is measured here as the next process meets it: a second instance (a second
``MusubiCache``, ``Engine`` or musubito engine, each with its own SQLite connection) is opened
on the file *before* the first instance writes the entries, and every entry is then hit exactly
once, so neither a key memo, a hit memo nor a decoded template can serve it. The warm figures
(the same entry hit again and again, in the process that wrote it) stand beside the cold ones
in the same run; the budgets of issue 12 apply to the cold ones.

Anchors: ``InMemoryCache`` (entries written by the same instance: it has no cold state), a bare
``sqlite3`` LangChain cache (a second connection, one primary-key ``SELECT``, fresh
``[ChatGeneration(AIMessage)]``: the floor for any cache on disk), the same ``SELECT`` + build
called directly (the floor of ``lookup``), musubito's replay through a second engine, and a
LlamaIndex query answered by an instant offline model.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from _env import Env, need
from _harness import Comparison, Ratio, Skip, Variant
from bench_langchain import _counting_model


def _entries(env: Env, ops: int, rounds: int) -> int:
    """Entries each variant needs: the harness's warm-up block plus every timed op."""
    return max(1, ops // 10) + ops * rounds + 8


def _question(i: int, tag: str) -> str:
    return f"[{tag}] Question {i}: what is the capital of country number {i}? One word."


class _BareSQLiteCache:
    """A LangChain cache on a bare sqlite3 table: the floor for any cache on disk.

    Keyed by ``(prompt, llm_string)``, storing the first generation's text; a hit builds a
    fresh ``[ChatGeneration(AIMessage)]``. Each instance has its own connection."""

    def __init__(self, path: str) -> None:
        from langchain_core.caches import BaseCache
        from langchain_core.messages import AIMessage
        from langchain_core.outputs import ChatGeneration

        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS lc (prompt TEXT, llm TEXT, text TEXT, "
            "PRIMARY KEY (prompt, llm)) WITHOUT ROWID"
        )
        self.conn = conn

        class Cache(BaseCache):
            def lookup(self, prompt: str, llm_string: str) -> Any:
                row = conn.execute(
                    "SELECT text FROM lc WHERE prompt = ? AND llm = ?", (prompt, llm_string)
                ).fetchone()
                if row is None:
                    return None
                return [ChatGeneration(message=AIMessage(content=row[0]))]

            def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
                conn.execute(
                    "INSERT OR REPLACE INTO lc VALUES (?, ?, ?)",
                    (prompt, llm_string, return_val[0].message.content),
                )

            def clear(self, **kwargs: Any) -> None:
                conn.execute("DELETE FROM lc")

        self.cache = Cache()


def _musubi_pair(env: Env, name: str) -> tuple[Any, Any, list[tuple[str, str]]]:
    """(writer cache, cold reader cache opened before the writes, the (prompt, llm_string)
    pairs the writer stored)."""
    try:
        from musubi_langchain import MusubiCache
    except ImportError as exc:
        raise Skip(f"musubi_langchain not importable ({exc})") from exc
    seen: list[tuple[str, str]] = []

    class Writer(MusubiCache):
        def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
            seen.append((prompt, llm_string))
            super().update(prompt, llm_string, return_val)

    path = str(env.path(f"{name}.db"))
    writer = Writer(path)
    _ = writer.engine  # creates the file (schema) before the reader opens it
    reader = MusubiCache(path)
    assert reader.lookup("never written", "[('_type', 'x')]") is None  # connection open
    return writer, reader, seen


def _cycle_of(items: list[Any]) -> Callable[[], Any]:
    it: Iterator[Any] = iter(items)

    def nxt() -> Any:
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError("a cold case ran out of entries (each is hit once)") from None

    return nxt


def invoke_cold(env: Env) -> Comparison:
    """``invoke`` hits of entries never seen by the reading instance (each hit once)."""
    need("langchain_core", "langchain-core")
    from langchain_core.caches import InMemoryCache

    ops, rounds = env.pick(20, 100), env.pick(3, 15)
    n = _entries(env, ops, rounds)
    variants: list[Variant] = []

    def add(label: str, writer_cache: Any, reader_cache: Any, tag: str) -> None:
        writer = _counting_model(cache=writer_cache)
        reader = _counting_model(cache=reader_cache)
        qs = [_question(i, tag) for i in range(n)]
        for q in qs:
            writer.invoke(q)
        assert writer.calls == n
        nxt = _cycle_of(qs)
        expected = "echo: " + qs[0]
        assert reader.invoke(nxt()).content == expected, f"{label}: wrong cold hit"

        def check(k: int, reader: Any = reader, label: str = label) -> None:
            assert reader.calls == 0, f"{label}: a cold 'hit' reached the model"

        variants.append(Variant(label, lambda: reader.invoke(nxt()), check=check))

    mem = InMemoryCache()
    add("InMemoryCache", mem, mem, "mem")
    bare_path = str(env.path("lc-cold-bare.db"))
    bare_reader = _BareSQLiteCache(bare_path)
    add("bare sqlite3 cache (2nd connection)", _BareSQLiteCache(bare_path).cache,
        bare_reader.cache, "bare")
    writer, reader, _seen = _musubi_pair(env, "lc-cold")
    add("MusubiCache, cold", writer, reader, "musubi")
    # The warm hit beside it (same entry, same instance): its budget is unchanged.
    warm_model = _counting_model(cache=_musubi_pair(env, "lc-warm")[0])
    prompt = "What is the capital of Japan? Answer in one word."
    warm_model.invoke(prompt)
    warm_model.invoke(prompt)

    def check_warm(k: int) -> None:
        assert warm_model.calls == 1, "a warm 'hit' reached the model"

    variants.append(Variant("MusubiCache, warm", lambda: warm_model.invoke(prompt),
                            check=check_warm))
    return Comparison(
        "langchain_invoke_cold",
        "LangChain `invoke` hit by a second cache opened before the writes (each entry once)",
        variants,
        [
            Ratio("cold MusubiCache / bare sqlite3 cache", "MusubiCache, cold",
                  "bare sqlite3 cache (2nd connection)", 1.2),
            Ratio("cold MusubiCache / InMemoryCache", "MusubiCache, cold", "InMemoryCache"),
            Ratio("bare sqlite3 cache / InMemoryCache", "bare sqlite3 cache (2nd connection)",
                  "InMemoryCache"),
            Ratio("warm MusubiCache / InMemoryCache", "MusubiCache, warm", "InMemoryCache",
                  1.15),
        ],
        ops_per_block=ops,
        rounds=rounds,
    )


def lookup_cold(env: Env) -> Comparison:
    """``MusubiCache.lookup`` of entries the reader never saw vs the floor: a second
    connection's primary-key ``SELECT`` and a fresh ``[ChatGeneration(AIMessage)]``."""
    need("langchain_core", "langchain-core")
    ops, rounds = env.pick(50, 300), env.pick(3, 15)
    n = _entries(env, ops, rounds)
    writer, reader, seen = _musubi_pair(env, "lc-lookup-cold")
    model = _counting_model(cache=writer)
    for i in range(n):
        model.invoke(_question(i, "lookup"))
    assert len(seen) == n
    pairs = list(seen)
    nxt = _cycle_of(pairs)
    got = reader.lookup(*nxt())
    assert got is not None and got[0].message.content == "echo: " + _question(0, "lookup")

    bare_path = str(env.path("lc-lookup-floor.db"))
    floor_reader = _BareSQLiteCache(bare_path).cache
    floor_writer = _BareSQLiteCache(bare_path).cache
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration

    for p, llm in pairs:
        floor_writer.update(p, llm, [ChatGeneration(message=AIMessage(content="echo: " + p))])
    fnxt = _cycle_of(pairs)

    def floor() -> Any:
        got = floor_reader.lookup(*fnxt())
        assert got is not None
        return got

    def check(k: int) -> None:
        assert model.calls == n

    return Comparison(
        "langchain_lookup_cold",
        "`MusubiCache.lookup` by a second cache opened before the writes (each entry once)",
        [
            Variant("sqlite3 get + build ChatGeneration (2nd connection)", floor),
            Variant("MusubiCache.lookup, cold", lambda: reader.lookup(*nxt()), check=check),
        ],
        [
            Ratio("cold lookup / floor", "MusubiCache.lookup, cold",
                  "sqlite3 get + build ChatGeneration (2nd connection)", 2.5),
        ],
        ops_per_block=ops,
        rounds=rounds,
    )


def step_cold(env: Env) -> Comparison:
    """``@step`` replays by a second engine opened before the writes, vs musubito's."""
    from musubi_core import Engine, SQLiteStore, step

    ops, rounds = env.pick(50, 300), env.pick(3, 15)
    n = _entries(env, ops, rounds)
    path = env.path("step-cold.db")
    writer_engine = Engine(SQLiteStore(path))
    reader_engine = Engine(SQLiteStore(path))
    calls = {"writer": 0, "reader": 0}

    def make(engine: Engine, who: str) -> Any:
        @step(engine=engine, name="bench.summarise")
        def summarise(doc_id: int, words: int = 40) -> dict[str, Any]:
            calls[who] += 1
            return {"doc": doc_id, "summary": f"document {doc_id} in {words} words"}

        return summarise

    write, read = make(writer_engine, "writer"), make(reader_engine, "reader")
    assert reader_engine.store.get_node("0" * 64) is None  # the reader's connection is open
    for i in range(n):
        write(i)
    writer_engine.flush()
    ids = itertools.count()
    first = read(next(ids))
    assert first.replayed and first.value == {"doc": 0, "summary": "document 0 in 40 words"}

    def check(k: int) -> None:
        assert calls["reader"] == 0, "a cold @step replay ran the function"

    variants = [
        Variant("musubi @step, cold", lambda: read(next(ids)), check=check),
        Variant("musubi @step, warm", lambda: write(3), note="the writer, same entry"),
    ]
    ratios = [Ratio("cold / warm musubi", "musubi @step, cold", "musubi @step, warm")]
    try:
        from musubito import MusubitoEngine, SQLiteStorage, musubito_step, use_musubito_engine
    except ImportError:
        env.missing("musubito")
    else:
        mpath = str(env.path("musubito-cold.db"))
        m_writer = MusubitoEngine(SQLiteStorage(mpath))
        m_reader = MusubitoEngine(SQLiteStorage(mpath))
        mcalls = {"n": 0}

        @musubito_step()
        def msum(doc_id: int, words: int = 40) -> dict[str, Any]:
            mcalls["n"] += 1
            return {"doc": doc_id, "summary": f"document {doc_id} in {words} words"}

        # musubito's miss path scans the operation's history (quadratic to fill), so it
        # gets fewer entries: smaller blocks, the same per-op figure.
        m_block = env.pick(10, 20)
        m_n = _entries(env, m_block, rounds)
        with use_musubito_engine(m_writer):
            for i in range(m_n):
                msum(i)
        assert mcalls["n"] == m_n
        mids = itertools.count()

        def mread() -> Any:
            with use_musubito_engine(m_reader):
                return msum(next(mids))

        assert mread().value == first.value

        def mcheck(k: int) -> None:
            assert mcalls["n"] == m_n, "a musubito replay ran the function"

        variants.append(Variant("musubito, cold", mread, check=mcheck, block=m_block))
        ratios.insert(0, Ratio("cold musubi / cold musubito", "musubi @step, cold",
                               "musubito, cold", 0.5))

    def finish() -> None:
        reader_engine.flush()
        writer_engine.close()
        reader_engine.close()

    return Comparison(
        "step_replay_cold",
        "`@step` replay by a second engine opened before the writes (each entry once)",
        variants,
        ratios,
        ops_per_block=ops,
        rounds=rounds,
        finish=finish,
    )


def llama_index_cold(env: Env) -> Comparison:
    """A LlamaIndex query replayed by a fresh ``instrument()`` (a new engine and connection on
    the file, nothing memoised) vs the same query computed by instant offline models."""
    need("llama_index.core", "llama-index-core")
    try:
        from musubi_llama_index import instrument, uninstrument
    except ImportError as exc:
        raise Skip(f"musubi_llama_index not importable ({exc})") from exc
    from bench_llama_index import DOCS, _models
    from llama_index.core import Document, VectorStoreIndex

    ops, rounds = env.pick(5, 20), env.pick(3, 11)
    n = _entries(env, ops, rounds)
    docs = [Document(text=t) for t in DOCS]
    plain_llm, plain_emb = _models()
    plain_qe = VectorStoreIndex.from_documents(docs, embed_model=plain_emb).as_query_engine(
        llm=plain_llm
    )
    llm, emb = _models()
    path = str(env.path("llama-cold.db"))
    questions = [f"What does musubi mean? (question {i})" for i in range(n)]
    instrument(path, llm=llm, embed_model=emb, lineage=False, use_settings=False)
    try:
        qe = VectorStoreIndex.from_documents(docs, embed_model=emb).as_query_engine(llm=llm)
        answers = [str(qe.query(q)) for q in questions]
    finally:
        uninstrument()
    # The next run: a new engine on the file; every question is asked once.
    inst = instrument(path, llm=llm, embed_model=emb, lineage=False, use_settings=False)
    calls = (llm.calls, emb.calls)
    nxt = _cycle_of(questions)
    try:
        assert str(qe.query(nxt())) == answers[0]
        assert (llm.calls, emb.calls) == calls, "a cold query reached the models"
    except BaseException:
        uninstrument()
        raise
    fresh = itertools.count()

    def check(k: int) -> None:
        assert (llm.calls, emb.calls) == calls, "a cold replayed query reached the models"

    def finish() -> None:
        inst.flush()
        uninstrument()

    return Comparison(
        "llama_index_query_cold",
        "LlamaIndex `query_engine.query` replayed by a new instrument() (each question once)",
        [
            Variant("no musubi (instant offline LLM runs)",
                    lambda: plain_qe.query(f"What does musubi mean? (plain {next(fresh)})")),
            Variant("musubi replay, cold", lambda: qe.query(nxt()), check=check),
        ],
        [
            Ratio("cold replay / no musubi", "musubi replay, cold",
                  "no musubi (instant offline LLM runs)", 1.15),
        ],
        ops_per_block=ops,
        rounds=rounds,
        finish=finish,
    )


CASES = [invoke_cold, lookup_cold, step_cold, llama_index_cold]
