"""Namespaces in LangChain: ``MusubiCache(namespace=...)`` and ``instrument(namespace=...)`` are
separate caches in one file, in one process and across processes; ``clear()`` forgets exactly
its own namespace's entries.

Every model here has the same parameters and gets the same prompt, so LangChain hands every
cache the same ``(prompt, llm_string)``: only the namespace tells the entries apart. The model
answers ``RESPONSES[start]`` when it is called, so an answer says whether it executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import FakeListChatModel

import musubi_langchain
from musubi_core import ConfigError, Engine
from musubi_core.store import open_store
from musubi_langchain import MusubiCache
from tests.support.namespace_child import RESPONSES
from tests.support.storedb import execute, rows

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "which answer?"


def _ask(cache: Any, start: int) -> tuple[str, int]:
    """The answer to PROMPT through ``cache`` (None: the global cache) and how many times the
    model ran (0: replayed)."""
    model = FakeListChatModel(responses=RESPONSES, cache=cache)
    model.i = start
    answer = model.invoke(PROMPT).content
    assert isinstance(answer, str)
    return answer, (model.i - start) % len(RESPONSES)  # the model cycles through RESPONSES


def _rows(db: str, sql: str) -> list[tuple[Any, ...]]:
    return rows(db, sql)


def test_two_namespaces_in_one_process_keep_separate_entries(db: str) -> None:
    alpha, beta = MusubiCache(db, namespace="alpha"), MusubiCache(db, namespace="beta")
    assert _ask(alpha, 0) == ("answer 0", 1)
    assert _ask(beta, 1) == ("answer 1", 1)  # not alpha's entry: beta's model runs
    assert _ask(alpha, 2) == ("answer 0", 0)  # alpha's entry was not overwritten
    assert _ask(beta, 2) == ("answer 1", 0)
    # Fresh cache objects (fresh per-process memos) on the same file agree.
    assert _ask(MusubiCache(db, namespace="beta"), 3) == ("answer 1", 0)
    assert _ask(MusubiCache(db, namespace="alpha"), 3) == ("answer 0", 0)
    assert _ask(MusubiCache(db), 3) == ("answer 3", 1)  # the default namespace is one more
    alpha.engine.flush()
    beta.engine.flush()
    namespaces = _rows(db, "SELECT namespace, COUNT(*) FROM musubi_nodes GROUP BY namespace")
    assert dict(namespaces) == {"alpha": 1, "beta": 1, "default": 1}


def _child(db: str, namespace: str, start: int, *extra: str) -> dict[str, Any]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.namespace_child", db, namespace, str(start), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_two_namespaces_across_processes_on_one_file(db: str) -> None:
    assert _child(db, "alpha", 0) == {"answer": "answer 0", "executed": 1}
    assert _child(db, "beta", 1) == {"answer": "answer 1", "executed": 1}
    assert _child(db, "alpha", 2) == {"answer": "answer 0", "executed": 0}
    assert _child(db, "beta", 2) == {"answer": "answer 1", "executed": 0}
    # beta clears its own entry in its process; alpha's, read by this one, stays.
    assert _child(db, "beta", 3, "clear") == {"answer": "answer 3", "executed": 1}
    assert _ask(MusubiCache(db, namespace="alpha"), 2) == ("answer 0", 0)
    assert _ask(MusubiCache(db, namespace="beta"), 0) == ("answer 3", 0)


def test_clear_forgets_exactly_its_own_namespace(db: str) -> None:
    alpha, beta = MusubiCache(db, namespace="alpha"), MusubiCache(db, namespace="beta")
    default = MusubiCache(db)
    _ask(alpha, 0), _ask(beta, 1), _ask(default, 2)
    beta.clear()
    assert _ask(beta, 3) == ("answer 3", 1)
    assert _ask(alpha, 3) == ("answer 0", 0)
    assert _ask(default, 3) == ("answer 2", 0)
    asyncio.run(alpha.aclear())
    assert _ask(alpha, 1) == ("answer 1", 1)
    assert _ask(beta, 0) == ("answer 3", 0)
    assert _ask(default, 0) == ("answer 2", 0)
    default.clear()
    assert _ask(default, 0) == ("answer 0", 1)
    assert _ask(alpha, 0) == ("answer 1", 0) and _ask(beta, 0) == ("answer 3", 0)


def test_instrument_namespace_is_a_separate_cache(db: str) -> None:
    musubi_langchain.instrument(db, namespace="alpha")
    assert _ask(None, 0) == ("answer 0", 1)
    musubi_langchain.instrument(db, namespace="beta")  # switches: a new cache and handler
    assert _ask(None, 1) == ("answer 1", 1)
    assert _ask(None, 2) == ("answer 1", 0)
    musubi_langchain.uninstrument()
    musubi_langchain.instrument(db, namespace="alpha")
    assert _ask(None, 3) == ("answer 0", 0)
    musubi_langchain.uninstrument()
    # The handler recorded each namespace's runs and calls in it, reaching its own nodes.
    calls = _rows(
        db,
        "SELECT c.namespace, n.namespace, c.replayed FROM musubi_calls c "
        "JOIN musubi_nodes n ON n.node_id = c.node_id ORDER BY c.started_at",
    )
    assert calls == [("alpha", "alpha", 0), ("beta", "beta", 0), ("beta", "beta", 1),
                     ("alpha", "alpha", 1)]
    runs = _rows(db, "SELECT namespace, COUNT(*) FROM musubi_runs GROUP BY namespace")
    assert dict(runs) == {"alpha": 2, "beta": 2}


def test_the_namespace_of_a_given_engine_is_used_and_never_contradicted(db: str) -> None:
    engine = Engine(open_store(db), namespace="beta")
    assert _ask(MusubiCache(db, namespace="alpha"), 0) == ("answer 0", 1)
    assert _ask(MusubiCache(engine=engine), 1) == ("answer 1", 1)
    assert _ask(MusubiCache(engine=engine, namespace="beta"), 2) == ("answer 1", 0)
    for make in (
        lambda: MusubiCache(engine=engine, namespace="alpha"),
        lambda: musubi_langchain.MusubiCallbackHandler(engine=engine, namespace="alpha"),
        lambda: musubi_langchain.instrument(engine=engine, namespace="alpha"),
    ):
        with pytest.raises(ConfigError, match=r"namespace='alpha'.*namespace 'beta'"):
            make()
    assert get_llm_cache() is None  # nothing was installed
    inst = musubi_langchain.instrument(engine=engine)
    assert inst.cache is not None and inst.cache.engine.namespace == "beta"
    assert _ask(None, 3) == ("answer 1", 0)
    with pytest.raises(ConfigError, match="empty"):
        MusubiCache(db, namespace="")


def test_an_old_entry_of_another_namespace_is_never_served_by_default(db: str) -> None:
    # Before namespaces entered node ids, alpha's entry sat at the id the default
    # namespace computes. It is alpha's, not the default namespace's.
    old = MusubiCache(db)
    assert _ask(old, 0) == ("answer 0", 1)
    old.engine.close()
    execute(db, "UPDATE musubi_nodes SET namespace = 'alpha'")
    default = MusubiCache(db)
    assert _ask(default, 1) == ("answer 1", 1)
    assert _ask(default, 2) == ("answer 1", 0)  # the recomputed entry is the default's now
    assert _ask(MusubiCache(db), 2) == ("answer 1", 0)
