"""A LangChain RAG chain: a keyword retriever over a few documents, a prompt, a chat model."""

from __future__ import annotations

import re
from collections.abc import Iterator

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from tested_app.config import chat_model
from tested_app.prompts import RAG_SYSTEM

DOCUMENTS = [
    Document(page_content="musubi keeps its records in one local SQLite file.", metadata={"id": 1}),
    Document(page_content="A replayed call costs no tokens and no waiting.", metadata={"id": 2}),
    Document(page_content="Invalidating a node marks everything downstream stale.", metadata={"id": 3}),
    Document(page_content="Musubi is a Japanese word for a knot that ties things.", metadata={"id": 4}),
]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


class KeywordRetriever(BaseRetriever):
    """The ``k`` documents sharing the most words with the question."""

    documents: list[Document]
    k: int = 2

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        asked = _words(query)
        ranked = sorted(self.documents, key=lambda d: -len(asked & _words(d.page_content)))
        return ranked[: self.k]


def _format(docs: list[Document]) -> str:
    return "\n".join(f"- {d.page_content}" for d in docs)


def build_chain() -> Runnable[str, str]:
    prompt = ChatPromptTemplate.from_messages([("system", RAG_SYSTEM), ("human", "{question}")])
    retriever = KeywordRetriever(documents=DOCUMENTS)
    return (
        {"context": retriever | RunnableLambda(_format), "question": RunnablePassthrough()}
        | prompt
        | chat_model()
        | StrOutputParser()
    )


def answer(question: str) -> str:
    return build_chain().invoke(question)


def stream_answer(question: str) -> Iterator[str]:
    yield from build_chain().stream(question)
