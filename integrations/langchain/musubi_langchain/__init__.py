"""musubi for LangChain: a drop-in cache, a lineage callback handler and ``instrument()``.

Example:
    >>> import os, tempfile
    >>> from langchain_core.language_models import FakeListChatModel
    >>> db = os.path.join(tempfile.mkdtemp(), "m.db")
    >>> _ = instrument(db)
    >>> FakeListChatModel(responses=["hi"]).invoke("hello").content
    'hi'
    >>> uninstrument()
"""

from . import _compat  # noqa: F401  (names the fix when LangChain is missing)
from ._engine import MusubiLangChainWarning
from .cache import MusubiCache
from .handler import MusubiCallbackHandler
from .instrument import Instrumentation, instrument, uninstrument
from .streaming import install_stream_replay, uninstall_stream_replay
from .tools import declare_tool

__all__ = [
    "Instrumentation",
    "MusubiCache",
    "MusubiCallbackHandler",
    "MusubiLangChainWarning",
    "declare_tool",
    "install_stream_replay",
    "instrument",
    "uninstall_stream_replay",
    "uninstrument",
]
