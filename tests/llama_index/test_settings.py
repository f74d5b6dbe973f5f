"""Models on ``Settings`` replay whether they are set before or after ``instrument()``.

``instrument()`` reads nothing through ``Settings.llm`` / ``Settings.embed_model`` (their
getters resolve a default OpenAI model and fail without a key), and models set or resolved
later are made replayable when they are assigned or first read. A model handed straight to a
component, never seen by musubi, is called without replay: one warning says so.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.settings import _Settings
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI
from pydantic import BaseModel

from musubi_llama_index import instrument, uninstrument
from tests.support.openai_server import OpenAIServer

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

QUESTION = "What does musubi mean?"


def _query_twice(server: OpenAIServer, documents: list[Any], **engine_kwargs: Any) -> None:
    """Build an index + query engine from Settings' models twice; the second pass is free."""
    first = VectorStoreIndex.from_documents(documents).as_query_engine(**engine_kwargs)
    answer = first.query(QUESTION)
    assert server.count("chat") == 1 and server.count("embeddings") >= 2, server.counts()
    server.clear_log()
    second = VectorStoreIndex.from_documents(documents).as_query_engine(**engine_kwargs)
    assert str(second.query(QUESTION)) == str(answer)
    assert server.count() == 0, server.counts()


def _musubi_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "musubi" in str(w.message)]


def test_models_set_on_settings_after_instrument_replay(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any,
    documents: list[Any], settings: Any,
) -> None:
    instrument(db_path)  # nothing configured yet
    settings.llm = llm
    settings.embed_model = embed_model
    assert type(llm) is not OpenAI and isinstance(llm, OpenAI)  # patched at assignment
    assert type(embed_model) is not OpenAIEmbedding and isinstance(embed_model, OpenAIEmbedding)
    _query_twice(openai_server, documents)


def test_models_set_on_settings_before_instrument_replay(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any,
    documents: list[Any], settings: Any,
) -> None:
    settings.llm = llm
    settings.embed_model = embed_model
    instrument(db_path)
    _query_twice(openai_server, documents)


def test_model_replaced_on_settings_replays(
    openai_server: OpenAIServer, db_path: str, llm: Any, documents: list[Any], settings: Any
) -> None:
    settings.llm = llm
    instrument(db_path)
    other = OpenAI(model="gpt-4o", api_base=openai_server.base_url, api_key="test", max_retries=0)
    settings.llm = other
    other.complete("hello")
    other.complete("hello")
    assert openai_server.count("chat") == 1
    uninstrument()
    assert type(other) is OpenAI and type(llm) is OpenAI


def test_default_models_resolved_after_instrument_replay(
    openai_server: OpenAIServer, db_path: str, documents: list[Any], settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No model configured: LlamaIndex resolves its default OpenAI models from the environment
    # on first use. instrument() must not resolve them itself, and they must replay.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_BASE", openai_server.base_url)
    instrument(db_path)
    assert settings._llm is None and settings._embed_model is None
    assert openai_server.count() == 0
    _query_twice(openai_server, documents)
    assert isinstance(settings._llm, OpenAI) and type(settings._llm) is not OpenAI


def test_instrument_does_not_resolve_defaults_and_errors_pass_through(
    db_path: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("IS_TESTING", raising=False)
    instrument(db_path)  # would raise if it read Settings.llm: there is no key
    assert settings._llm is None and settings._embed_model is None
    # LlamaIndex's own errors reach the caller exactly as without musubi.
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        settings.llm  # noqa: B018
    with pytest.raises(ValueError, match="local"):
        settings.llm = "not-a-model"


def test_use_settings_false_leaves_settings_alone(
    db_path: str, llm: Any, settings: Any
) -> None:
    instrument(db_path, use_settings=False)
    assert type(settings) is _Settings
    settings.llm = llm
    assert type(settings.llm) is OpenAI


def test_settings_copy_is_a_plain_settings(db_path: str, llm: Any, settings: Any) -> None:
    instrument(db_path)
    settings.llm = llm
    clone = copy.copy(settings)
    assert type(clone) is _Settings and clone._llm is llm
    assert repr(settings).startswith("_Settings(")


def test_model_passed_to_component_warns_once(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any,
    documents: list[Any], settings: Any,
) -> None:
    settings.embed_model = embed_model
    instrument(db_path)
    engine = VectorStoreIndex.from_documents(documents).as_query_engine(llm=llm)  # not patched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.query(QUESTION)
        engine.query(QUESTION)
    messages = _musubi_warnings(caught)
    assert len(messages) == 1, messages
    assert "OpenAI" in messages[0] and "instrument(llm=" in messages[0]
    assert openai_server.count("chat") == 2  # not replayed, as the warning says


def test_embedding_passed_to_component_warns_once(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any,
    documents: list[Any], settings: Any,
) -> None:
    instrument(db_path, llm=llm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    messages = _musubi_warnings(caught)
    assert len(messages) == 1, messages
    assert "OpenAIEmbedding" in messages[0] and "instrument(embed_model=" in messages[0]


def test_no_warning_when_every_model_is_patched(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any,
    documents: list[Any], settings: Any,
) -> None:
    class Answer(BaseModel):
        text: str

    instrument(db_path, llm=llm)
    settings.embed_model = embed_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        VectorStoreIndex.from_documents(documents).as_query_engine(llm=llm).query(QUESTION)
        # A wrapper around a patched model (StructuredLLM) replays through the inner one.
        openai_server.enqueue_chat('{"text": "a knot"}')
        llm.as_structured_llm(Answer).complete("What is musubi?")
    assert _musubi_warnings(caught) == []
