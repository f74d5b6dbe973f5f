"""LlamaIndex across processes: an embedding made in a ``ProcessPoolExecutor`` worker that
restored the parent's propagation context is a call of the parent's run, under the call that
handed the work over (``IngestionPipeline(num_workers=2)`` hangs on the test machines even
without musubi, so a plain spawned pool is the test)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from llama_index.core.instrumentation import get_dispatcher

from musubi_core import step, use_engine
from musubi_llama_index import instrument, uninstrument
from tests.support import lineage as lin
from tests.support import propagation_worker
from tests.support.openai_server import OpenAIServer

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def test_an_embedding_in_a_worker_process_joins_the_parents_run(
    openai_server: OpenAIServer, db_path: str, embed_model: Any
) -> None:
    inst = instrument(db_path, embed_model=embed_model, use_settings=False)
    engine = inst.runtime.engine()
    handed: dict[str, Any] = {}
    spawn = multiprocessing.get_context("spawn")

    @step(name="ingest")
    def ingest(texts: list[str]) -> list[int]:
        context = get_dispatcher().capture_propagation_context()
        handed.update(context)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            joined = pool.submit(
                propagation_worker.embed, db_path, openai_server.base_url, context, texts[0]
            ).result()
            # The control: the same job without the context records a run of its own.
            alone = pool.submit(
                propagation_worker.embed, db_path, openai_server.base_url, None, texts[1]
            ).result()
        embed_model.get_text_embedding(texts[2])  # and one made here, in the parent
        return [joined, alone]

    with use_engine(engine):
        pids = ingest(["handed to a worker", "made alone in the worker", "made here"]).value
    uninstrument()
    assert os.getpid() not in pids and openai_server.count("embeddings") == 3
    assert "musubi" in handed  # plain data: it crossed a process boundary as a pickle

    lin.assert_runs_are_trees(db_path)
    (run,) = lin.runs(db_path, "step")
    calls = lin.calls(db_path, run["run_id"])
    (step_call,) = [c for c in calls if c["kind"] == "step"]
    def made(text: str, where: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The embedding requests (the calls that reach a node) of ``text``."""
        return [
            c for c in where
            if c["kind"] == "embedding" and c["node_id"] and c["input_preview"] == text
        ]

    (worker_call,) = made("handed to a worker", calls)
    assert worker_call["replayed"] == 0
    # Under the worker's span of the embedding, itself under the step that handed it over.
    (worker_span,) = [c for c in calls if c["call_id"] == worker_call["parent_call_id"]]
    assert worker_span["parent_call_id"] == step_call["call_id"]
    assert len(made("made here", calls)) == 1
    # The job without the context: its embedding is in a run of its own.
    assert made("made alone in the worker", calls) == []
    (elsewhere,) = made("made alone in the worker", lin.calls(db_path))
    assert elsewhere["run_id"] != run["run_id"]


def test_capture_outside_any_run_gives_nothing_to_join(db_path: str, embed_model: Any) -> None:
    instrument(db_path, embed_model=embed_model, use_settings=False)
    assert "musubi" not in get_dispatcher().capture_propagation_context()
