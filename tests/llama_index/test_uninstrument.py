"""instrument() is idempotent; uninstrument() restores dispatcher and models exactly."""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.settings import _Settings
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from musubi_llama_index import instrument, is_instrumented, uninstrument
from musubi_llama_index._instrument import UnpatchedModelWatch
from musubi_llama_index._lineage import MusubiEventHandler, MusubiSpanHandler
from tests.support.openai_server import OpenAIServer

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _snapshot(obj: Any) -> tuple[Any, ...]:
    return (type(obj), dict(obj.__dict__), obj.model_dump(), obj.to_json())


def _settings_snapshot(settings: Any) -> tuple[Any, ...]:
    return (type(settings), list(settings.__dict__), [id(v) for v in settings.__dict__.values()])


def test_uninstrument_restores_everything(
    db_path: str, llm: Any, embed_model: Any, settings: Any
) -> None:
    d = get_dispatcher()
    span_list, event_list = d.span_handlers, d.event_handlers
    spans_before, events_before = list(span_list), list(event_list)
    llm_before, emb_before = _snapshot(llm), _snapshot(embed_model)
    llm_cls, emb_cls = type(llm), type(embed_model)
    settings_before = _settings_snapshot(settings)

    instrument(db_path, llm=llm, embed_model=embed_model)
    instrument(db_path, llm=llm, embed_model=embed_model)  # idempotent
    assert is_instrumented()
    assert sum(isinstance(h, MusubiSpanHandler) for h in d.span_handlers) == 1
    assert sum(isinstance(h, MusubiEventHandler) for h in d.event_handlers) == 1
    assert sum(isinstance(h, UnpatchedModelWatch) for h in d.span_handlers) == 1
    # Settings: its class swapped once (same name), nothing added to or read from it.
    assert type(settings).__bases__ == (_Settings,) and type(settings).__name__ == "_Settings"
    assert _settings_snapshot(settings)[1:] == settings_before[1:]
    assert type(llm) is not llm_cls and isinstance(llm, llm_cls)
    # No instance state added: fields and serialisation are unchanged while patched.
    assert llm.__dict__ == llm_before[1] and llm.model_dump() == llm_before[2]

    uninstrument()
    assert not is_instrumented()
    assert d.span_handlers is span_list and d.event_handlers is event_list
    assert d.span_handlers == spans_before and d.event_handlers == events_before
    assert all(a is b for a, b in zip(d.span_handlers, spans_before, strict=False))
    assert type(llm) is llm_cls and type(embed_model) is emb_cls
    assert _snapshot(llm) == llm_before and _snapshot(embed_model) == emb_before
    assert _settings_snapshot(settings) == settings_before
    uninstrument()  # second call is a no-op
    assert d.span_handlers == spans_before
    assert _settings_snapshot(settings) == settings_before


def test_uninstrument_restores_settings_and_models_set_on_it(
    db_path: str, llm: Any, embed_model: Any, settings: Any
) -> None:
    settings.llm = llm  # before instrument()
    instrument(db_path)
    settings.embed_model = embed_model  # after instrument()
    assert type(settings.llm) is not OpenAI and type(embed_model) is not OpenAIEmbedding
    assert settings._llm is llm and settings._embed_model is embed_model  # same objects
    fields = dict(settings.__dict__)
    # (LlamaIndex's setter/getter may set a model's callback_manager: compare to now.)
    llm_state, emb_state = _snapshot(llm)[1:], _snapshot(embed_model)[1:]

    uninstrument()
    assert type(settings) is _Settings
    assert settings.__dict__.keys() == fields.keys()
    assert all(settings.__dict__[k] is v for k, v in fields.items())
    assert _snapshot(llm) == (OpenAI, *llm_state)
    assert _snapshot(embed_model) == (OpenAIEmbedding, *emb_state)
    # Uninstrumented: a model assigned now is left alone.
    other = OpenAI(model="gpt-4o", api_key="test")
    settings.llm = other
    assert type(settings.llm) is OpenAI


def test_after_uninstrument_calls_go_to_provider(
    openai_server: OpenAIServer, db_path: str, llm: Any
) -> None:
    instrument(db_path, llm=llm)
    llm.complete("once upon a time")
    llm.complete("once upon a time")
    assert openai_server.count("chat") == 1
    uninstrument()
    llm.complete("once upon a time")
    assert openai_server.count("chat") == 2


def test_settings_models_are_patched_and_restored(
    openai_server: OpenAIServer, db_path: str, llm: Any, embed_model: Any
) -> None:
    from llama_index.core import Settings

    old_llm, old_emb = Settings._llm, Settings._embed_model
    Settings.llm, Settings.embed_model = llm, embed_model
    try:
        instrument(db_path)
        assert type(Settings.llm) is not OpenAI and isinstance(Settings.llm, OpenAI)
        Settings.llm.complete("settings llm")
        Settings.llm.complete("settings llm")
        assert openai_server.count("chat") == 1
        uninstrument()
        assert type(Settings.llm) is OpenAI
    finally:
        Settings._llm, Settings._embed_model = old_llm, old_emb


def test_patched_model_pickles_as_original(db_path: str, llm: Any) -> None:
    import pickle

    instrument(db_path, llm=llm)
    clone = pickle.loads(pickle.dumps(llm))
    assert type(clone) is OpenAI
    assert clone.model == llm.model
