"""Import LangChain at the adapter boundary, with an error message that names the fix.

musubi_core never imports LangChain; everything in this package that needs it imports it
through here (or after this module has been imported), so a missing install fails once,
early, and says what to do.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'musubi_langchain needs LangChain: pip install "musubi-lineage[langchain]"'
    ) from exc

__all__: list[str] = []
