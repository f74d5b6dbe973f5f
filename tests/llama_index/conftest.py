from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The shared test helpers live in tests/support; make the repo root importable even when
# pytest is launched as a bare `pytest` (which does not put the cwd on sys.path).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.fixtures import openai_server, openai_server_session  # noqa: E402, F401
from tests.support.openai_server import OpenAIServer  # noqa: E402

DOCS = [
    "Musubi is the Japanese word for a knot that ties things together.",
    "SQLite keeps the whole lineage graph in one local file on disk.",
    "A replayed LLM call costs no tokens and returns in microseconds.",
    "Embeddings turn text into vectors so similar passages can be retrieved.",
    "LlamaIndex query engines retrieve nodes and synthesize an answer with an LLM.",
]


@pytest.fixture
def db_path(store_target: str) -> str:
    """The store: a SQLite file, or (modules with ``BOTH_BACKENDS = True``) also a fresh
    PostgreSQL database's URL."""
    return store_target


@pytest.fixture
def llm(openai_server: OpenAIServer) -> Any:  # noqa: F811
    from llama_index.llms.openai import OpenAI

    return OpenAI(
        model="gpt-4o-mini", api_base=openai_server.base_url, api_key="test", max_retries=0
    )


@pytest.fixture
def embed_model(openai_server: OpenAIServer) -> Any:  # noqa: F811
    from llama_index.embeddings.openai import OpenAIEmbedding

    return OpenAIEmbedding(api_base=openai_server.base_url, api_key="test", max_retries=0)


@pytest.fixture
def documents() -> list[Any]:
    from llama_index.core import Document

    return [Document(text=t, doc_id=f"doc-{i}") for i, t in enumerate(DOCS)]


@pytest.fixture
def settings() -> Iterator[Any]:
    """LlamaIndex's global ``Settings`` with no LLM / embedding model; restored afterwards."""
    from llama_index.core import Settings

    saved = dict(Settings.__dict__)
    Settings._llm = None
    Settings._embed_model = None
    yield Settings
    Settings.__dict__.clear()
    Settings.__dict__.update(saved)


@pytest.fixture(autouse=True)
def _clean_instrumentation() -> Iterator[None]:
    from llama_index.core.settings import Settings, _Settings

    from musubi_llama_index import _runtime, uninstrument

    uninstrument()
    _runtime._warned.clear()  # "warn once" is per process; each test starts fresh
    yield
    uninstrument()
    assert type(Settings) is _Settings, "uninstrument() left Settings' class swapped"
