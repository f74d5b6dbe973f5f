"""MusubiKVStore: BaseKVStore contract, IngestionCache drop-in, embeddings_cache, workers."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from llama_index.core.ingestion import IngestionCache, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter

from musubi_llama_index import MusubiKVStore
from tests.support.openai_server import OpenAIServer

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def test_put_get_delete_collections(db_path: str) -> None:
    kv = MusubiKVStore(db_path)
    kv.put("a", {"x": 1})
    kv.put("a", {"x": 2}, collection="other")
    assert kv.get("a") == {"x": 1}
    assert kv.get("a", collection="other") == {"x": 2}
    assert kv.get("missing") is None
    kv.put_all([("b", {"y": [1, 2]}), ("c", {"z": "w"})])
    assert kv.get_all() == {"a": {"x": 1}, "b": {"y": [1, 2]}, "c": {"z": "w"}}
    assert kv.delete("b") is True
    assert kv.delete("b") is False
    assert kv.get("b") is None
    assert set(kv.get_all()) == {"a", "c"}
    kv.put("b", {"y": 3})  # re-put after delete
    assert kv.get("b") == {"y": 3}
    # A returned dict is a fresh object: mutating it does not change the store.
    got = kv.get("a")
    assert got is not None
    got["x"] = 99
    assert kv.get("a") == {"x": 1}


def test_async_api(db_path: str) -> None:
    kv = MusubiKVStore(db_path)

    async def run() -> Any:
        await kv.aput("k", {"v": 1}, collection="c")
        await kv.aput_all([("k2", {"v": 2})], collection="c")
        got = await kv.aget("k", collection="c")
        everything = await kv.aget_all(collection="c")
        deleted = await kv.adelete("k", collection="c")
        return got, everything, deleted, await kv.aget("k", collection="c")

    assert asyncio.run(run()) == ({"v": 1}, {"k": {"v": 1}, "k2": {"v": 2}}, True, None)


def test_persists_across_instances_and_pickles_by_path(db_path: str) -> None:
    kv = MusubiKVStore(db_path, scope="s1")
    kv.put("k", {"v": 1})
    clone = pickle.loads(pickle.dumps(kv))
    assert clone.path == db_path and clone.get("k") == {"v": 1}
    assert len(pickle.dumps(kv)) < 300  # path and names only, no connection or data
    assert MusubiKVStore(db_path, scope="s1").get("k") == {"v": 1}
    assert MusubiKVStore(db_path, scope="s2").get("k") is None  # scopes are separate


def test_store_failure_degrades_to_miss(tmp_path: Any) -> None:
    bad = tmp_path / "a_directory"
    bad.mkdir()
    kv = MusubiKVStore(str(bad))  # a directory is not a SQLite file
    with pytest.warns(RuntimeWarning, match="musubi"):
        kv.put("k", {"v": 1})
    assert kv.get("k") is None
    assert kv.get_all() == {}


def _pipeline(db_path: str, embed_model: Any, splitter: Any = None) -> IngestionPipeline:
    splitter = splitter or SentenceSplitter(chunk_size=64, chunk_overlap=0)
    return IngestionPipeline(
        transformations=[splitter, embed_model],
        cache=IngestionCache(cache=MusubiKVStore(db_path), collection="ingest"),
    )


def test_ingestion_rerun_makes_zero_embedding_requests(
    openai_server: OpenAIServer, db_path: str, embed_model: Any, documents: list[Any]
) -> None:
    nodes1 = _pipeline(db_path, embed_model).run(documents=documents)
    assert openai_server.count("embeddings") >= 1
    openai_server.clear_log()
    nodes2 = _pipeline(db_path, embed_model).run(documents=documents)
    assert openai_server.count() == 0
    assert [n.get_content() for n in nodes2] == [n.get_content() for n in nodes1]
    assert [n.embedding for n in nodes2] == [n.embedding for n in nodes1]


def test_ingestion_with_two_workers_keeps_cache_writes(
    openai_server: OpenAIServer, db_path: str, embed_model: Any, documents: list[Any]
) -> None:
    # SentenceSplitter does not survive pickling offline (see tests/support/transforms.py).
    from tests.support.transforms import SentenceChunker

    nodes1 = _pipeline(db_path, embed_model, SentenceChunker()).run(
        documents=documents, num_workers=2
    )
    assert openai_server.count("embeddings") >= 2  # both workers embedded their batch
    openai_server.clear_log()
    nodes2 = _pipeline(db_path, embed_model, SentenceChunker()).run(
        documents=documents, num_workers=2
    )
    assert openai_server.count() == 0, openai_server.counts()
    assert sorted(n.get_content() for n in nodes2) == sorted(n.get_content() for n in nodes1)
    assert len(MusubiKVStore(db_path).get_all(collection="ingest")) >= 2
    # (A single-process re-run would miss: IngestionCache keys whole batches, and workers
    # see other batches than one process does; LlamaIndex behaviour, issue #16394.)


def test_as_embeddings_cache(openai_server: OpenAIServer, db_path: str) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    def model() -> Any:
        return OpenAIEmbedding(
            api_base=openai_server.base_url,
            api_key="test",
            embeddings_cache=MusubiKVStore(db_path, scope="text-embedding-ada-002"),
        )

    v1 = model().get_text_embedding_batch(["alpha text", "beta text"])
    assert openai_server.count("embeddings") == 1
    v2 = model().get_text_embedding_batch(["alpha text", "beta text"])
    assert openai_server.count("embeddings") == 1
    assert v2 == v1


# ----------------------------------------------------------------------------- calls
def test_gets_and_puts_are_calls_of_their_nodes(db_path: str) -> None:
    from tests.support import lineage as lin

    kv = MusubiKVStore(db_path, scope="s")
    kv.put("a", {"x": 1})
    kv.put_all([("b", {"y": 2}), ("c", {"z": 3})])
    assert kv.get("a") == {"x": 1}
    assert kv.get("missing") is None
    kv.flush()  # ends the store's own run

    (run,) = lin.runs(db_path, "kv")
    assert run["status"] == "done" and run["name"] == repr(kv)
    calls = lin.calls(db_path, run["run_id"])
    assert [c["op_name"] for c in calls] == ["MusubiKVStore.put"] * 3 + ["MusubiKVStore.get"] * 2
    assert {c["kind"] for c in calls} == {"kv"}
    put_a, _b, _c, get_a, miss = calls
    assert put_a["node_id"] and put_a["replayed"] == 0 and put_a["artifact_id"]
    assert get_a["node_id"] == put_a["node_id"] and get_a["replayed"] == 1
    assert get_a["artifact_id"] == put_a["artifact_id"]
    assert miss["node_id"] is None and miss["output_preview"] == "miss"
    assert run["calls"] == 5 and run["replays"] == 1
    lin.assert_runs_are_trees(db_path)


def test_ingestion_cache_calls_are_under_the_pipeline_span(
    openai_server: OpenAIServer, db_path: str, embed_model: Any, documents: list[Any]
) -> None:
    from musubi_llama_index import instrument, uninstrument
    from tests.support import lineage as lin

    instrument(db_path, embed_model=embed_model)
    _pipeline(db_path, embed_model).run(documents=documents)
    openai_server.clear_log()
    _pipeline(db_path, embed_model).run(documents=documents)
    assert openai_server.count() == 0
    uninstrument()

    lin.assert_runs_are_trees(db_path)
    runs = [r for r in lin.runs(db_path, "llama_index") if r["name"] == "IngestionPipeline.run"]
    assert len(runs) == 2
    for run, hit in zip(runs, (0, 1), strict=True):
        calls = {c["call_id"]: c for c in lin.calls(db_path, run["run_id"])}
        kv = [c for c in calls.values() if c["kind"] == "kv"]
        gets = [c for c in kv if c["op_name"] == "MusubiKVStore.get"]
        assert gets and all(calls[c["parent_call_id"]]["run_id"] == run["run_id"] for c in kv)
        assert {c["replayed"] for c in gets} == {hit}
        puts = [c for c in kv if c["op_name"] == "MusubiKVStore.put"]
        assert (len(puts) > 0) == (hit == 0)  # the second run finds everything
    assert not lin.runs(db_path, "kv")  # no call of the store ran outside a run


def test_kv_calls_inside_a_step_join_its_run(db_path: str) -> None:
    from musubi_core import Engine, step, use_engine
    from musubi_core.store import open_store
    from tests.support import lineage as lin

    kv = MusubiKVStore(db_path)

    @step(name="cached")
    def cached(key: str) -> dict[str, Any]:
        found = kv.get(key)
        if found is None:
            found = {"computed": key}
            kv.put(key, found)
        return found

    with Engine(open_store(db_path)) as engine, use_engine(engine):
        cached("alpha")
    kv.close()
    (run,) = lin.runs(db_path, "step")
    calls = lin.calls(db_path, run["run_id"])
    (step_call,) = [c for c in calls if c["kind"] == "step"]
    kv_calls = [c for c in calls if c["kind"] == "kv"]
    assert [c["op_name"] for c in kv_calls] == ["MusubiKVStore.get", "MusubiKVStore.put"]
    assert all(c["parent_call_id"] == step_call["call_id"] for c in kv_calls)
    assert not lin.runs(db_path, "kv")
