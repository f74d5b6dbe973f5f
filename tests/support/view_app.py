"""A real recorded app for ``musubi view``: a LangChain RAG chain (the question rewritten by one
model call into a search query, documents retrieved with it, the answer written by a second
model call from them) and a LlamaIndex query over an index, both on real provider client
classes (``ChatOpenAI``, LlamaIndex's ``OpenAI`` and ``OpenAIEmbedding``) talking to the local
OpenAI-compatible server. Each runs twice: the second pass replays every model call.

Used by the browser tests (tests/view) and by ``benchmarks/view_screenshots.py``, which
writes the screenshots in docs/images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.openai_server import OpenAIServer

DOCS = [
    "musubi stores lineage in one sqlite file next to your app",
    "a replayed model call costs no tokens and returns at once",
    "invalidating a node marks everything downstream of it stale",
    "bananas are yellow and grow in bunches",
]
QUESTIONS = ["what does musubi store", "what does a replayed call cost"]
LI_QUESTION = "What does musubi store?"


def _rewrite(body: dict[str, Any]) -> str | None:
    """The rewriting model answers with search words taken from the question."""
    messages = body.get("messages") or []
    system = next((m.get("content") for m in messages if m.get("role") == "system"), "") or ""
    if "search query" not in str(system):
        return None
    question = str(messages[-1].get("content", ""))
    return "search: " + " ".join(w for w in question.split() if len(w) > 3)


@dataclass
class Recorded:
    db: str
    langchain_runs: int
    llama_index_queries: int


def rag_chain(chat: Any) -> Any:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    class KnowledgeBase(BaseRetriever):
        """Documents sharing a word with the query."""

        docs: list[str]

        def _get_relevant_documents(
            self, query: str, *, run_manager: CallbackManagerForRetrieverRun
        ) -> list[Document]:
            words = set(query.lower().split())
            return [Document(page_content=d) for d in self.docs if words & set(d.split())]

    rewrite = (
        ChatPromptTemplate.from_messages(
            [("system", "Rewrite the question as a search query."), ("human", "{question}")]
        )
        | chat
        | StrOutputParser()
    )
    fmt = RunnableLambda(lambda docs: "\n".join(d.page_content for d in docs), name="format_docs")
    answer = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context.\nContext:\n{context}"), ("human", "{question}")]
    )
    return (
        {
            "context": {"question": RunnablePassthrough()} | rewrite | KnowledgeBase(docs=DOCS) | fmt,
            "question": RunnablePassthrough(),
        }
        | answer
        | chat
        | StrOutputParser()
    )


def record_langchain(db: str, server: OpenAIServer, passes: int = 2) -> int:
    import httpx
    from langchain_openai import ChatOpenAI

    import musubi_langchain

    server.set_chat_rule(_rewrite)
    chat = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="test",
                      max_retries=0, temperature=0, http_async_client=httpx.AsyncClient())
    musubi_langchain.instrument(db)
    try:
        chain = rag_chain(chat)
        for _ in range(passes):
            for question in QUESTIONS:
                chain.invoke(question)
    finally:
        musubi_langchain.uninstrument()
        server.set_chat_rule(None)
    return passes * len(QUESTIONS)


def record_llama_index(db: str, server: OpenAIServer, passes: int = 2) -> int:
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai import OpenAI

    from musubi_llama_index import instrument, uninstrument

    llm = OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="test", max_retries=0)
    embed = OpenAIEmbedding(api_base=server.base_url, api_key="test", max_retries=0)
    instrument(db, llm=llm, embed_model=embed)
    try:
        for _ in range(passes):
            index = VectorStoreIndex.from_documents(
                [Document(text=t, doc_id=f"doc-{i}") for i, t in enumerate(DOCS)],
                embed_model=embed,
            )
            index.as_query_engine(llm=llm, similarity_top_k=2).query(LI_QUESTION)
    finally:
        uninstrument()
    return passes


def record_app(db: str, server: OpenAIServer) -> Recorded:
    """Record the LangChain RAG app and the LlamaIndex query (two passes each) into ``db``."""
    return Recorded(db, record_langchain(db, server), record_llama_index(db, server))
