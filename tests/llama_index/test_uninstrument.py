"""instrument() is idempotent; uninstrument() restores dispatcher and models exactly."""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.llms.openai import OpenAI

from musubi_llama_index import instrument, is_instrumented, uninstrument
from musubi_llama_index._lineage import MusubiEventHandler, MusubiSpanHandler
from tests.support.openai_server import OpenAIServer


def _snapshot(obj: Any) -> tuple[Any, ...]:
    return (type(obj), dict(obj.__dict__), obj.model_dump(), obj.to_json())


def test_uninstrument_restores_everything(
    db_path: str, llm: Any, embed_model: Any
) -> None:
    d = get_dispatcher()
    span_list, event_list = d.span_handlers, d.event_handlers
    spans_before, events_before = list(span_list), list(event_list)
    llm_before, emb_before = _snapshot(llm), _snapshot(embed_model)
    llm_cls, emb_cls = type(llm), type(embed_model)

    instrument(db_path, llm=llm, embed_model=embed_model)
    instrument(db_path, llm=llm, embed_model=embed_model)  # idempotent
    assert is_instrumented()
    assert sum(isinstance(h, MusubiSpanHandler) for h in d.span_handlers) == 1
    assert sum(isinstance(h, MusubiEventHandler) for h in d.event_handlers) == 1
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
    uninstrument()  # second call is a no-op
    assert d.span_handlers == spans_before


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
