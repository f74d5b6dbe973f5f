"""LlamaIndex: a query replayed by ``musubi_llama_index.instrument`` vs the same query
computed by an instant offline LLM (so the difference is musubi's own cost), and the
span/event handlers' recording overhead on a query that runs (nothing replayed)."""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

from _env import Env, need
from _harness import Comparison, Ratio, Skip, Variant

DOCS = [
    "musubi means 'knot' or 'tie' in Japanese.",
    "The lineage DAG lives in one local SQLite file.",
    "Reaching the same node again replays its stored output.",
    "Invalidating a node marks its descendants stale.",
    "Durable runs resume after a crash.",
]


def _models() -> tuple[Any, Any]:
    need("llama_index.core", "llama-index-core")
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback
    from pydantic import PrivateAttr

    # The call counters are private attributes: a model *field* would enter the
    # model's identity (musubi keys LLM calls by the instance's parameters).
    class CountingLLM(CustomLLM):
        _calls: int = PrivateAttr(default=0)
        model: str = "bench-llm"
        temperature: float = 0.0

        @property
        def calls(self) -> int:
            return self._calls

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name=self.model)

        @llm_completion_callback()
        def complete(
            self, prompt: str, formatted: bool = False, **kwargs: Any
        ) -> CompletionResponse:
            self._calls += 1
            return CompletionResponse(text=f"answer ({len(prompt)} chars of context)")

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            raise NotImplementedError

    class CountingEmbedding(BaseEmbedding):
        _calls: int = PrivateAttr(default=0)
        model_name: str = "bench-embed"

        @property
        def calls(self) -> int:
            return self._calls

        def _vec(self, text: str) -> list[float]:
            self._calls += 1
            return [float((hash(text) >> s) & 255) / 255 for s in range(0, 64, 8)]

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._vec(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._vec(text)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._vec(query)

    return CountingLLM(), CountingEmbedding()


def query_replay(env: Env) -> Comparison:
    need("llama_index.core", "llama-index-core")
    try:
        from musubi_llama_index import instrument, uninstrument
    except ImportError as exc:
        raise Skip(f"musubi_llama_index not importable ({exc})") from exc
    from llama_index.core import Document, VectorStoreIndex

    docs = [Document(text=t) for t in DOCS]
    plain_llm, plain_emb = _models()
    llm, emb = _models()
    plain_qe = VectorStoreIndex.from_documents(docs, embed_model=plain_emb).as_query_engine(
        llm=plain_llm
    )
    inst = instrument(
        str(env.path("llama.db")), llm=llm, embed_model=emb, lineage=False, use_settings=False
    )
    try:
        qe = VectorStoreIndex.from_documents(docs, embed_model=emb).as_query_engine(llm=llm)
        question = "What does musubi mean?"
        first = str(qe.query(question))
        calls = (llm.calls, emb.calls)
        second = str(qe.query(question))
        assert (llm.calls, emb.calls) == calls, "the second query reached the models"
        assert second == first
    except BaseException:
        uninstrument()
        raise
    fresh = itertools.count()

    def check(n: int) -> None:
        assert (llm.calls, emb.calls) == calls, (
            "a replayed query reached the LLM or embedding model"
        )

    def finish() -> None:
        inst.flush()
        uninstrument()

    return Comparison(
        "llama_index_query",
        "LlamaIndex `query_engine.query` (5 documents, top-2 retrieval)",
        [
            Variant(
                "no musubi (instant offline LLM runs)",
                lambda: plain_qe.query(f"{question} {next(fresh) % 1}"),
            ),
            Variant(
                "musubi replay",
                lambda: qe.query(question),
                check=check,
                note="LLM + query embedding replayed",
            ),
        ],
        [
            Ratio(
                "musubi replay / no musubi", "musubi replay", "no musubi (instant offline LLM runs)"
            )
        ],
        ops_per_block=env.pick(5, 30),
        rounds=env.pick(3, 11),
        finish=finish,
    )


def spans(env: Env) -> Comparison:
    """The cost of lineage recording alone: the same query engine, queried with a fresh
    question every op, with musubi's span and event handlers on the root dispatcher vs not.

    The models are *not* patched (``instrument()`` is given none and ``use_settings=False``),
    so the replay layer never runs: every query reaches the LLM and the query embedding, and
    the only musubi code on the path is the handlers (a call per span, flows inferred by
    content; the store's recorder commits the rows in the background, inside the timed
    blocks). The handlers are global to the root dispatcher, so the baseline block runs with
    them uninstalled (``uninstrument()`` in the untimed setup) - one query engine for both.
    """
    need("llama_index.core", "llama-index-core")
    try:
        from musubi_llama_index import instrument, is_instrumented, uninstrument
    except ImportError as exc:
        raise Skip(f"musubi_llama_index not importable ({exc})") from exc
    from llama_index.core import Document, VectorStoreIndex
    from llama_index_instrumentation import get_dispatcher

    from musubi_core import Engine, SQLiteStore

    if is_instrumented():
        raise RuntimeError("another case left musubi_llama_index instrumented")
    dispatcher = get_dispatcher()
    handlers_before = (list(dispatcher.span_handlers), list(dispatcher.event_handlers))
    llm, emb = _models()
    llm_cls, emb_cls = type(llm), type(emb)
    qe = VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCS], embed_model=emb
    ).as_query_engine(llm=llm)
    db = env.path("llama_spans.db")
    # An engine the benchmark owns: opened once here (not lazily inside a timed block)
    # and kept open across the instrument()/uninstrument() toggles.
    engine = Engine(SQLiteStore(str(db)), namespace="bench")
    fresh = itertools.count()

    def question() -> str:
        return f"What does musubi mean? (variant {next(fresh)})"

    def installed() -> bool:
        return any(type(h).__name__ == "MusubiSpanHandler" for h in dispatcher.span_handlers)

    def counts() -> tuple[int, int, int, int, int]:
        """(calls, query calls, LLM calls, flows, replays) in the store."""
        engine.flush()
        with sqlite3.connect(db) as con:
            calls = con.execute("SELECT COUNT(*) FROM musubi_calls").fetchone()[0]
            q = con.execute(
                "SELECT COUNT(*) FROM musubi_calls WHERE kind = 'query' AND op_name = ?",
                ("RetrieverQueryEngine.query",),
            ).fetchone()[0]
            lm = con.execute(
                "SELECT COUNT(*) FROM musubi_calls WHERE kind = 'llm' AND op_name = ?",
                (f"{llm_cls.__name__}.complete",),
            ).fetchone()[0]
            flows = con.execute("SELECT COUNT(*) FROM musubi_flows").fetchone()[0]
            replays = con.execute(
                "SELECT COALESCE(SUM(n.replay_count + COALESCE(r.replays, 0)), 0) FROM musubi_nodes n "
                "LEFT JOIN musubi_replays r ON r.node_id = n.node_id"
            ).fetchone()[0]
        con.close()
        return calls, q, lm, flows, replays

    state: dict[str, Any] = {}

    def arm(on: bool) -> None:
        if on and not is_instrumented():
            inst = instrument(engine=engine, lineage=True, use_settings=False)
            assert inst.patched == [] and inst.span_handler is not None
        elif not on:
            uninstrument()
        assert installed() == on
        state["models"] = (llm.calls, emb.calls)
        state["store"] = counts()

    def ran_every_query(n: int) -> None:
        # Nothing replayed: the LLM and the query embedding ran once per query, and the
        # models were never patched (their class is the user's own).
        assert (llm.calls, emb.calls) == (state["models"][0] + n, state["models"][1] + n), (
            "a query did not reach the LLM / embedding model once"
        )
        assert type(llm) is llm_cls and type(emb) is emb_cls, "a model was patched"

    def check_plain(n: int) -> None:
        ran_every_query(n)
        assert counts() == state["store"], "lineage was recorded with musubi uninstalled"

    def check_spans(n: int) -> None:
        ran_every_query(n)
        calls, q, lm, flows, replays = counts()
        calls0, q0, lm0, flows0, replays0 = state["store"]
        # Every query recorded its own call tree: a query-engine call and an LLM call per
        # (fresh) question, plus retrieval / synthesis / embedding calls and the flows.
        assert q - q0 == n, f"{q - q0} query calls recorded for {n} queries"
        assert lm - lm0 == n, f"{lm - lm0} LLM calls recorded for {n} queries"
        assert calls - calls0 >= 8 * n, f"only {calls - calls0} calls for {n} queries"
        assert flows - flows0 >= 8 * n, f"only {flows - flows0} flows for {n} queries"
        assert replays == replays0 == 0, "a span was replayed"

    def finish() -> None:
        uninstrument()
        engine.close()
        assert (dispatcher.span_handlers, dispatcher.event_handlers) == handlers_before, (
            "uninstrument() did not restore the dispatcher's handlers"
        )

    try:
        # Untimed sanity pass: one query with the handlers recorded its span tree.
        arm(True)
        qe.query(question())
        check_spans(1)
        arm(False)
    except BaseException:
        uninstrument()
        engine.close()
        raise

    return Comparison(
        "llama_index_spans",
        "LlamaIndex `query_engine.query` with musubi's span/event handlers, nothing replayed",
        [
            Variant(
                "no musubi (handlers not installed)",
                lambda: qe.query(question()),
                setup=lambda: arm(False),
                check=check_plain,
            ),
            Variant(
                "musubi span handler (recording only)",
                lambda: qe.query(question()),
                setup=lambda: arm(True),
                check=check_spans,
                note="models not patched; LLM and embedding run every query",
            ),
        ],
        [
            Ratio(
                "span handler / no musubi",
                "musubi span handler (recording only)",
                "no musubi (handlers not installed)",
            )
        ],
        ops_per_block=env.pick(5, 30),
        rounds=env.pick(3, 15),
        finish=finish,
    )


CASES = [query_replay, spans]
