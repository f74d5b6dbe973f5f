"""The instrumented-model registry shared by the LLM and embedding replay layers: which
instances are patched (and with which runtime), the guard marking a model as running its
provider, and the call records of its requests.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

from musubi_llama_index import _calls
from musubi_llama_index._runtime import Runtime, warn_once

__all__ = [
    "SPAN_ATTR",
    "Guard",
    "begin",
    "end",
    "failed",
    "lock",
    "mark",
    "model_name",
    "passthrough",
    "patched",
    "runtime_of",
    "subclasses",
]

SPAN_ATTR = "__dispatcher_span_decorated__"

# id(instance) of objects currently executing their *original* method: nested calls made by
# the provider itself (MockLLM.acomplete -> self.complete, base _get_text_embeddings ->
# self._get_text_embedding) pass straight through, so only the outermost call is a node.
_inside: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "musubi_li_inside", default=frozenset()
)

lock = threading.RLock()
subclasses: dict[type, type] = {}
# id(obj) -> (obj, original class, runtime)
patched: dict[int, tuple[Any, type, Runtime]] = {}


# ----------------------------------------------------------------------------- helpers
def runtime_of(obj: Any) -> Runtime | None:
    with lock:
        entry = patched.get(id(obj))
    return entry[2] if entry is not None and entry[0] is obj else None


def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, SPAN_ATTR, True)  # DispatcherSpanMixin: "already a span", do not wrap
    return fn


class Guard:
    """Marks ``obj`` as running its original method in the current context (and ``call`` as
    the model call the provider's own spans belong to)."""

    __slots__ = ("_call", "_obj", "_token", "_token_call")

    def __init__(self, obj: Any, call: _calls.Call | None = None) -> None:
        self._obj = obj
        self._call = call
        self._token: contextvars.Token[frozenset[int]] | None = None
        self._token_call: contextvars.Token[_calls.Call | None] | None = None

    def __enter__(self) -> None:
        self._token = _inside.set(_inside.get() | {id(self._obj)})
        if self._call is not None:
            self._token_call = _calls.MODEL_CALL.set(self._call)

    def __exit__(self, *exc: object) -> None:
        if self._token_call is not None:
            try:
                _calls.MODEL_CALL.reset(self._token_call)
            except ValueError:
                _calls.MODEL_CALL.set(None)
            self._token_call = None
        if self._token is not None:
            try:
                _inside.reset(self._token)
            except ValueError:  # token from another context (generator moved): best effort
                _inside.set(_inside.get() - {id(self._obj)})


def passthrough(obj: Any) -> bool:
    return id(obj) in _inside.get() or runtime_of(obj) is None


def model_name(obj: Any) -> str | None:
    fields = getattr(obj, "__dict__", None) or {}
    for name in ("model", "model_name"):
        value = fields.get(name)
        if isinstance(value, str):
            return value
    return None


def begin(rt: Runtime, kind: str, label: str, model: str | None, text: str) -> Any:
    """Open the call record of one request (None when nothing records it)."""
    try:
        return _calls.begin_model_call(rt, kind, label, model, text)
    except Exception as exc:  # recording never breaks the request
        warn_once(f"calls:{type(exc).__name__}", f"recording a model call failed ({exc!r})")
        return None


def end(call: Any, **fields: Any) -> None:
    if call is None:
        return
    try:
        _calls.end_model_call(call, **fields)
    except Exception as exc:
        warn_once(f"calls:{type(exc).__name__}", f"recording a model call failed ({exc!r})")


def failed(call: Any, err: BaseException) -> None:
    end(
        call,
        node_id=None,
        artifact_id=None,
        replayed=False,
        tokens=(None, None),
        saved_s=None,
        texts=[],
        output_preview=None,
        error=f"{type(err).__name__}: {err}"[:4000],
    )
