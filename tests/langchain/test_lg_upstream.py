"""LangGraph's own node-cache tests, run against ``MusubiNodeCache``.

The tests are read from ``tests/data/langgraph_upstream/`` (extracted verbatim from
langchain-ai/langgraph, with the commit named in each file, by
``python -m tests.support.vendor_langgraph_tests REPO``), or from a clone of the repository at
``$MUSUBI_LANGGRAPH_REPO`` (a work tree or a bare git directory) when it is set. Each test
function named below is taken from its file with ``ast`` (verbatim, decorators dropped), compiled in a namespace holding that file's imports (those that resolve here), and
called the way its fixtures would call it, with a fresh ``MusubiNodeCache`` as ``cache``:

* ``libs/langgraph/tests/test_pregel.py`` and ``test_pregel_async.py``: every test that takes
  the ``cache`` fixture (a graph with a ``CachePolicy`` node, ``clear_cache``; a functional
  ``@task`` cached across interrupts and threads, ``task.clear_cache``);
* ``libs/checkpoint/tests/test_redis_cache.py``: the backend contract of ``TestRedisCache``
  (get/set, batches, TTL, namespace isolation, clear all / by namespace, empty and missing
  keys, odd namespaces, large values, the async forms), with ``RedisCache(client, prefix=...)``
  standing for a new ``MusubiNodeCache`` and a stand-in Redis client. Left out: the three
  tests of an unreachable Redis server and the one that writes a malformed Redis key (its
  property, a damaged entry is a miss, is ``test_lg_cache``'s tamper test).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph.cache.base")
from langgraph.checkpoint.memory import InMemorySaver

from musubi_langchain import MusubiLangChainWarning
from musubi_langchain.langgraph import MusubiNodeCache
from tests.support.postgres import fresh_database

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


@pytest.fixture
def new_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Makes a new, empty store each call: a SQLite file, or a fresh PostgreSQL database."""
    made: list[str] = []

    def make() -> str:
        if backend == "postgresql":
            made.append(fresh_database(request.getfixturevalue("pg_dsn")))
        else:
            made.append(str(tmp_path / f"musubi-{len(made)}.db"))
        return made[-1]

    return make

VENDORED = Path(__file__).resolve().parents[1] / "data" / "langgraph_upstream"
PREGEL = "libs/langgraph/tests/test_pregel.py"
PREGEL_ASYNC = "libs/langgraph/tests/test_pregel_async.py"
REDIS = "libs/checkpoint/tests/test_redis_cache.py"

CACHE_TESTS = [
    (PREGEL, "test_in_one_fan_out_state_graph_waiting_edge_multiple", {"with_cache": True}),
    (PREGEL, "test_in_one_fan_out_state_graph_waiting_edge_multiple", {"with_cache": False}),
    (PREGEL, "test_multiple_interrupts_functional_cache", {}),
    (PREGEL_ASYNC, "test_in_one_fan_out_state_graph_waiting_edge_multiple", {"with_cache": True}),
    (PREGEL_ASYNC, "test_in_one_fan_out_state_graph_waiting_edge_multiple", {"with_cache": False}),
    (PREGEL_ASYNC, "test_multiple_interrupts_functional_cache", {}),
]
BACKEND_TESTS = [
    "test_basic_set_and_get",
    "test_batch_operations",
    "test_ttl_behavior",
    "test_namespace_isolation",
    "test_clear_all",
    "test_clear_by_namespace",
    "test_empty_operations",
    "test_nonexistent_keys",
    "test_key_parsing_edge_cases",
    "test_large_data_serialization",
    "test_async_operations",
    "test_async_clear",
]


def _source(rel: str) -> str:
    clone = os.environ.get("MUSUBI_LANGGRAPH_REPO")
    if not clone:
        return (VENDORED / f"{Path(rel).name}.txt").read_text(encoding="utf-8")
    repo = Path(clone)
    if (repo / rel).is_file():
        return (repo / rel).read_text(encoding="utf-8")
    shown = subprocess.run(
        ["git", f"--git-dir={repo}", "show", f"HEAD:{rel}"],
        capture_output=True, text=True, check=False,
    )
    if shown.returncode != 0:
        pytest.fail(f"{rel} is not in {repo}: {shown.stderr.strip()}")
    return shown.stdout


