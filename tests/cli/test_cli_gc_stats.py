"""``musubi gc --dry-run / --max-size / --vacuum`` and ``musubi stats``, run as real processes
against stores real programs recorded (LangChain with a fake chat model, durable runs,
``@step``)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000

# A LangChain chain (prompt | model | parser: three chain calls around each model call) asked
# about ten topics twice, so every model call is replayed exactly once; and a durable run of two
# steps run twice, so each step is replayed exactly once.
RECORD = """
import sys
import musubi_langchain
from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from musubi_core import run

db = sys.argv[1]
musubi_langchain.instrument(db)
model = FakeListChatModel(responses=[f"answer {i}" for i in range(100)])
chain = ChatPromptTemplate.from_template("Tell me about {topic}") | model | StrOutputParser()
for _ in range(2):
    for topic in range(10):
        chain.invoke({"topic": f"topic {topic}"})
musubi_langchain.uninstrument()


def workflow(ctx):
    a = ctx.step("a", lambda: 1)
    return ctx.step("b", lambda: a + 1)


for _ in range(2):
    assert run(db, workflow, run_id="job") == 2
"""

# The README's LlamaIndex pipeline: a retriever's documents are kept on its calls only (a
# retriever never replays, so no node refers to them).
LLAMA = """
import sys
from llama_index.core import Document, VectorStoreIndex
from musubi_llama_index import instrument, uninstrument
from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM

llm, embed_model = SlowMockLLM(delay=0.0), SlowMockEmbedding(delay=0.0)
instrument(sys.argv[1], llm=llm, embed_model=embed_model)
index = VectorStoreIndex.from_documents([Document(text="musubi ties knots.")], embed_model=embed_model)
index.as_query_engine(llm=llm).query("What does musubi tie?")
uninstrument()
"""

BLOBS = """
import os, sys
from musubi_core import Engine, SQLiteStore, step, use_engine

@step(name="cli.blob")
def blob(i: int) -> str:
    return os.urandom(15_000).hex()

with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
    for i in range(int(sys.argv[2]), int(sys.argv[3])):
        blob(i)
