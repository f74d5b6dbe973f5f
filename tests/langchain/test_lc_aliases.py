"""Aliases: the next run finds a stored answer by a digest of LangChain's two strings.

A cache entry is written with an alias (a digest of the prompt and llm_string strings, the
namespace and the key scheme) beside its node. A cache that never saw the request (the next
run of an application) probes the alias and serves the node without parsing the prompt or
hashing it canonically; anything but a plain hit (a stale node, a missing alias, damaged
bytes) takes the full lookup, exactly as before."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path
from typing import Any

from langchain_core.globals import set_llm_cache
from langchain_openai import ChatOpenAI

from musubi_core import SQLiteStore
from musubi_core.identity import alias_of
from musubi_core.store import open_store
from musubi_langchain import MusubiCache
from musubi_langchain.cache import _ALIAS_SCHEME
from tests.support.openai_server import OpenAIServer
from tests.support.read_only import read_only_store
from tests.support.storedb import REPLAYS, execute, rows, sqlite_only

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


class KeyCountingCache(MusubiCache):
    """A MusubiCache that counts how often it computes a node key (the work an alias saves)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys_computed = 0

    def node_key(self, prompt: str, llm_string: str) -> Any:
        self.keys_computed += 1
        return super().node_key(prompt, llm_string)


def _chat_node(db: str) -> str:
    (node,) = rows(db, "SELECT node_id FROM musubi_nodes WHERE kind = 'chat_model'")
    return str(node[0])


def _close(cache: MusubiCache) -> None:
    cache.engine.flush()
    cache.engine.close()


def _recorded(db: str, chat: ChatOpenAI, question: str) -> str:
    """Ask ``question`` through a cache of its own (the first run), closed after; the answer."""
    cache = MusubiCache(db)
    set_llm_cache(cache)
    answer = str(chat.invoke(question).content)
    _close(cache)
    return answer


def test_a_new_cache_serves_a_stored_answer_through_its_alias(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    first = _recorded(db, chat, "What is the capital of Japan?")
    assert openai_server.chat_count == 1
    node = _chat_node(db)
    # Written with the node, in the same transaction: one alias, leading to it.
    assert [r[0] for r in rows(db, "SELECT node_id FROM musubi_aliases")] == [node]

    reader = KeyCountingCache(db)  # the next run: nothing memoised
    set_llm_cache(reader)
    assert chat.invoke("What is the capital of Japan?").content == first
    assert openai_server.chat_count == 1
    assert reader.keys_computed == 0  # found by the alias, no key computed
    reader.engine.flush()
    # The replay is counted and recorded as a call, as any hit is.
    assert rows(db, f"SELECT {REPLAYS} FROM musubi_nodes WHERE node_id = ?", (node,)) == [(1,)]
    replayed = rows(
        db, "SELECT COUNT(*) FROM musubi_calls WHERE node_id = ? AND replayed = 1", (node,)
    )
    assert replayed == [(1,)]
    # Another question is a miss, then stored with its own alias.
    chat.invoke("What is the capital of France?")
    assert openai_server.chat_count == 2
    assert rows(db, "SELECT COUNT(*) FROM musubi_aliases") == [(2,)]
    _close(reader)


def test_an_alias_of_an_invalidated_node_is_not_served(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    writer = MusubiCache(db)
    set_llm_cache(writer)
    chat.invoke("Name a colour.")
    node = _chat_node(db)
    writer.engine.invalidate(node)
    _close(writer)

    reader = KeyCountingCache(db)
    set_llm_cache(reader)
    chat.invoke("Name a colour.")
    # The alias leads to a stale node: the full lookup decides (a miss), and the call runs.
    assert openai_server.chat_count == 2
    assert reader.keys_computed >= 1
    _close(reader)
    assert rows(db, "SELECT status FROM musubi_nodes WHERE node_id = ?", (node,)) == [("done",)]


def test_an_entry_without_an_alias_gets_one_on_its_first_hit(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    answer = _recorded(db, chat, "Two plus two?")
    # As an entry written before aliases existed.
    assert execute(db, "DELETE FROM musubi_aliases") == 1

    second = KeyCountingCache(db)
    set_llm_cache(second)
    assert chat.invoke("Two plus two?").content == answer
    assert second.keys_computed == 1  # no alias: the key is computed
    _close(second)
    assert [r[0] for r in rows(db, "SELECT node_id FROM musubi_aliases")] == [_chat_node(db)]

    third = KeyCountingCache(db)
    set_llm_cache(third)
    assert chat.invoke("Two plus two?").content == answer
    assert third.keys_computed == 0
    assert openai_server.chat_count == 1
    _close(third)


def test_aliases_are_per_namespace(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    set_llm_cache(first := MusubiCache(db, namespace="team-a"))
    chat.invoke("Hello?")
    _close(first)
    set_llm_cache(other := KeyCountingCache(db, namespace="team-b"))
    chat.invoke("Hello?")
    assert openai_server.chat_count == 2  # another namespace never sees team-a's answer
    _close(other)
    assert rows(db, "SELECT COUNT(*) FROM musubi_aliases") == [(2,)]


def test_gc_removes_the_aliases_of_the_nodes_it_removes(db: str, chat: ChatOpenAI) -> None:
    cache = MusubiCache(db)
    set_llm_cache(cache)
    chat.invoke("Spell 'cat'.")
    _close(cache)
    with open_store(db) as store:
        report = store.gc(older_than=0.0)
    assert report["nodes"] == 1
    assert rows(db, "SELECT COUNT(*) FROM musubi_aliases") == [(0,)]


def test_alias_digests_separate_their_parts() -> None:
    a = alias_of(_ALIAS_SCHEME, "default", "llm", "prompt")
    assert alias_of(_ALIAS_SCHEME, "default", "llmp", "rompt") != a
    assert alias_of(_ALIAS_SCHEME, "other", "llm", "prompt") != a
    assert alias_of("musubi_langchain/2", "default", "llm", "prompt") != a
    assert alias_of(_ALIAS_SCHEME, "default", "llm", "prompt") == a


def test_a_read_only_file_made_before_aliases_and_counters_still_replays(
    db: str, tmp_path: Path, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    sqlite_only(db, "a read-only file")
    answer = _recorded(db, chat, "Is the sky blue?")
    node_id = _chat_node(db)
    with sqlite3.connect(db) as con:  # a file of the same schema version, made before aliases
        con.execute("DROP TABLE musubi_aliases")
        con.execute("DROP TABLE musubi_replays")
    con.close()
    with read_only_store(Path(db), "permissions") as ro:
        store = SQLiteStore(ro)
        assert store.has_aliases is False
        reader = MusubiCache(store=store)
        set_llm_cache(reader)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one "read-only: nothing recorded" warning
            assert chat.invoke("Is the sky blue?").content == answer
        assert openai_server.chat_count == 1
        # Every read works on such a file (each connection sees the missing tables empty).
        node = store.get_node(node_id)
        assert node is not None and node.replay_count == 0
        assert store.stats()["nodes"] == 1
        store.close()
    # Opened for writing, the file gains the tables.
    writable = SQLiteStore(db)
    assert writable.has_aliases is True
    writable.close()
    assert rows(db, "SELECT COUNT(*) FROM musubi_aliases") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM musubi_replays") == [(0,)]
