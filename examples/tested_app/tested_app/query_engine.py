"""A LlamaIndex query engine over a few documents (models set on ``Settings``)."""

from __future__ import annotations

from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex
from llama_index.core.query_engine import BaseQueryEngine
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from tested_app.config import EMBEDDING_MODEL, MODEL, api_key, base_url
from tested_app.prompts import QA_TEMPLATE

TEXTS = [
    "The tide pool holds anemones, crabs and small fish.",
    "Tide pools fill at high tide and are exposed at low tide.",
    "Hermit crabs borrow the shells of sea snails.",
]


def configure() -> None:
    Settings.llm = OpenAI(model=MODEL, temperature=0, api_base=base_url(), api_key=api_key())
    Settings.embed_model = OpenAIEmbedding(
        model=EMBEDDING_MODEL, api_base=base_url(), api_key=api_key()
    )


def build_engine(*, streaming: bool = False) -> BaseQueryEngine:
    configure()
    index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS])
    return index.as_query_engine(
        similarity_top_k=2, streaming=streaming, text_qa_template=PromptTemplate(QA_TEMPLATE)
    )


def ask(question: str) -> str:
    return str(build_engine().query(question))


def ask_streaming(question: str) -> list[str]:
    response = build_engine(streaming=True).query(question)
    return list(response.response_gen)  # type: ignore[attr-defined]
