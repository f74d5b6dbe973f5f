"""A broken store never breaks LangChain: misses plus one warning, and the chain still answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.globals import set_llm_cache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from musubi_langchain import MusubiCache, MusubiLangChainWarning, instrument, uninstrument
from tests.support.openai_server import OpenAIServer
from tests.support.read_only import HOW, read_only_store
from tests.support.storedb import sqlite_only

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _chain(model: ChatOpenAI) -> Any:
    return ChatPromptTemplate.from_template("Tell me about {topic}") | model | StrOutputParser()


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, MusubiLangChainWarning)]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Any]:
    """Makes a file read-only for real: chmod for normal users; root ignores modes, so for
    root the file is made immutable with chattr (skipped where that is not permitted)."""
    made: list[str] = []

    def apply(path: str) -> None:
        if os.geteuid() != 0:
            os.chmod(path, 0o444)
            os.chmod(os.path.dirname(path), 0o555)
            made.append(path)
            return
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        res = subprocess.run(["chattr", "+i", path], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"chattr +i not permitted here: {res.stderr!r}")
        made.append(path)

    yield apply
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", path], capture_output=True)
        else:
            os.chmod(os.path.dirname(path), 0o755)
            os.chmod(path, 0o644)


def test_read_only_store_degrades_to_misses_with_one_warning(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer, read_only: Any
) -> None:
    sqlite_only(db, "a read-only file")
    cache = MusubiCache(db)
    set_llm_cache(cache)
    chain = _chain(chat)
    cold = chain.invoke({"topic": "a"})
    cache.engine.close()
    # Checkpoint the WAL into the main file, so the read-only file holds everything.
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    read_only(db)

    set_llm_cache(MusubiCache(db))
    before = openai_server.chat_count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chain.invoke({"topic": "a"}) == cold  # served: from the store or the provider
        new = chain.invoke({"topic": "b"})
        assert new.startswith("answer-")
        assert chain.invoke({"topic": "b"}) == new  # could not be stored: asked again
    assert len(_ours(caught)) == 1
    assert openai_server.chat_count - before >= 2


def test_store_deleted_mid_run_degrades(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    sqlite_only(db, "a file deleted under the store")
    instrument(db)
    chain = _chain(chat)
    first = chain.invoke({"topic": "a"})
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # batch runs on fresh worker threads, whose connections find the file gone.
        answers = chain.batch([{"topic": "a"}, {"topic": "b"}, {"topic": "c"}])
        assert answers[0] == first
        assert all(a.startswith("answer-") for a in answers)
        assert chain.invoke({"topic": "d"}).startswith("answer-")
        uninstrument()
    # One warning per musubi object at most (cache + handler), never an exception.
    assert 1 <= len(_ours(caught)) <= 2


def test_unopenable_path_still_answers(tmp_path: Path, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    set_llm_cache(MusubiCache(str(blocker / "musubi.db")))  # parent is a file: cannot open
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = _chain(chat).invoke({"topic": "a"})
        b = _chain(chat).invoke({"topic": "a"})
    assert a == b
    assert openai_server.chat_count == 2
    assert len(_ours(caught)) == 1


@pytest.mark.parametrize("how", HOW)
def test_instrument_on_a_read_only_store_degrades_like_the_cache(
    tmp_path: Path, chat: ChatOpenAI, openai_server: OpenAIServer, how: str
) -> None:
    db = tmp_path / "store" / "musubi.db"
    db.parent.mkdir()
    inst = instrument(str(db))
    chain = _chain(chat)
    cold = chain.invoke({"topic": "a"})
    uninstrument()
    assert inst.engine is not None
    inst.engine.close()  # a clean close: the main file holds everything, no -wal is left
    assert sorted(os.listdir(db.parent)) == ["musubi.db"]
    with read_only_store(db, how) as ro, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        instrument(str(ro))  # opens read-only instead of raising
        before = openai_server.chat_count
        assert chain.invoke({"topic": "a"}) == cold
        assert openai_server.chat_count == before  # replayed from the read-only store
        new = chain.invoke({"topic": "b"})
        assert chain.invoke({"topic": "b"}) == new
        assert openai_server.chat_count == before + 2  # could not be stored: asked again
        uninstrument()
    assert len(_ours(caught)) == 1, [str(w.message) for w in caught]
    assert "read-only" in str(_ours(caught)[0].message)


def test_instrument_on_an_unopenable_path_still_answers(
    tmp_path: Path, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inst = instrument(str(blocker / "musubi.db"))  # parent is a file: cannot open
        assert inst.engine is None
        a = _chain(chat).invoke({"topic": "a"})
        b = _chain(chat).invoke({"topic": "a"})
        uninstrument()
    assert a == b
    assert openai_server.chat_count == 2
    assert len(_ours(caught)) == 1, [str(w.message) for w in caught]


def test_a_garbled_cache_entry_is_a_miss_with_one_warning(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    sqlite_only(db, "a column holding a value of another type")
    import sqlite3

    cache = MusubiCache(db)
    set_llm_cache(cache)
    chain = _chain(chat)
    chain.invoke({"topic": "a"})
    cache.engine.flush()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE musubi_nodes SET expires_at = 'garbage' WHERE kind = 'chat_model'")
    conn.close()
    before = openai_server.chat_count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = chain.invoke({"topic": "a"})  # the garbled entry is not served
        assert openai_server.chat_count == before + 1
        assert chain.invoke({"topic": "a"}) == again  # its new record replays
    assert openai_server.chat_count == before + 1
    assert len(_ours(caught)) == 1 and "expires_at" in str(_ours(caught)[0].message)
