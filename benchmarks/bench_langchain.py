"""LangChain: ``invoke`` served from a cache (hit / miss) and the callback handler on a chain."""

from __future__ import annotations

import itertools
from typing import Any

from _env import Env, helper_answered, need
from _harness import Comparison, Ratio, Skip, Variant


def _counting_model(**kwargs: Any) -> Any:
    need("langchain_core", "langchain-core")
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class CountingChatModel(BaseChatModel):
        """An offline chat model that counts how often it is really called."""

        calls: int = 0
        model_name: str = "bench-model"
        temperature: float = 0.0

        @property
        def _llm_type(self) -> str:
            return "bench-counting"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name, "temperature": self.temperature}

        def _generate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            self.calls += 1
            text = "echo: " + str(messages[-1].content)
            msg = AIMessage(
                content=text,
                usage_metadata={"input_tokens": 12, "output_tokens": 8, "total_tokens": 20},
            )
            return ChatResult(generations=[ChatGeneration(message=msg)])

    return CountingChatModel(**kwargs)


def _musubi_cache(env: Env, name: str) -> Any:
    try:
        from musubi_langchain import MusubiCache
    except ImportError as exc:  # the adapter is optional in a partial checkout
        raise Skip(f"musubi_langchain not importable ({exc})") from exc
    return MusubiCache(str(env.path(f"{name}.db")))


def _anchor_caches(env: Env, name: str) -> dict[str, Any]:
    need("langchain_core", "langchain-core")
    from langchain_core.caches import InMemoryCache

    caches: dict[str, Any] = {"InMemoryCache": InMemoryCache()}
    try:
        from langchain_community.cache import SQLiteCache
    except ImportError:
        env.missing("langchain-community (SQLiteCache)")
    else:
        caches["SQLiteCache"] = SQLiteCache(database_path=str(env.path(f"{name}-lc.db")))
    caches["MusubiCache"] = _musubi_cache(env, name)
    return caches


def _unverified_cache(env: Env, name: str) -> Any:
    """A MusubiCache that does not check the content id of what it serves (only to measure
    what that check costs)."""
    cache = _musubi_cache(env, name)
    cache.engine._verify_artifacts = False
    return cache


def invoke_hit(env: Env) -> Comparison:
    caches = _anchor_caches(env, "lc-hit")
    caches["MusubiCache, unverified"] = _unverified_cache(env, "lc-hit-unverified")
    prompt = "What is the capital of Japan? Answer in one word."
    variants = []
    for label, cache in caches.items():
        model = _counting_model(cache=cache)
        first = model.invoke(prompt)
        assert model.calls == 1
        again = model.invoke(prompt)
        assert model.calls == 1, f"{label}: the second invoke reached the model"
        assert again.content == first.content

        def check(n: int, model: Any = model, label: str = label) -> None:
            assert model.calls == 1, f"{label}: a 'hit' reached the model ({model.calls} calls)"

        variants.append(Variant(label, lambda model=model: model.invoke(prompt), check=check))
    ratios = [
        Ratio("MusubiCache / InMemoryCache", "MusubiCache", "InMemoryCache", 1.15),
        Ratio("MusubiCache / unverified", "MusubiCache", "MusubiCache, unverified"),
    ]
    if "SQLiteCache" in caches:
        ratios.append(
            Ratio("MusubiCache / SQLiteCache", "MusubiCache", "SQLiteCache", 0.5, strict=True)
        )
    return Comparison(
        "langchain_invoke_hit",
        "LangChain chat model `invoke`, served from the cache",
        variants,
        ratios,
        ops_per_block=env.pick(20, 100),
        rounds=env.pick(3, 15),
    )


def invoke_hit_sustained(env: Env) -> Comparison:
    """``invoke`` hits in a long loop (blocks of seconds, so the recorder's commits of a block's
    calls happen during it), everything recorded committed before each block (not timed): no
    block pays for another's rows. MusubiCache with its batches committed by the recorder's
    helper process (the default under a steady load) and by its writer thread."""
    from langchain_core.caches import InMemoryCache

    from musubi_core.record import flush_recorders, recorder_for

    prompt = "What is the capital of Japan? Answer in one word."
    helper, thread = (
        _musubi_cache(env, "lc-sustained-helper"),
        _musubi_cache(env, "lc-sustained-thread"),
    )
    recorder_for(thread.engine.store).helper = False
    caches = {
        "MusubiCache, helper process": helper,
        "MusubiCache, writer thread": thread,
        "InMemoryCache": InMemoryCache(),
    }
    variants = []
    models: dict[str, Any] = {}
    for label, cache in caches.items():
        model = models[label] = _counting_model(cache=cache)
        model.invoke(prompt)

        def check(n: int, model: Any = model, label: str = label) -> None:
            assert model.calls == 1, f"{label}: a 'hit' reached the model ({model.calls} calls)"

        variants.append(
            Variant(
                label, lambda model=model: model.invoke(prompt), check=check, setup=flush_recorders
            )
        )

    def finish() -> None:
        poke = models["MusubiCache, helper process"]
        assert helper_answered(helper.engine.store, lambda: poke.invoke(prompt)), (
            "no helper process ran"
        )

    return Comparison(
        "langchain_invoke_hit_sustained",
        "LangChain `invoke` hits in a long loop (blocks of seconds): helper process vs writer thread",
        variants,
        [
            Ratio("helper process / InMemoryCache", "MusubiCache, helper process", "InMemoryCache"),
            Ratio("writer thread / InMemoryCache", "MusubiCache, writer thread", "InMemoryCache"),
        ],
        ops_per_block=env.pick(1_000, 10_000),
        rounds=env.pick(2, 5),
        finish=finish,
    )


