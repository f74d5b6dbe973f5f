"""musubi for LlamaIndex: replay LLM and embedding calls, record spans as lineage.

>>> from musubi_llama_index import instrument, uninstrument   # doctest: +SKIP
>>> instrument("musubi.db")    # Settings.llm / Settings.embed_model now replay  # doctest: +SKIP
>>> uninstrument()                                              # doctest: +SKIP

Public API: :func:`instrument`, :func:`uninstrument`, :class:`MusubiKVStore`,
:func:`declare_tool` (tool replay, opt-in per tool), :func:`wrap` /
:class:`ContextThreadPoolExecutor` (context across thread pools).
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "musubi_llama_index needs LlamaIndex: pip install \"musubi-lineage[llama-index]\""
    ) from exc

from musubi_llama_index._instrument import (
    Instrumentation,
    instrument,
    is_instrumented,
    uninstrument,
)
from musubi_llama_index._tools import declare_tool
from musubi_llama_index.context import ContextThreadPoolExecutor, wrap
from musubi_llama_index.kvstore import MusubiKVStore

__all__ = [
    "ContextThreadPoolExecutor",
    "Instrumentation",
    "MusubiKVStore",
    "declare_tool",
    "instrument",
    "is_instrumented",
    "uninstrument",
    "wrap",
]
