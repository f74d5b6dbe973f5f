"""A replay miss that explains itself: the call, the nearest recording, and what differs.

Every replayable call records, beside its output, the *material* its identity was made from
(:func:`material`): the canonical inputs (the tree the input hash is taken of: prompt messages,
call parameters, a step's arguments) and, for model calls, the model parameters (the
fingerprint). It is kept in the node's ``meta`` as ``{"inputs": ..., "fingerprint": ...}``:

* never secrets: the adapters leave credentials out of identity, a value under a key that
  names one (``api_key``, ``password``, ``authorization``, ``secret``, ...) is replaced by
  ``{"$redacted": true}``, and the ``user:password@`` of a URL by ``<redacted>@``;
* bounded: a string longer than :data:`MAX_TEXT` characters keeps its head and tail and its
  SHA-256, a list its first :data:`MAX_ITEMS` items.

When replay mode misses, :func:`miss_error` finds the recorded node of the same operation
whose material is closest to the call's and lists the differences, one line each::

    messages[0].content: "...Answer in one sentence..." -> "...Answer in two sentences..."
    fingerprint params.temperature: 0.0 -> 0.2
    code of app.summarize changed

>>> old = material({"messages": [{"content": "Answer in one sentence."}]})
>>> new = material({"messages": [{"content": "Answer in two sentences."}]})
>>> differences(old, new)
['messages[0].content: "Answer in one sentence." -> "Answer in two sentences."']
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import difflib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._plain import NOT_PLAIN, plain_tree
from ._tagged import encode
from .errors import ReplayMissError
from .identity import INPUT_MAX_DEPTH, NodeKey
from .policy import Decision, ReplayReason

if TYPE_CHECKING:
    from .engine import Engine
    from .store import NodeRecord

__all__ = [
    "MAX_ITEMS",
    "MAX_TEXT",
    "clear_misses",
    "differences",
    "material",
    "miss_error",
    "prefer_nodes",
    "recent_misses",
    "stored_material",
]

MAX_TEXT = 4096  # characters of a string kept whole
MAX_ITEMS = 256  # items of a list kept
MAX_LINES = 12  # differences listed in a message
CANDIDATES = 200  # recorded nodes of the operation compared with a missed call
_EXCERPT = 36  # characters of context around a change in a string

_SECRET_PARTS = (
    "api_key",
    "apikey",
    "api-key",
    "secret",
    "password",
    "passwd",
    "authorization",
    "credential",
    "cookie",
    "access_token",
    "auth_token",
    "refresh_token",
    "bearer",
    "private_key",
)
_SECRET_NAMES = frozenset({"token", "key", "auth", "pwd"})

# The misses raised in this process, newest last (the pytest plugin counts them).
_MISSES: collections.deque[ReplayMissError] = collections.deque(maxlen=1000)

# Recordings to compare a miss with first (the pytest plugin: what the same test reached the
# last time it ran), as a function called only when a miss happens.
_PREFERRED: ContextVar[Callable[[], set[str]] | None] = ContextVar(
    "musubi_preferred_nodes", default=None
)


@contextlib.contextmanager
def prefer_nodes(nodes: Callable[[], set[str]]) -> Iterator[None]:
    """Inside the block, a miss compares the call with the recordings ``nodes()`` names before
    any other of its operation (the same call site, recorded earlier)."""
    token = _PREFERRED.set(nodes)
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def _preferred() -> set[str]:
    nodes = _PREFERRED.get()
    if nodes is None:
        return set()
    try:
        return nodes()
    except Exception:  # a hint, never a failure
        return set()


def recent_misses() -> list[ReplayMissError]:
    """The :class:`ReplayMissError` s made in this process (at most the last 1000)."""
    return list(_MISSES)


def clear_misses() -> None:
    _MISSES.clear()


# -- the material ---------------------------------------------------------------------


def _secret(name: str) -> bool:
    low = name.lower()
    return low in _SECRET_NAMES or any(part in low for part in _SECRET_PARTS)


def _result_hook(value: Any) -> Any:
    from .result import Result

    if type(value) is Result:
        return {"$result": value.artifact_id}
    return NotImplemented


def _tree(value: Any) -> Any:
    """The canonical tagged tree of ``value`` (what its input hash is taken of)."""
    plain = plain_tree(value)
    if plain is not NOT_PLAIN:
        return plain
    return encode(value, canonical=True, hook=_result_hook, max_depth=INPUT_MAX_DEPTH)


# ``scheme://user:password@host``: the credentials part of a URL (a proxy, a base URL).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def _bounded(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        if "://" in value and "@" in value:
            value = _URL_CREDENTIALS.sub("<redacted>@", value)
        if len(value) <= MAX_TEXT:
            return value
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return {
            "$text": value[: MAX_TEXT // 2],
            "$tail": value[-MAX_TEXT // 4 :],
            "$len": len(value),
            "$sha256": digest,
        }
    if isinstance(value, list):
        items = [_bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append({"$more": len(value) - MAX_ITEMS})
        return items
    if isinstance(value, dict):
        if depth > 40:
            text = json.dumps(value, sort_keys=True, default=str)
            return {"$sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}
        return {
            k: ({"$redacted": True} if _secret(k) else _bounded(v, depth + 1))
            for k, v in value.items()
        }
    return value


def material(inputs: Any, fingerprint: Any = None) -> dict[str, Any]:
    """What a recorded node keeps to explain a later miss: its canonical inputs (and the model
    parameters, ``fingerprint``), redacted and bounded (see the module docstring). Never
    raises: a value that cannot be walked is kept as ``{"$unavailable": ...}``."""
    out: dict[str, Any] = {}
    for name, value in (("inputs", inputs), ("fingerprint", fingerprint)):
        if value is None and name == "fingerprint":
            continue
        try:
            out[name] = _bounded(_tree(value))
        except Exception as exc:  # a guest value: the miss message says less, nothing fails
            out[name] = {"$unavailable": type(exc).__name__}
    return out


def stored_material(node: NodeRecord) -> dict[str, Any] | None:
    """The material kept in ``node.meta``, if any."""
    if not node.meta:
        return None
    try:
        meta = json.loads(node.meta)
    except ValueError:
        return None
    if not isinstance(meta, dict) or "inputs" not in meta:
        return None
    return {k: meta[k] for k in ("inputs", "fingerprint") if k in meta}


# -- differences ----------------------------------------------------------------------


def _is_leaf(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(k.startswith("$") for k in value) and "$tuple" not in value
    return not isinstance(value, list)


def _flatten(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and set(value) == {"$tuple"}:
        value = value["$tuple"]
    if _is_leaf(value):
        yield path, value
        return
    if isinstance(value, list):
        if not value:
            yield path, value
        for i, item in enumerate(value):
            yield from _flatten(item, f"{path}[{i}]")
        return
    if not value:
        yield path, value
    for key, item in value.items():
        yield from _flatten(item, f"{path}.{key}" if path else key)


def _show(value: Any) -> str:
    """A leaf as a person reads it."""
    if isinstance(value, dict):
        if "$float" in value:
            return str(value["$float"])
        if "$result" in value:
            return f"<output {str(value['$result'])[:12]}>"
        if value.get("$redacted"):
            return "<redacted>"
        if "$text" in value:
            return _quote(f"{value['$text'][:60]}...({value.get('$len')} chars)")
    if isinstance(value, str):
        return _quote(value if len(value) <= 2 * _EXCERPT + 40 else value[: 2 * _EXCERPT] + "...")
    return json.dumps(value, ensure_ascii=False, default=str)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "$text" in value:
        return f"{value['$text']}...{value.get('$tail', '')}"
    return None


def _excerpts(old: str, new: str) -> tuple[str, str]:
    """The changed part of two strings with a little context on each side (short strings
    whole)."""
    if len(old) <= 2 * _EXCERPT + 40 and len(new) <= 2 * _EXCERPT + 40:
        return _quote(old), _quote(new)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    changed = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    if not changed:
        return _quote(old), _quote(new)
    a0, a1 = changed[0][1], changed[-1][2]
    b0, b1 = changed[0][3], changed[-1][4]
    start_a, start_b = max(0, a0 - _EXCERPT), max(0, b0 - _EXCERPT)
    end_a, end_b = min(len(old), a1 + _EXCERPT), min(len(new), b1 + _EXCERPT)

    def cut(text: str, start: int, end: int) -> str:
        # Whole words at both ends (within a few characters).
        for _ in range(16):
            if start <= 0 or text[start - 1].isspace():
                break
            start -= 1
        for _ in range(16):
            if end >= len(text) or text[end].isspace():
                break
            end += 1
        body = text[start:end]
        if len(body) > 4 * _EXCERPT + 80:
            body = body[: 2 * _EXCERPT + 40] + "..." + body[-(2 * _EXCERPT + 40) :]
        return _quote(("..." if start else "") + body + ("..." if end < len(text) else ""))

    return cut(old, start_a, end_a), cut(new, start_b, end_b)


def _line(path: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and "$result" in old and "$result" in new:
        return f"{path}: upstream changed ({_show(old)} -> {_show(new)})"
    old_text, new_text = _text_of(old), _text_of(new)
    if old_text is not None and new_text is not None:
        if old_text == new_text:  # both cut: the change is in the part not kept
            return f"{path}: text changed (beyond the {MAX_TEXT} characters kept)"
        shown_old, shown_new = _excerpts(old_text, new_text)
        return f"{path}: {shown_old} -> {shown_new}"
    return f"{path}: {_show(old)} -> {_show(new)}"


def _leaves(tree: Any) -> dict[str, Any]:
    """Path -> leaf; an empty container is a leaf only where nothing lies below its path on
    the other side (see :func:`_compare`)."""
    return dict(_flatten(tree))


def _under(path: str, paths: dict[str, Any]) -> bool:
    return any(p != path and (p.startswith(path + ".") or p.startswith(path + "[")) for p in paths)


def _cost(old: Any, new: Any) -> float:
    """How different two leaves are: 1, plus up to 1 more for how much of a text changed
    (the part outside their common head and tail: linear, so hundreds of recordings of long
    prompts are compared in milliseconds)."""
    old_text, new_text = _text_of(old), _text_of(new)
    if old_text is None or new_text is None:
        return 2.0
    longest = max(len(old_text), len(new_text)) or 1
    head = _common_head(old_text, new_text)
    tail = _common_head(old_text[head:][::-1], new_text[head:][::-1])
    return 2.0 - (head + tail) / longest


def _common_head(a: str, b: str) -> int:
    """How many leading characters two strings share (a binary search of C comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _compare(
    old: Any, new: Any, prefix: str = "", *, describe: bool = True
) -> tuple[list[str], float]:
    """The lines (with ``describe``) and the cost of what differs between two trees."""
    before, after = _leaves(old), _leaves(new)
    lines: list[str] = []
    cost = 0.0

    def name(path: str) -> str:
        return f"{prefix}{path}" if path else (prefix.strip() or "value")

    for path, value in after.items():
        if path not in before:
            if value in ({}, []) and _under(path, before):
                continue
            lines.append(f"{name(path)}: added {_show(value)}")
            cost += 2.0
        elif before[path] != value:
            if describe:
                lines.append(_line(name(path), before[path], value))
            else:
                lines.append(name(path))
            cost += _cost(before[path], value)
    for path, value in before.items():
        if path not in after:
            if value in ({}, []) and _under(path, after):
                continue
            lines.append(f"{name(path)}: removed (was {_show(value)})")
            cost += 2.0
    return lines, cost


def _differ(
    old: dict[str, Any] | None, new: dict[str, Any] | None, *, describe: bool = True
) -> tuple[list[str], float]:
    if old is None or new is None:
        return [], 0.0
    lines, cost = _compare(old.get("inputs"), new.get("inputs"), describe=describe)
    if "fingerprint" in old or "fingerprint" in new:
        more, extra = _compare(
            old.get("fingerprint"), new.get("fingerprint"), "model ", describe=describe
        )
        lines += more
        cost += extra
    return lines, cost


def differences(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """What differs between two materials (recorded ``old``, current ``new``), one line each:
    the inputs first, then the model parameters (prefixed ``model``)."""
    return _differ(old, new)[0]


# -- the error ------------------------------------------------------------------------


def _when(node: NodeRecord) -> str:
    stamp = node.finished_at or node.created_at
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _nearest(
    engine: Engine, key: NodeKey, current: dict[str, Any] | None
) -> tuple[NodeRecord, list[str]] | None:
    """The recorded node of ``key``'s operation closest to the call, and what differs: the
    newest :data:`CANDIDATES` recordings of the operation, and those the same call site
    reached before (:func:`prefer_nodes`), scored cheaply; the best one described."""
    store = engine.store
    found = store.list_nodes(
        limit=CANDIDATES, op=key.op_name, status="done", namespace=engine.namespace
    )
    preferred = _preferred()
    known_ids = {n.node_id for n in found}
    for node_id in preferred - known_ids:
        node = store.get_node(node_id)
        if node is not None and node.status == "done" and node.namespace == engine.namespace:
            found.append(node)
    candidates = [n for n in found if n.op_name == key.op_name and n.node_id != key.node_id]
    best: tuple[tuple[int, int, float, float], NodeRecord, dict[str, Any] | None] | None = None
    for node in candidates:
        recorded = stored_material(node)
        cost = _differ(recorded, current, describe=False)[1]
        cost += 2.0 if node.op != key.op else 0.0
        cost += 2.0 if node.input_hash == key.input_hash and node.op == key.op else 0.0
        known = recorded is not None and current is not None
        mine = 0 if node.node_id in preferred else 1
        score = (0 if known else 1, mine, cost, -(node.finished_at or node.created_at))
        if best is None or score < best[0]:
            best = (score, node, recorded)
    if best is None:
        return None
    node, recorded = best[1], best[2]
    lines = _differ(recorded, current)[0]
    if node.op != key.op and not any(line.startswith("model ") for line in lines):
        lines.append(_code_line(node, key))
    if node.input_hash == key.input_hash and node.op == key.op:
        lines.append(_upstream_line(engine, node, key))
    return node, lines


def _code_line(node: NodeRecord, key: NodeKey) -> str:
    if node.kind in ("step", "run_step"):
        return f"code of {key.op_name} changed (or its version= pin)"
    return "model parameters changed"


def _upstream_line(engine: Engine, node: NodeRecord, key: NodeKey) -> str:
    try:
        before = sorted(p.parent[:12] for p in engine.store.data_parents(node.node_id))
    except Exception:
        before = []
    now = sorted(u[:12] for u in key.upstream)
    return (
        f"upstream changed: recorded from {', '.join(before) or 'no upstream node'}, "
        f"now from {', '.join(now) or 'no upstream node'}"
    )


def miss_error(
    engine: Engine,
    key: NodeKey,
    decision: Decision,
    *,
    kind: str,
    model: str | None = None,
    material_of: Callable[[], dict[str, Any] | None] | None = None,
) -> ReplayMissError:
    """The :class:`ReplayMissError` for a call of ``key`` that did not replay
    (``decision``, from the lookup), with the nearest recording and what differs.
    ``material_of`` returns the call's :func:`material` (only called here, on a miss)."""
    current = None
    if material_of is not None:
        try:
            current = material_of()
        except Exception:
            current = None
    what = f"{kind} call {key.op_name}" + (f" (model {model})" if model else "")
    nothing = "nothing was run" if kind in ("step", "run_step") else "nothing was sent to the provider"
    head = (
        f"replay mode: no recording to replay for the {what} in {engine.store.path} "
        f"(namespace {engine.namespace}); {nothing}"
    )
    lines = [head, f"  call: node {key.node_id[:12]}: {decision.reason.value} ({decision.detail})"]
    nearest_id: str | None = None
    diffs: list[str] = []
    try:
        found = _nearest(engine, key, current) if decision.reason is not ReplayReason.HIT else None
    except Exception as exc:  # the store could not say: the error still names the call
        found = None
        lines.append(f"  (the nearest recording could not be read: {type(exc).__name__}: {exc})")
    if found is not None:
        node, diffs = found
        nearest_id = node.node_id
        lines.append(
            f"  nearest recording: node {node.node_id[:12]} of {node.op_name}, recorded "
            f"{_when(node)}; what differs:"
        )
        shown = diffs[:MAX_LINES] or ["(nothing musubi kept tells them apart)"]
        lines += [f"    {d}" for d in shown]
        if len(diffs) > MAX_LINES:
            lines.append(f"    ... and {len(diffs) - MAX_LINES} more")
    elif decision.reason in (ReplayReason.NOT_FOUND, ReplayReason.INPUT_CHANGED):
        lines.append(f"  no call of {key.op_name} was recorded in this store and namespace")
    lines.append(
        "  to record it: run once in refresh mode (pytest --musubi-mode=refresh, "
        'MUSUBI_MODE=refresh or mode="refresh"), with the provider reachable'
    )
    error = ReplayMissError(
        "\n".join(lines),
        kind=kind,
        op_name=key.op_name,
        node_id=key.node_id,
        reason=decision.reason.value,
        model=model,
        nearest_node_id=nearest_id,
        differences=diffs,
        store=engine.store.path,
    )
    _MISSES.append(error)
    return error


def store_failure_error(
    *, kind: str, op_name: str, node_id: str | None, store: str | None, error: BaseException
) -> ReplayMissError:
    """Replay mode, and the store could not be read: a :class:`ReplayMissError` too (the call
    must not reach the provider), naming the store's error."""
    where = store or "the store"
    result = ReplayMissError(
        f"replay mode: {where} could not be read for the {kind} call {op_name} "
        f"({type(error).__name__}: {error}); nothing was sent to the provider",
        kind=kind,
        op_name=op_name,
        node_id=node_id or "",
        reason="store_error",
        store=store,
    )
    _MISSES.append(result)
    return result
