"""MusubiCache serves a stored completion only if it hashes to its content id.

A completion edited in the store file (into another answer the decoder accepts) is a miss with
one ``MusubiLangChainWarning``, the provider is called, and the fresh entry repairs the store:
the next call replays the provider's answer. Covered: the fast path of a cache that has not
seen the entry (the next run of an app), the memoised path of a cache that has (another
connection edits the file between two hits), and a streamed call served from the store.
"""

from __future__ import annotations

import warnings

from langchain_core.globals import set_llm_cache
from langchain_openai import ChatOpenAI

from musubi_langchain import MusubiCache, MusubiLangChainWarning
from tests.support.openai_server import OpenAIServer
from tests.support.storedb import rows
from tests.support.tamper import edit_payload, payload_of

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

QUESTION = "Which city is the capital of Japan?"


def _model_artifact(db: str) -> str:
    found = rows(db, "SELECT artifact_id FROM musubi_nodes WHERE kind = 'chat_model'")
    assert len(found) == 1
    return str(found[0][0])


def _tamper_answer(db: str, answer: str) -> None:
    """Edit the stored completion (in place, keeping its id) so it says something else."""
    art = _model_artifact(db)
    payload = payload_of(db, art)
    assert answer.encode() in payload
    edit_payload(db, art, payload.replace(answer.encode(), b"Osaka, said nobody"))


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, MusubiLangChainWarning)]


def test_edited_entry_is_a_miss_on_the_fast_path(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    set_llm_cache(MusubiCache(db))
    answer = str(chat.invoke(QUESTION).content)
    assert openai_server.chat_count == 1
    _tamper_answer(db, answer)

    set_llm_cache(MusubiCache(db))  # the next run of the app: nothing memoised yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = chat.invoke(QUESTION)
    assert again.content == answer  # from the provider, never the edited text
    assert openai_server.chat_count == 2
    assert len(_ours(caught)) == 1 and "content id" in str(_ours(caught)[0].message)
    assert b"Osaka" not in payload_of(db, _model_artifact(db))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = chat.invoke(QUESTION)
    assert third.content == answer and openai_server.chat_count == 2  # the repaired entry


def test_edited_entry_after_memoised_hits_is_a_miss(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    cache = MusubiCache(db)
    set_llm_cache(cache)
    answer = str(chat.invoke(QUESTION).content)
    for _ in range(3):  # hits: the probe and the decoded template are memoised
        assert chat.invoke(QUESTION).content == answer
    assert openai_server.chat_count == 1
    cache.engine.flush()
    _tamper_answer(db, answer)  # another connection, between two hits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = chat.invoke(QUESTION)
    assert again.content == answer
    assert openai_server.chat_count == 2
    assert len(_ours(caught)) == 1
    assert b"Osaka" not in payload_of(db, _model_artifact(db))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert chat.invoke(QUESTION).content == answer
    assert openai_server.chat_count == 2


def test_edited_entry_is_not_replayed_as_a_stream(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    set_llm_cache(MusubiCache(db, replay_streams=True))
    answer = "".join(str(c.content) for c in chat.stream(QUESTION))
    assert openai_server.chat_count == 1
    _tamper_answer(db, answer)

    set_llm_cache(MusubiCache(db, replay_streams=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = "".join(str(c.content) for c in chat.stream(QUESTION))
    assert again == answer and openai_server.chat_count == 2
    assert len(_ours(caught)) == 1  # the stream ran live
    assert "".join(str(c.content) for c in chat.stream(QUESTION)) == answer
    assert openai_server.chat_count == 2
