"""With the CLI alone: from `musubi runs` to a RAG run's LLM call, to the retriever call upstream of
it and the documents it returned; then `musubi invalidate` of the LLM node makes the next run send
exactly one request."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from langchain_openai import ChatOpenAI
from test_lc_lineage import _rag

from musubi_langchain import instrument, uninstrument
from tests.support.openai_server import OpenAIServer

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def musubi(db: str, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, *args, "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_walks_from_runs_to_documents_and_invalidates(
    db: str, chat: ChatOpenAI, openai_server: OpenAIServer
) -> None:
    question = "what does musubi store"
    instrument(db)
    chain = _rag(chat)
    answer = chain.invoke(question)
    uninstrument()
    assert openai_server.chat_count == 1

    (run,) = musubi(db, "runs", "--kind", "langchain")
    assert run["status"] == "done" and run["calls"] >= 8
    steps = musubi(db, "steps", run["run_id"][:8])
    (llm,) = [c for c in steps["calls"] if c["kind"] == "chat_model"]
    assert llm["node_id"] and not llm["replayed"] and llm["output_preview"] == answer
    graph = musubi(db, "lineage", llm["call_id"])
    assert graph["root"] == llm["call_id"] and not graph["truncated"]
    kinds = {c["kind"]: c for c in graph["calls"]}
    assert {c["run_id"] for c in graph["calls"]} == {run["run_id"]}
    assert "retriever" in kinds and "musubi stores lineage in sqlite" in json.dumps(graph)
    retriever = musubi(db, "show", kinds["retriever"]["call_id"])
    documents = json.dumps(retriever["value"])
    assert "musubi stores lineage in sqlite" in documents and "bananas" not in documents

    musubi(db, "invalidate", llm["node_id"][:12])
    instrument(db)
    assert chain.invoke(question) == answer  # the model answers the same (fixed rule)
    assert chain.invoke(question) == answer
    uninstrument()
    assert openai_server.chat_count == 2  # exactly one request: the invalidated call, once