def _namespace(tree: ast.Module, rel: str) -> dict[str, Any]:
    """The file's top-level imports, each one that resolves here, as the namespace of a module
    registered in ``sys.modules`` (``get_type_hints`` resolves a TypedDict's annotations
    there)."""
    module = types.ModuleType(f"langgraph_upstream_{Path(rel).stem}")
    sys.modules[module.__name__] = module
    ns: dict[str, Any] = module.__dict__
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            code = compile(ast.Module(body=[stmt], type_ignores=[]), rel, "exec", dont_inherit=True)
            try:
                exec(code, ns)
            except Exception:
                continue  # their test helpers, redis, syrupy ...: not what these tests use
    return ns


def _function(rel: str, name: str, cls: str | None = None) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The test function ``name`` (a method of ``cls``) of ``rel``, compiled verbatim."""
    tree = ast.parse(_source(rel))
    ns = _namespace(tree, rel)
    body = tree.body
    if cls is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(
        (n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name),
        None,
    )
    if node is None:
        pytest.fail(f"{rel} has no test {name} any more: update this list")
    marks = {ast.unparse(d) for d in node.decorator_list}
    if "NEEDS_CONTEXTVARS" in marks and sys.version_info < (3, 11):
        # LangGraph skips it there too: its asyncio tasks carry the run's context only on 3.11+.
        pytest.skip("LangGraph marks this test NEEDS_CONTEXTVARS (Python 3.11+)")
    node.decorator_list = []
    exec(compile(ast.Module(body=[node], type_ignores=[]), rel, "exec", dont_inherit=True), ns)
    return ns[name], ns


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    if inspect.iscoroutinefunction(fn):
        asyncio.run(fn(*args, **kwargs))
    else:
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    ("rel", "name", "params"),
    CACHE_TESTS,
    ids=[f"{Path(r).stem}::{n}{''.join(f'[{v}]' for v in p.values())}" for r, n, p in CACHE_TESTS],
)
def test_langgraph_cache_tests_pass_against_musubi(
    rel: str, name: str, params: dict[str, Any], new_store: Callable[[], str]
) -> None:
    fn, _ = _function(rel, name)
    cache = MusubiNodeCache(new_store())
    args: dict[str, Any] = {"cache": cache, **params}
    wanted = inspect.signature(fn).parameters
    for fixture in ("sync_checkpointer", "async_checkpointer"):
        if fixture in wanted:
            args[fixture] = InMemorySaver()
    with warnings.catch_warnings():
        # Their nodes are defined inside the test functions: musubi says once that it
        # cannot fingerprint them, and caches them by name and input.
        warnings.simplefilter("ignore", MusubiLangChainWarning)
        _call(fn, **args)
    cache.flush()
    stored = cache.engine.store.list_nodes(kind="graph_node")
    cache.engine.close()
    assert bool(stored) is (params.get("with_cache", True)), "the backend was not used"


class _StandInRedis:
    """What the tests do with their Redis client besides the cache: ping and flush."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ping(self) -> bool:
        return True

    def flushdb(self) -> None:
        return None


@pytest.mark.parametrize("name", BACKEND_TESTS)
def test_langgraph_backend_contract_against_musubi(
    name: str, new_store: Callable[[], str]
) -> None:
    fn, ns = _function(REDIS, name, cls="TestRedisCache")
    made = []

    def redis_cache(client: Any, prefix: str = "") -> MusubiNodeCache:
        made.append(MusubiNodeCache(new_store()))
        return made[-1]

    ns["RedisCache"] = redis_cache
    ns["redis"] = types.SimpleNamespace(Redis=_StandInRedis, ConnectionError=ConnectionError)
    case = types.SimpleNamespace(client=_StandInRedis(), cache=redis_cache(None))
    try:
        _call(fn, case)
    finally:
        for cache in made:
            cache.engine.close()
    assert made, "the backend was not used"
