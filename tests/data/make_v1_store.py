"""Makes ``v1_store.db``: a store written by musubi 0.1.0 (schema version 1).

It was run once, with the code of commit 4f0368c (the last with schema 1), and its output is
committed: tests/core/test_migration.py opens a copy, migrates it and checks that everything it
held replays. It does not run against later versions (they write schema 2).

    python -m tests.data.make_v1_store tests/data/v1_store.db

The steps live in ``tests/data/v1_app.py`` so that the test reaches the same operations.
"""

from __future__ import annotations

import os
import sqlite3
import sys

from langchain_core.language_models import FakeListChatModel
from llama_index.core.llms import ChatMessage

from musubi_core import Engine, SQLiteStore, run, use_engine
from musubi_langchain import MusubiCache
from musubi_llama_index import MusubiKVStore, instrument, uninstrument
from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM
from tests.data.v1_app import v1_count, v1_extract, v1_workflow


def main(target: str) -> None:
    path = target + ".work"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    with Engine(SQLiteStore(path)) as engine, use_engine(engine):
        facts = v1_extract("One. Two. Three.")
        assert v1_count(facts).value == 3
    cache = MusubiCache(path)
    model = FakeListChatModel(responses=["v1 answer"], cache=cache)
    assert model.invoke("v1 question").content == "v1 answer"
    cache.engine.close()
    llm, embed = SlowMockLLM(delay=0.0), SlowMockEmbedding(delay=0.0)
    instrument(path, llm=llm, embed_model=embed)
    llm.chat([ChatMessage(role="user", content="v1 llama question")])
    embed.get_text_embedding("v1 text")
    uninstrument()
    kv = MusubiKVStore(path)
    kv.put("k1", {"v": 1}, collection="v1")
    assert run(path, v1_workflow, run_id="v1-run") == 3
    # One self-contained file (no -wal): SQLite's online backup of the working store.
    if os.path.exists(target):
        os.remove(target)
    src, dst = sqlite3.connect(path), sqlite3.connect(target)
    src.backup(dst)
    dst.execute("PRAGMA journal_mode = DELETE")
    dst.close()
    src.close()


if __name__ == "__main__":
    main(sys.argv[1])
