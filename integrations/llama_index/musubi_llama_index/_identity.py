"""Canonical identity inputs for LlamaIndex objects (DESIGN §3).

Everything here returns plain, deterministic data (dict/list/str/int/float/bool/None) that
the core hashes: never ``repr()``, ``id()`` or memory addresses, and never secrets.

* :func:`model_fingerprint` -- class + sampling parameters read from an LLM or embedding
  *instance* (model, temperature, max_tokens, ...), with credentials and transport settings
  (api_key, api_base, headers, timeouts, clients) excluded.
* :func:`message_identity` / :func:`llm_call_inputs` -- the request of one LLM call with
  volatile fields (provider tool-call ids) removed.
* :func:`identity_view` -- a bounded structural view of the extra arguments of an LLM call
  (nodes by content hash, query bundles by their strings, unknown objects by class name only).

Spans have no identity (they are calls, recorded, never replayed): nothing here runs for them.

Example::

    fp = model_fingerprint(OpenAI(model="gpt-4o-mini", temperature=0, api_key="sk-..."))
    assert "sk-" not in str(fp)
"""

from __future__ import annotations

import datetime as _dt
import enum
import functools
import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "class_path",
    "identity_view",
    "llm_call_inputs",
    "message_identity",
    "model_fingerprint",
    "scrub",
]

# Field names that never enter identity: credentials, transport, plumbing. Matched on the
# lowercased field name as substrings, except the exact sampling names allowed below.
_DENY_SUBSTRINGS = (
    "key",
    "secret",
    "password",
    "token",
    "credential",
    "auth",
    "header",
    "client",
    "callback",
    "timeout",
    "retries",
    "retry",
    "base",
    "url",
    "endpoint",
    "organization",
    "http",
    "rate_limiter",
    "reuse",
    "proxy",
    "cache",
    "num_workers",
    "batch_size",
    "show_progress",
)
_ALLOW_EXACT = {
    "max_tokens",
    "max_new_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "num_output",
    "top_k",
    "top_p",
}


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Pure function of the name, called for every field and mapping key of every span argument
# (thousands per query): memoised. Bounded, since mapping keys can be arbitrary strings.
@functools.lru_cache(maxsize=4096)
def _denied(name: str) -> bool:
    low = name.lower()
    if low in _ALLOW_EXACT:
        return False
    return any(s in low for s in _DENY_SUBSTRINGS)


def _plain(value: Any, depth: int = 0) -> tuple[bool, Any]:
    """(ok, value) where value is JSON-plain; objects and callables are not ok."""
    if depth > 8:
        return False, None
    if isinstance(value, enum.Enum):  # before str/int: str-Enums must become plain values
        return _plain(value.value, depth + 1)
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return True, value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if _denied(str(k)):
                continue
            ok, pv = _plain(v, depth + 1)
            if ok:
                out[str(k)] = pv
        return True, out
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            ok, pv = _plain(v, depth + 1)
            if not ok:
                return False, None
            items.append(pv)
        return True, items
    return False, None


def scrub(value: Any) -> Any:
    """JSON-plain copy of ``value`` with denied keys removed and objects dropped."""
    ok, out = _plain(value)
    return out if ok else None


def _identity_fields(cls: type) -> tuple[str, ...]:
    """Sorted names of ``cls``'s pydantic fields that may enter identity (a class-level fact,
    computed once per class; the values are read from the instance on every call)."""
    fields = getattr(cls, "model_fields", None) or {}
    cached = _FIELDS_CACHE.get(cls)
    # model_fields is fixed once a class is built; the identity check covers a class whose
    # fields are rebuilt (model_rebuild) after the first call.
    if cached is not None and cached[0] is fields:
        return cached[1]
    names = tuple(n for n in sorted(fields) if not (_denied(n) or n.startswith("_")))
    _FIELDS_CACHE[cls] = (fields, names)
    return names