def invoke_miss(env: Env) -> Comparison:
    caches = _anchor_caches(env, "lc-miss")
    caches = {"no cache": None, **caches}
    counter = itertools.count()
    variants = []
    for label, cache in caches.items():
        model = _counting_model(cache=cache) if cache is not None else _counting_model()
        model.invoke("warm-up " + label)
        state = {"calls": model.calls}

        def check(
            n: int, model: Any = model, state: dict[str, int] = state, label: str = label
        ) -> None:
            assert model.calls == state["calls"] + n, f"{label}: a 'miss' did not call the model"
            state["calls"] = model.calls

        variants.append(
            Variant(
                label,
                lambda model=model, label=label: model.invoke(f"{label} question {next(counter)}"),
                check=check,
            )
        )
    ratios = [
        Ratio("MusubiCache / InMemoryCache", "MusubiCache", "InMemoryCache"),
        Ratio("MusubiCache / no cache", "MusubiCache", "no cache"),
    ]
    if "SQLiteCache" in caches:
        ratios.append(Ratio("MusubiCache / SQLiteCache", "MusubiCache", "SQLiteCache"))
    return Comparison(
        "langchain_invoke_miss",
        "LangChain chat model `invoke`, cache miss (model called, result stored)",
        variants,
        ratios,
        ops_per_block=env.pick(10, 50),
        rounds=env.pick(3, 11),
    )


def handler_chain(env: Env) -> Comparison:
    need("langchain_core", "langchain-core")
    try:
        from musubi_langchain import MusubiCallbackHandler
    except ImportError as exc:
        raise Skip(f"musubi_langchain not importable ({exc})") from exc
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda

    def build() -> tuple[Any, Any]:
        model = _counting_model()
        chain = (
            RunnableLambda(lambda q: {"question": q.strip()})
            | ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
            | model
            | StrOutputParser()
            | RunnableLambda(lambda s: s.upper())
        )
        return model, chain

    _plain_model, plain = build()
    _handled_model, handled = build()
    _traced_model, traced = build()
    # The anchor: LangChain's own in-memory tracer (it persists nothing).
    from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

    collector = RunCollectorCallbackHandler()
    traced_config = {"callbacks": [collector]}

    def traced_invoke() -> None:
        traced.invoke(f"q{next(counter)}", config=traced_config)  # type: ignore[arg-type]
        if len(collector.traced_runs) > 1000:
            collector.traced_runs.clear()

    handler = MusubiCallbackHandler(str(env.path("handler.db")))
    config = {"callbacks": [handler]}
    counter = itertools.count()
    assert handled.invoke(" warm ", config=config) == "ECHO: WARM"

    def recorded_calls() -> int:
        handler.flush()
        return sum(r.calls for r in handler.engine.store.list_runs(limit=1_000_000))

    recorded = recorded_calls()
    assert recorded == 6, f"the handler recorded {recorded} calls for a five-step chain"

    before = {"calls": recorded}

    def finish() -> None:
        calls = recorded_calls()
        assert calls - before["calls"] >= 6, "the handler stopped recording during the run"

    return Comparison(
        "langchain_handler",
        "Five-step LangChain chain (lambda | prompt | chat model | parser | lambda), `invoke`",
        [
            Variant("no handler", lambda: plain.invoke(f"q{next(counter)}")),
            Variant(
                "MusubiCallbackHandler",
                lambda: handled.invoke(f"q{next(counter)}", config=config),  # type: ignore[arg-type]
            ),
            Variant("RunCollectorCallbackHandler (LangChain's in-memory tracer)", traced_invoke),
        ],
        [
            Ratio("handler / no handler", "MusubiCallbackHandler", "no handler", 1.2),
            Ratio(
                "handler / LangChain's in-memory tracer",
                "MusubiCallbackHandler",
                "RunCollectorCallbackHandler (LangChain's in-memory tracer)",
            ),
        ],
        ops_per_block=env.pick(10, 50),
        rounds=env.pick(3, 15),
        finish=finish,
    )


CASES = [invoke_hit, invoke_miss, handler_chain, invoke_hit_sustained]
