"""LangChain adapter (placeholder until exports are wired)."""
from . import _compat  # noqa: F401
