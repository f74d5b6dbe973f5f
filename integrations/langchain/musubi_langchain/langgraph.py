"""``MusubiNodeCache``: a LangGraph node-cache backend (``graph.compile(cache=...)``) in the musubi
store.

LangGraph caches a node's *writes* under ``(namespace, key)``: the namespace names the node
(``("__pregel_ns_writes", "module.qualname", "node")``), the key hashes its input. Every entry
is a musubi node (kind ``graph_node``) whose identity also holds the **code fingerprint of the
node's function**, found from the module and qualified name LangGraph puts in the namespace, so
editing a node's body recomputes it with a plain ``CachePolicy()`` (a function musubi cannot
find, e.g. one defined inside another function, is cached by name and input only, and a warning
says so once). Beyond that:

* no pickle: values go through musubi's codec, or LangGraph's msgpack read back by a strict,
  allow-listed decoder (:mod:`._lgvalues`); a value neither can store is not cached (a warning
  names it and the fix);
* ``CachePolicy(ttl=...)`` is the entry's TTL; ``clear(namespaces)`` (``graph.clear_cache()``)
  marks exactly those nodes' entries stale;
* a stored value edited in the file is a miss with one warning (its bytes no longer hash to
  its content id), and the node runs again;
* lineage: a cached node execution is a call (kind ``graph_node``, replayed, with the seconds it
  saved) of the graph's run, under the graph's call, when a :class:`MusubiCallbackHandler`
  records the graph (``instrument()``); an executed one is the node's own call, linked to the
  node it filled. Without a handler, hits are calls of the current musubi run, or of a run of
  the cache's own.

It never raises into LangGraph: a store failure is a miss (or an entry not written) plus one
:class:`~musubi_langchain.MusubiLangChainWarning`.

Example:
    >>> import os, tempfile
    >>> from typing_extensions import TypedDict
    >>> from langgraph.graph import START, StateGraph
    >>> from langgraph.types import CachePolicy
    >>> class State(TypedDict):
    ...     x: int
    >>> def double(state: State) -> State:
    ...     return {"x": state["x"] * 2}
    >>> graph = StateGraph(State)
    >>> _ = graph.add_node("double", double, cache_policy=CachePolicy())
    >>> _ = graph.add_edge(START, "double")
    >>> cache = MusubiNodeCache(os.path.join(tempfile.mkdtemp(), "m.db"))
    >>> app = graph.compile(cache=cache)
    >>> app.invoke({"x": 2}), list(app.stream({"x": 2}))[0]["__metadata__"]
    ({'x': 4}, {'cached': True})
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import _compat  # noqa: F401

try:
    from langgraph.cache.base import BaseCache, FullKey, Namespace
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'musubi_langchain.langgraph needs LangGraph: pip install "musubi-lineage[langgraph]"'
    ) from exc

from musubi_core.engine import Engine, Lookup
from musubi_core.identity import NodeKey, function_fingerprint, resolve_namespace
from musubi_core.policy import StepConfiguration, StepType
from musubi_core.record import current_frame, joinable, new_call_id, preview
from musubi_core.record.ambient import AmbientRun

from . import _correlate
from ._engine import Guard, MusubiLangChainWarning, make_engine
from ._lgvalues import NodeValues, Unstorable
from .handler import MusubiCallbackHandler

_LOOP_TYPES: tuple[type, ...]
try:
    from langgraph.pregel._loop import PregelLoop

    _LOOP_TYPES = (PregelLoop,)
except ImportError:  # pragma: no cover - another LangGraph layout: hits go to the ambient run
    _LOOP_TYPES = ()

__all__ = ["GRAPH_NODE_KIND", "MusubiNodeCache", "node_op_name"]

GRAPH_NODE_KIND = "graph_node"
_WRITES_NS = "__pregel_ns_writes"
_LOOKUP = StepConfiguration(step_type=StepType.STOCHASTIC)  # expiry: the stored one
_KINDS = (GRAPH_NODE_KIND,)


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


def node_op_name(ns: Namespace) -> str:
    """The operation name of a LangGraph namespace's entries (exact: ``clear`` matches it).

    >>> node_op_name(("__pregel_ns_writes", "app.graph.rewrite", "rewrite"))
    'langgraph:app.graph.rewrite/rewrite'
    """
    if ns and ns[0] == _WRITES_NS:
        return "langgraph:" + "/".join(_escape(p) for p in ns[1:])
    return "langgraph-ns:" + "/".join(_escape(p) for p in ns)


def _node_name(ns: Namespace) -> str:
    if ns and ns[0] == _WRITES_NS:
        if len(ns) >= 3:
            return ns[2]
        if len(ns) == 2:  # a @task: its function's name
            return ns[1].rsplit(".", 1)[-1]
    return "/".join(ns) or "langgraph"


def _find(identifier: str) -> Any:
    """The object ``module.qualname`` names in an imported module (never imports), or None."""
    if "<locals>" in identifier or "<lambda>" in identifier:
        return None
    parts = identifier.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for name in parts[i:]:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _code_of(obj: Any) -> Any:
    """The plain function behind a node (a ``@task`` keeps it in ``.func``)."""
    for _ in range(3):
        if callable(obj) and hasattr(obj, "__code__"):
            return obj
        inner = getattr(obj, "func", None)
        if inner is None:
            return None
        obj = inner
    return None


class MusubiNodeCache(BaseCache[Any]):
    """LangGraph ``BaseCache`` over a musubi store (see the module docstring).

    Args:
        path: SQLite file (default: ``$MUSUBI_DB`` or ``.musubi/musubi.db``).
        store, engine: an existing core store or engine instead of ``path``.
        namespace: a separate cache inside the store (default: ``engine``'s, else
            ``"default"``).
        allow: classes (besides musubi's allow-list and LangGraph's safe types) a cached value
            may hold when it is stored with msgpack.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        store: Any | None = None,
        engine: Engine | None = None,
        namespace: str | None = None,
        allow: Iterable[type] = (),
    ) -> None:
        super().__init__()
        self._path, self._store = path, store
        self._namespace = resolve_namespace(namespace, engine.namespace if engine else None)
        self._engine: Engine | None = engine
        self._lock = threading.Lock()
        self._guard = Guard("MusubiNodeCache")
        self._values = NodeValues(allow)
        # (namespace, key) -> monotonic time of the miss: the node's duration, set() records.
        self._misses: dict[FullKey, float] = {}
        # identifier -> (the object it named, its fingerprint or None)
        self._codes: dict[str, tuple[Any, str | None]] = {}
        self._said: set[str] = set()
        self._ambient: AmbientRun | None = None

    @property
    def engine(self) -> Engine:
        """The engine (opened on first use)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine = make_engine(self._path, self._store, self._namespace)
                    if engine.recorder.on_error is None:
                        engine.recorder.on_error = self._guard.warn
                    self._engine = engine
        return self._engine

    # ------------------------------------------------------------------ identity
    def _say_once(self, topic: str, message: str) -> None:
        with self._lock:
            if topic in self._said:
                return
            self._said.add(topic)
        warnings.warn(f"musubi MusubiNodeCache: {message}", MusubiLangChainWarning, stacklevel=4)

    def _fingerprint(self, ns: Namespace) -> dict[str, Any]:
        identifier = ns[1] if len(ns) >= 2 and ns[0] == _WRITES_NS else None
        if identifier is None or identifier == "__dynamic__":
            if identifier is not None:
                self._say_once(
                    "dynamic:" + "/".join(ns),
                    f"node {_node_name(ns)!r} is not a function LangGraph can name, so its "
                    "cache entries do not change when its code does; make it a module-level "
                    "function, or clear its cache (graph.clear_cache) after editing it",
                )
            return {"code": None}
        obj = _find(identifier)
        known = self._codes.get(identifier)
        if known is not None and known[0] is obj:
            return {"code": known[1]}
        fn = _code_of(obj) if obj is not None else None
        fingerprint = function_fingerprint(fn) if fn is not None else None
        if fingerprint is None or fingerprint.startswith("nosource:"):
            fingerprint = None
            self._say_once(
                "unresolved:" + identifier,
                f"cannot read the code of node function {identifier} (defined inside a "
                "function, or its source is not available), so its cache entries do not "
                "change when its code does; define it at module level, or clear its cache "
                "(graph.clear_cache) after editing it",
            )
        self._codes[identifier] = (obj, fingerprint)
        return {"code": fingerprint}

    def node_key(self, ns: Namespace, key: str) -> NodeKey:
        """The musubi node of one LangGraph cache entry."""
        return self.engine.key(
            node_op_name(ns), {"key": key}, fingerprint=self._fingerprint(tuple(ns))
        )

    # ------------------------------------------------------------------ get
    def _get(self, keys: Sequence[FullKey], loop: Any) -> dict[FullKey, Any]:
        engine = self.engine
        tasks = _tasks_by_key(loop) if loop is not None else {}
        found: dict[FullKey, Any] = {}
        for full in keys:
            ns, key = full
            node_key = self.node_key(ns, key)
            got = engine.lookup(node_key, _LOOKUP)
            task = tasks.get((tuple(ns), key))
            if got.replay:
                try:
                    found[full] = self._values.load(got.value)
                except Exception as exc:  # a packed value naming a class it may not build
                    self._say_once(
                        "unreadable",
                        f"a stored output of node {_node_name(ns)!r} cannot be read safely "
                        f"({exc}); it is recomputed (further such entries are recomputed "
                        "without a warning)",
                    )
                else:
                    self._record_hit(ns, node_key, got, found[full], task)
                    continue
            with self._lock:
                if len(self._misses) > 4096:  # nodes that failed never set(): bounded
                    self._misses.clear()
                self._misses[(tuple(ns), key)] = time.monotonic()
            if task is not None and _handler_of(task) is not None:
                _link_miss(task, node_key.node_id)
        return found

    def _record_hit(
        self, ns: Namespace, key: NodeKey, got: Lookup, value: Any, task: Any
    ) -> None:
        """The cached node execution as a replayed call (see the module docstring)."""
        name = _node_name(ns)
        artifact_id, saved_s = got.artifact_id, got.duration_s
        found = _handler_of(task) if task is not None else None
        if found is not None:
            handler, parent_run_id = found
            handler.record_cached(
                parent_run_id,
                GRAPH_NODE_KIND,
                task.name or name,
                task.input,
                value,
                node_id=key.node_id,
                artifact_id=artifact_id,
                saved_s=saved_s,
            )
            return
        fields: dict[str, Any] = {
            "node_id": key.node_id,
            "artifact_id": artifact_id,
            "replayed": True,
            "duration_s": 0.0,
            "saved_s": saved_s,
            "output_preview": preview(value),
        }
        engine = self.engine
        frame = joinable(current_frame(), engine.recorder)
        if frame is not None:
            frame.run.record(new_call_id(), frame.call_id, GRAPH_NODE_KIND, name, **fields)
            return
        with self._lock:
            if self._ambient is None:
                self._ambient = AmbientRun(
                    engine.recorder, "langgraph", "LangGraph node cache", namespace=self._namespace
                )
            ambient = self._ambient
        ambient.record(GRAPH_NODE_KIND, name, **fields)

    # ------------------------------------------------------------------ set / clear
    def _set(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        engine = self.engine
        for (ns, key), (writes, ttl) in pairs.items():
            if ttl is not None and ttl <= 0:
                continue  # expired as soon as written
            with self._lock:
                started = self._misses.pop((tuple(ns), key), None)
            try:
                value = self._values.storable(
                    list(writes) if isinstance(writes, deque) else writes, engine.codec
                )
            except Unstorable as exc:
                self._say_once(
                    "unstorable:" + "/".join(ns),
                    f"the output of node {_node_name(ns)!r} is not cached: {exc}",
                )
                continue
            config = (
                StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=ttl)
                if ttl is not None
                else StepConfiguration()
            )
            engine.record(
                self.node_key(ns, key),
                value,
                config,
                kind=GRAPH_NODE_KIND,
                duration_s=None if started is None else time.monotonic() - started,
                label=_node_name(ns),
            )

    def _clear(self, namespaces: Sequence[Namespace] | None) -> None:
        if namespaces is None:
            self.engine.clear(kinds=_KINDS)
        else:
            self.engine.clear(kinds=_KINDS, ops=[node_op_name(tuple(ns)) for ns in namespaces])

    # ------------------------------------------------------------------ BaseCache
    def get(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        """The stored writes of the entries that replay (a miss is absent)."""
        if not keys:
            return {}
        loop = _calling_loop()
        try:
            return self._get(keys, loop)
        except Exception as exc:  # never break the host: misses plus one warning
            self._guard.warn(exc)
            return {}

    async def aget(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        """Async :meth:`get` (inline: a SQLite probe is faster than a thread hop)."""
        if not keys:
            return {}
        loop = _calling_loop()
        try:
            return self._get(keys, loop)
        except Exception as exc:
            self._guard.warn(exc)
            return {}

    def set(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        """Store each entry's writes (with its TTL in seconds, None: forever)."""
        self._guard.call(lambda: self._set(pairs), None)

    async def aset(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        """Async :meth:`set`."""
        self.set(pairs)

    def clear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        """Mark the entries of ``namespaces`` (every entry of this cache when None) stale: the
        next call of those nodes runs again. Other namespaces keep theirs."""
        self._guard.call(lambda: self._clear(namespaces), None)

    async def aclear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        """Async :meth:`clear`."""
        self.clear(namespaces)

    def flush(self) -> None:
        """Commit what was recorded (the recorder also commits at least every second)."""
        self._guard.call(self.engine.flush, None)


def _calling_loop() -> Any:
    """The Pregel loop asking (``match_cached_writes`` calls the cache): its tasks tell which
    node of which graph run an entry belongs to. None when called from elsewhere."""
    if not _LOOP_TYPES:
        return None
    with contextlib.suppress(Exception):
        frame: Any = sys._getframe(2)
        for _ in range(4):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, _LOOP_TYPES):
                return owner
            frame = frame.f_back
    return None


def _tasks_by_key(loop: Any) -> dict[tuple[Namespace, str], Any]:
    out: dict[tuple[Namespace, str], Any] = {}
    with contextlib.suppress(Exception):
        for task in loop.tasks.values():
            cache_key = task.cache_key
            if cache_key is not None:
                out[(tuple(cache_key.ns), cache_key.key)] = task
    return out


def _handler_of(task: Any) -> tuple[MusubiCallbackHandler, Any] | None:
    """The musubi handler recording the task's graph run, and the graph run's id."""
    with contextlib.suppress(Exception):
        manager = (task.config or {}).get("callbacks")
        for handler in getattr(manager, "handlers", None) or ():
            if isinstance(handler, MusubiCallbackHandler):
                return handler, getattr(manager, "parent_run_id", None)
    return None


def _link_miss(task: Any, node_id: str) -> None:
    """Tell the handler which node the task's run fills (matched by its checkpoint
    namespace, which names the task)."""
    with contextlib.suppress(Exception):
        checkpoint_ns = (task.config or {}).get("metadata", {}).get("langgraph_checkpoint_ns")
        if checkpoint_ns:
            _correlate.expect_node(checkpoint_ns, node_id)