# Weak keys: classes made at run time (tests, notebooks) are not kept alive by the cache.
_FIELDS_CACHE: weakref.WeakKeyDictionary[type, tuple[Any, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def model_fingerprint(instance: Any, *, original_cls: type | None = None) -> dict[str, Any]:
    """Class + identity-relevant parameters read from a pydantic LLM/embedding instance."""
    cls = original_cls or type(instance)
    params: dict[str, Any] = {}
    for name in _identity_fields(type(instance)):
        try:
            value = getattr(instance, name)
        except Exception:
            continue
        if callable(value) and not isinstance(value, (Mapping, Sequence)):
            continue
        ok, pv = _plain(value)
        if ok:
            params[name] = pv
    return {"class": class_path(cls), "params": params}


# ----------------------------------------------------------------------------- LLM calls
def _block_identity(block: Any) -> Any:
    kind = getattr(block, "block_type", type(block).__name__)
    if kind == "text":
        return {"text": getattr(block, "text", "")}
    if kind == "tool_call":
        # Provider tool-call ids are volatile (DESIGN §3): name + arguments identify the call.
        return {"tool_call": getattr(block, "tool_name", None), "kwargs": scrub(block.tool_kwargs)}
    if kind == "thinking":
        return {"thinking": getattr(block, "content", None)}
    for attr in ("url", "path", "text"):
        v = getattr(block, attr, None)
        if v is not None:
            return {kind: str(v)}
    data = getattr(block, "data", None) or getattr(block, "image", None)
    if isinstance(data, (bytes, bytearray)):
        return {kind: hashlib.sha256(bytes(data)).hexdigest()}
    return {kind: None}


def _tool_call_identity(tc: Any) -> Any:
    if isinstance(tc, Mapping):
        fn = tc.get("function") or {}
        return {"name": fn.get("name"), "arguments": fn.get("arguments")}
    fn = getattr(tc, "function", None)
    return {"name": getattr(fn, "name", None), "arguments": getattr(fn, "arguments", None)}


def message_identity(msg: Any) -> Any:
    """Role + content blocks + stable extras of a ChatMessage (ids dropped)."""
    if isinstance(msg, str):
        return {"role": "user", "blocks": [{"text": msg}]}
    role = getattr(msg, "role", None)
    extra: dict[str, Any] = {}
    for k, v in (getattr(msg, "additional_kwargs", None) or {}).items():
        if k == "tool_calls" and isinstance(v, (list, tuple)):
            extra[k] = [_tool_call_identity(tc) for tc in v]
        elif k in ("tool_call_id", "id", "message_id", "usage", "response_metadata"):
            continue
        else:
            sv = scrub(v)
            if sv is not None:
                extra[str(k)] = sv
    return {
        "role": str(getattr(role, "value", role)),
        "blocks": [_block_identity(b) for b in getattr(msg, "blocks", [])],
        "extra": extra,
    }


def llm_call_inputs(kind: str, payload: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Identity inputs for ``chat`` (payload = messages) or ``complete`` (payload = prompt)."""
    if kind == "chat":
        body: Any = [message_identity(m) for m in (payload or [])]
    else:
        body = str(payload)
    kw: dict[str, Any] = {}
    for k, v in sorted(kwargs.items()):
        if _denied(k):
            continue
        view = identity_view(v)
        kw[k] = view
    return {"kind": kind, "input": body, "kwargs": kw}


# ----------------------------------------------------------------------------- call arguments
_MAX_ITEMS = 256


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _node_text(node: Any) -> str | None:
    get_content = getattr(node, "get_content", None)
    if callable(get_content):
        try:
            from llama_index.core.schema import MetadataMode

            return str(get_content(metadata_mode=MetadataMode.ALL))
        except Exception:
            return None
    return None


def identity_view(value: Any, depth: int = 0) -> Any:
    """Deterministic, bounded structural view of a span argument or result."""
    if depth > 6:
        return {"__truncated__": True}
    # The common exact types first, without the (slow) ABC checks below; what they return is
    # what the general branches return for them (subclasses, str-Enums, go the long way).
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        items = list(value.items())[:_MAX_ITEMS]
        return {str(k): identity_view(v, depth + 1) for k, v in items if not _denied(str(k))}
    if kind is list or kind is tuple:
        return [identity_view(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    if isinstance(value, enum.Enum):  # before str/int: str-Enums must become plain values
        return identity_view(value.value, depth + 1)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        items = list(value.items())[:_MAX_ITEMS]
        return {str(k): identity_view(v, depth + 1) for k, v in items if not _denied(str(k))}
    if isinstance(value, (list, tuple)):
        return [identity_view(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    if isinstance(value, (set, frozenset)):
        views = [identity_view(v, depth + 1) for v in value]
        return sorted(views, key=repr)[:_MAX_ITEMS]
    name = type(value).__name__
    # NodeWithScore: content + score; BaseNode: content only (random node ids are volatile).
    if hasattr(value, "node") and hasattr(value, "score") and hasattr(value.node, "get_content"):
        text = _node_text(value.node)
        score = value.score
        return {
            "node_sha": _sha(text) if text is not None else None,
            "score": round(score, 6) if isinstance(score, float) else score,
        }
    if hasattr(value, "get_content") and hasattr(value, "node_id"):
        text = _node_text(value)
        return {"node_sha": _sha(text) if text is not None else None}
    if name == "QueryBundle":
        return {
            "query_str": value.query_str,
            "custom_embedding_strs": identity_view(value.custom_embedding_strs, depth + 1),
        }
    if hasattr(value, "blocks") and hasattr(value, "role"):
        return message_identity(value)
    # Responses: their text is what matters.
    if name in ("Response", "StreamingResponse", "PydanticResponse"):
        return {"response": str(getattr(value, "response", None))}
    if name == "ChatResponse":
        return {"chat_response": message_identity(value.message)}
    if name == "CompletionResponse":
        return {"completion": value.text}
    dump = getattr(value, "model_dump", None)
    is_component = hasattr(value, "class_name") and hasattr(value, "to_dict")
    if callable(dump) and not is_component:
        try:
            data = dump()
        except Exception:
            return {"__class__": class_path(type(value))}
        return {"__class__": class_path(type(value)), **identity_view(data, depth + 1)}
    # Unknown objects (components, contexts, callables): class only, never repr/id.
    return {"__class__": class_path(type(value))}
