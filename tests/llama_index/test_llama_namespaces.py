"""Namespaces in LlamaIndex: ``instrument(namespace=...)`` and ``MusubiKVStore(namespace=...)``
are separate caches in one file: nothing recorded in one namespace replays in another."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from musubi_core import ConfigError, Engine, use_engine
from musubi_core.store import open_store
from musubi_llama_index import MusubiKVStore, instrument, uninstrument
from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM
from tests.support.storedb import rows

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _node_namespaces(db: str) -> dict[str, int]:
    return dict(rows(db, "SELECT namespace, COUNT(*) FROM musubi_nodes GROUP BY 1"))


def _use(namespace: str | None, db: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Fresh models instrumented in ``namespace``, each asked the same things once."""
    llm, embed = SlowMockLLM(delay=0.0), SlowMockEmbedding(delay=0.0)
    instrument(db, llm=llm, embed_model=embed, namespace=namespace, use_settings=False, **kwargs)
    llm.complete("What does musubi tie?")
    embed.get_text_embedding("a knot")
    uninstrument()
    return llm.calls, embed.calls


def test_instrument_namespace_is_a_separate_cache(db_path: str) -> None:
    assert _use("alpha", db_path) == (1, 1)
    assert _use("beta", db_path) == (1, 1)  # nothing of alpha's replays in beta
    assert _use("beta", db_path) == (0, 0)
    assert _use("alpha", db_path) == (0, 0)
    assert _use(None, db_path) == (1, 1)  # the default namespace is another one
    assert _node_namespaces(db_path) == {"alpha": 2, "beta": 2, "default": 2}


def test_instrument_without_a_path_uses_the_context_store_in_its_namespace(db_path: str) -> None:
    with Engine(open_store(db_path)) as engine, use_engine(engine):
        assert _use(None) == (1, 1)
        assert _use("beta") == (1, 1)  # the context engine's store, seen in namespace beta
        assert _use("beta") == (0, 0)
        assert _use(None) == (0, 0)
    assert _node_namespaces(db_path) == {"beta": 2, "default": 2}


def test_instrument_takes_a_given_engine_namespace_and_refuses_another(db_path: str) -> None:
    engine = Engine(open_store(db_path), namespace="beta")
    with pytest.raises(ConfigError, match=r"namespace='alpha'.*namespace 'beta'"):
        instrument(engine=engine, namespace="alpha")
    assert _use("alpha", db_path) == (1, 1)
    assert _use(None, engine=engine) == (1, 1)
    assert _use("beta", engine=engine) == (0, 0)
    engine.close()
    assert _node_namespaces(db_path) == {"alpha": 2, "beta": 2}


def test_instrument_again_in_another_namespace_warns_and_keeps_the_first(db_path: str) -> None:
    llm = SlowMockLLM(delay=0.0)
    instrument(db_path, llm=llm, namespace="alpha", use_settings=False)
    with pytest.warns(RuntimeWarning, match="keeping its store and namespace"):
        instrument(db_path, namespace="beta", use_settings=False)
    llm.complete("q")
    uninstrument()
    assert _node_namespaces(db_path) == {"alpha": 1}


def test_kvstore_namespaces_are_separate(db_path: str) -> None:
    alpha = MusubiKVStore(db_path, namespace="alpha")
    beta = MusubiKVStore(db_path, namespace="beta")
    alpha.put("k", {"v": "alpha"}, collection="c")
    alpha.put("only-alpha", {"v": 1}, collection="c")
    assert beta.get("k", collection="c") is None
    assert beta.get_all(collection="c") == {}
    assert beta.delete("k", collection="c") is False
    beta.put("k", {"v": "beta"}, collection="c")
    assert alpha.get("k", collection="c") == {"v": "alpha"}
    assert beta.get("k", collection="c") == {"v": "beta"}
    assert alpha.get_all(collection="c") == {"k": {"v": "alpha"}, "only-alpha": {"v": 1}}
    assert beta.get_all(collection="c") == {"k": {"v": "beta"}}
    assert beta.delete("k", collection="c") is True
    assert alpha.get("k", collection="c") == {"v": "alpha"}
    assert MusubiKVStore(db_path).get_all(collection="c") == {}
    # A pickled store (an ingestion worker) keeps its namespace.
    clone = pickle.loads(pickle.dumps(beta))
    assert clone.namespace == "beta" and clone.get("only-alpha", collection="c") is None
    assert "namespace='beta'" in repr(beta) and "namespace=" not in repr(MusubiKVStore(db_path))
    with pytest.raises(ConfigError, match="empty"):
        MusubiKVStore(db_path, namespace="")
