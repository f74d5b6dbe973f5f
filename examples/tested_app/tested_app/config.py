"""Where the provider is and which model to ask (from the environment)."""

from __future__ import annotations

import os

MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"


def base_url() -> str | None:
    """The provider's base URL (``OPENAI_BASE_URL``), or None for OpenAI's own."""
    return os.environ.get("OPENAI_BASE_URL") or None


def api_key() -> str | None:
    return os.environ.get("OPENAI_API_KEY") or None


def chat_model():  # type: ignore[no-untyped-def]
    """The LangChain chat model every chain of the app uses."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, temperature=0, base_url=base_url(), api_key=api_key())
