"""Fixtures for the LangChain adapter tests: a tmp SQLite file, the local OpenAI server,
ChatOpenAI pointed at it, and a guard that leaves LangChain's globals as it found them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from langchain_core.globals import get_llm_cache, set_llm_cache  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

import musubi_langchain  # noqa: E402
from tests.support.fixtures import openai_server, openai_server_session  # noqa: E402, F401
from tests.support.openai_server import OpenAIServer  # noqa: E402


@pytest.fixture
def db(store_target: str) -> str:
    """The store: a SQLite file, or (modules with ``BOTH_BACKENDS = True``) also a fresh
    PostgreSQL database's URL."""
    return store_target


@pytest.fixture(autouse=True)
def _restore_langchain_globals() -> Iterator[None]:
    before = get_llm_cache()
    yield
    musubi_langchain.uninstrument()
    musubi_langchain.uninstall_stream_replay()  # MusubiCache(replay_streams=True) installs it
    set_llm_cache(before)


@pytest.fixture
def chat(openai_server: OpenAIServer) -> ChatOpenAI:  # noqa: F811
    """A real provider client class talking to 127.0.0.1 (no retries: a failure is a failure).

    Each test gets its own async HTTP client: langchain-openai otherwise shares one process-wide,
    and its pooled connections die with the event loop of the test that opened them.
    """
    return ChatOpenAI(
        model="gpt-4o-mini",
        base_url=openai_server.base_url,
        api_key="test",
        max_retries=0,
        temperature=0,
        http_async_client=httpx.AsyncClient(),
    )
