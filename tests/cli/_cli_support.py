"""A store with real runs, built by real processes, and the ``musubi`` command as a subprocess.

``build_store`` runs :data:`APP` twice (run 1 over corpus ``v1``, run 2 over ``v2``: the
retrieved documents differ, the config step replays) and then a durable run. Each run of the
app is one named ``trace`` ("rag") holding a nested ``@step`` pipeline, a recorded-only
retriever call and a loose top-level ``@step`` call (a run of its own, kind ``step``); a trace
that raises gives a failed run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

APP = textwrap.dedent(
    """
    import json, sys
    from musubi_core import Engine, SQLiteStore, run, step, use_engine
    from musubi_core.record import current_frame, new_call_id, trace

    db, corpus = sys.argv[1], sys.argv[2]

    @step(name="rag.config")
    def config() -> dict:
        return {"k": 2}

    @step(name="rag.retrieve")
    def retrieve(cfg, corpus: str) -> list[str]:
        return [f"{corpus} document {i}: the sky is {corpus}-blue" for i in range(cfg.value["k"])]

    @step(name="rag.fmt")
    def fmt(docs) -> str:
        return "\\n".join(docs.value)

    @step(name="rag.prompt")
    def prompt(docs, question: str) -> str:
        return question + "\\n" + fmt(docs).value

    @step(name="rag.answer")
    def answer(text) -> str:
        return "answer from " + str(len(text.value)) + " characters"

    @step(name="rag.pipeline")
    def pipeline(question: str, corpus: str) -> dict:
        cfg = config()
        docs = retrieve(cfg, corpus)
        reply = answer(prompt(docs, question))
        frame = current_frame()
        frame.run.record(
            new_call_id(), frame.call_id, "retriever", "VectorRetriever",
            inputs={"query": question}, output=docs.value,
        )
        return {"answer": reply.value, "answer_call": reply.call_id,
                "retrieve_call": docs.call_id,
                "config_call": cfg.call_id}

    @step(name="rag.loose")
    def loose(n: int) -> int:
        return n + 1

    with Engine(SQLiteStore(db)) as engine, use_engine(engine):
        with trace("rag") as rag:
            out = pipeline("why is the sky blue?", corpus).value
        loose(1)
        try:
            with trace("broken"):
                raise RuntimeError("the broken run")
        except RuntimeError:
            pass
    out["run_id"] = rag.run_id
    print(json.dumps(out))
    """
)

WORKFLOW = textwrap.dedent(
    """
    import sys
    from musubi_core import run

    def nightly(ctx):
        a = ctx.step("fetch", lambda: [1, 2, 3])
        ctx.sleep("pause", "1ms")
        return ctx.step("total", lambda: sum(a))

    print(run(sys.argv[1], nightly, run_id="nightly-1"))
    """
)


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def python(script: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def build_store(folder: Path) -> dict[str, Any]:
    """The store file and what the app runs printed: ``{"db", "run1", "run2"}``."""
    db = folder / "store.db"
    (folder / "app.py").write_text(APP)
    (folder / "workflow.py").write_text(WORKFLOW)
    run1 = json.loads(python(folder / "app.py", str(db), "v1"))
    run2 = json.loads(python(folder / "app.py", str(db), "v2"))
    assert python(folder / "workflow.py", str(db)).strip() == "6"
    return {"db": db, "run1": run1, "run2": run2}


def musubi(db: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "musubi_core.cli"]
    if db is not None:
        argv += ["--db", str(db)]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=120, env=env()
    )


def musubi_json(db: Path, *args: str) -> Any:
    proc = musubi(db, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
