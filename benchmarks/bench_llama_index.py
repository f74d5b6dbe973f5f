"""LlamaIndex: a query replayed by ``musubi_llama_index.instrument`` vs the same query
computed by an instant offline LLM (so the difference is musubi's own cost)."""

from __future__ import annotations

import itertools
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


CASES = [query_replay]