"""


def env() -> dict[str, str]:
    variables = dict(os.environ, PYTHONPATH=str(ROOT))
    variables.pop("MUSUBI_DB", None)
    return variables


def python(tmp_path: Path, code: str, *args: str) -> None:
    script = tmp_path / f"script_{hashlib.sha256(code.encode()).hexdigest()[:8]}.py"
    script.write_text(textwrap.dedent(code))
    subprocess.run([sys.executable, str(script), *args], check=True, env=env(), cwd=tmp_path,
                   capture_output=True, timeout=300)


def musubi(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", str(db), *args],
        capture_output=True, text=True, timeout=120, env=env(),
    )


def snapshot(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("musubi_nodes", "musubi_artifacts", "musubi_calls", "musubi_runs",
                          "musubi_flows", "musubi_edges", "musubi_run_steps")
        }
    finally:
        conn.close()


# -- stats ------------------------------------------------------------------------------------


def test_stats_replay_rate_counts_replayable_kinds_only(tmp_path: Path) -> None:
    db = tmp_path / "recorded.db"
    python(tmp_path, RECORD, str(db))
    res = musubi(db, "stats", "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    kinds = stats["by_kind"]
    # Ten model calls executed and replayed once each; two durable steps executed and replayed
    # once each: exactly half of the calls that could replay did.
    assert (kinds["chat_model"]["executions"], kinds["chat_model"]["replays"]) == (10, 10)
    assert (kinds["run_step"]["executions"], kinds["run_step"]["replays"]) == (2, 2)
    assert kinds["chat_model"]["replay_rate"] == kinds["run_step"]["replay_rate"] == 0.5
    assert stats["replay_rate"] == 0.5
    assert (stats["executions"], stats["replays"]) == (12, 12)
    # The durable run's own node runs on every invocation: recorded, never replayed, not counted.
    assert kinds["run"]["replayable"] is False and kinds["run"]["replay_rate"] is None
    assert kinds["run"]["executions"] == 2
    # The sixty chain calls are in the record (calls per run kind), not in the rate.
    langchain = stats["runs_by_kind"]["langchain"]
    assert (langchain["runs"], langchain["calls"], langchain["replays"]) == (20, 80, 10)
    assert stats["calls"] == 80 + 4 and stats["call_replays"] == 10 + 2
    text = musubi(db, "stats").stdout
    header = next(line for line in text.splitlines() if line.startswith("kind"))
    assert header.split()[:6] == ["kind", "nodes", "executed", "replayed", "replay", "rate"]
    row = next(line for line in text.splitlines() if line.startswith("chat_model"))
    assert row.split()[1:5] == ["10", "10", "10", "50.0%"]
    assert "recorded only" in next(line for line in text.splitlines() if line.startswith("run "))
    assert "replay rate: 50.0%" in text


# -- gc ---------------------------------------------------------------------------------------


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    db = tmp_path / "blobs.db"
    python(tmp_path, BLOBS, str(db), "0", "100")  # 100 entries of 30 KB: 3 MB
    assert os.path.getsize(db) > 3 * MB
    return db


def test_gc_dry_run_lists_what_would_go_and_removes_nothing(blobs: Path) -> None:
    before, size = snapshot(blobs), os.path.getsize(blobs)
    dry = musubi(blobs, "gc", "--dry-run", "--max-size", "1MB", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["evicted"] == report["nodes"] >= 60
    assert len(report["ids"]["nodes"]) == report["nodes"]
    assert len(report["ids"]["artifacts"]) == report["artifacts"] == report["nodes"]
    assert report["bytes_before"] > 3 * MB and report["bytes_after"] <= MB
    assert snapshot(blobs) == before and os.path.getsize(blobs) == size
    text = musubi(blobs, "gc", "--dry-run", "--max-size", "1MB")
    assert f"would remove {report['nodes']} node(s)" in text.stdout
    assert "nothing was removed" in text.stdout
    assert snapshot(blobs) == before
    # The real run removes exactly what the dry run listed, and the file shrinks with it.
    real = json.loads(musubi(blobs, "gc", "--max-size", "1MB", "--json").stdout)
    assert (real["nodes"], real["artifacts"]) == (report["nodes"], report["artifacts"])
    conn = sqlite3.connect(blobs)
    left = {row[0] for row in conn.execute("SELECT node_id FROM musubi_nodes")}
    conn.close()
    assert left.isdisjoint(report["ids"]["nodes"])
    assert real["bytes_after"] <= MB and os.path.getsize(blobs) <= MB


def test_gc_max_size_on_an_older_file_then_vacuum(blobs: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(blobs, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")  # as files of earlier versions are
    conn.execute("VACUUM")
    conn.close()
    res = musubi(blobs, "gc", "--max-size", "1MB")
    assert res.returncode == 0, res.stderr
    assert "musubi gc --vacuum" in res.stdout  # the space is free inside the file only
    assert os.path.getsize(blobs) > 3 * MB
    vacuumed = musubi(blobs, "gc", "--vacuum", "--json")
    assert vacuumed.returncode == 0, vacuumed.stderr
    assert json.loads(vacuumed.stdout)["file_bytes_after"] <= MB
    assert os.path.getsize(blobs) <= MB


def test_gc_max_size_says_what_it_cannot_evict(tmp_path: Path) -> None:
    db = tmp_path / "tiny.db"
    python(tmp_path, BLOBS, str(db), "0", "3")
    res = musubi(db, "gc", "--max-size", "10KB")
    assert res.returncode == 1
    assert "nothing more can be evicted" in res.stdout and "larger size" in res.stdout


@pytest.mark.parametrize(("size", "says"), [("500M", "500MB"), ("500", "500MB"),
                                            ("2GiB", "2GB"), ("big", "decimal")])
def test_gc_max_size_refuses_ambiguous_sizes(tmp_path: Path, size: str, says: str) -> None:
    db = tmp_path / "s.db"
    python(tmp_path, BLOBS, str(db), "0", "1")
    before = snapshot(db)
    res = musubi(db, "gc", "--max-size", size)
    assert res.returncode == 2 and says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(db) == before


def test_gc_keeps_the_outputs_the_record_refers_to(tmp_path: Path) -> None:
    db = tmp_path / "llama.db"
    python(tmp_path, LLAMA, str(db))
    conn = sqlite3.connect(db)
    (retrieval,) = conn.execute(
        "SELECT call_id, artifact_id FROM musubi_calls WHERE kind = 'retriever' "
        "AND artifact_id IS NOT NULL"
    ).fetchall()
    conn.close()
    gc = musubi(db, "gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["artifacts"] == 0
    shown = json.loads(musubi(db, "show", retrieval[0], "--json").stdout)
    assert shown["value"] is not None and "musubi ties knots" in json.dumps(shown["value"])
    # Once the run is older than the record's age, it goes with the documents only it kept.
    aged = json.loads(musubi(db, "gc", "--older-than", "1ms", "--json").stdout)
    assert aged["runs"] >= 1 and aged["calls"] >= 1
    conn = sqlite3.connect(db)
    left = conn.execute("SELECT COUNT(*) FROM musubi_artifacts WHERE artifact_id = ?",
                        (retrieval[1],)).fetchone()[0]
    conn.close()
    assert left == 0
