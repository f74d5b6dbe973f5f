"""The offline demo behind ``musubi demo``: a pipeline run twice, the second
run replaying every expensive step from the store."""

from __future__ import annotations

import importlib
import shlex
import time
from typing import TextIO

from ._render import lineage_text
from .decorators import step
from .engine import Engine, use_engine
from .policy import StepConfiguration, StepType
from .result import Result
from .store import SQLiteStore

__all__ = ["run_demo"]

# Stands in for network latency so the replay is visible.
FAKE_LATENCY = 0.3


@step(name="demo.extract_facts")
def extract_facts(text: str) -> list[str]:
    """Pretend LLM call: pull sentences out of a document."""
    time.sleep(FAKE_LATENCY)
    return [s.strip() for s in text.split(".") if s.strip()]


@step(
    name="demo.write_summary",
    semantics=StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=86400),
)
def write_summary(facts: Result[list[str]]) -> str:
    """Pretend LLM call: summarise the facts."""
    time.sleep(FAKE_LATENCY)
    return f"{len(facts.value)} facts; first: {facts.value[0]}"


DOCUMENT = (
    "musubi records every expensive step as a node. Reaching the same node again replays it. "
    "Invalidating a node recomputes only its descendants."
)


def _decorator_demo(engine: Engine, out: TextIO, db: str | None) -> None:
    with use_engine(engine):
        for attempt in (1, 2):
            start = time.perf_counter()
            facts = extract_facts(DOCUMENT)
            summary = write_summary(facts)
            elapsed = time.perf_counter() - start
            states = ", ".join(
                f"{name}={'replayed' if r.replayed else 'executed'}"
                for name, r in (("extract_facts", facts), ("write_summary", summary))
            )
            out.write(f"  run {attempt}: {elapsed:6.3f}s  {states}\n")
        out.write(f"  summary: {summary.value}\n")
        again = f" (`musubi --db {db} lineage {summary.node_id[:12]}`)" if db else ""
        out.write(f"  lineage of the summary{again}:\n")
        engine.flush()
        nodes, edges = engine.store.lineage(summary.node_id)
        for line in lineage_text(summary.node_id, nodes, edges).splitlines():
            out.write(f"    {line}\n")


ADAPTER_DEMOS = (
    ("LangChain", "musubi_langchain._demo", "musubi-lineage[langchain]"),
    ("LlamaIndex", "musubi_llama_index._demo", "musubi-lineage[llama-index]"),
)


def run_demo(db_path: str, out: TextIO, *, kept: bool = True) -> int:
    """Run every demo against ``db_path``; returns a process exit code. Unless
    the store is ``kept`` after the demo exits, it prints no command to run on it."""
    db = shlex.quote(db_path) if kept else None
    shown = db_path if kept else "a temporary file, removed when the demo ends"
    out.write(f"musubi demo (store: {shown})\n\n@step pipeline:\n")
    with Engine(SQLiteStore(db_path)) as engine:
        _decorator_demo(engine, out, db)
    status = 0
    for title, module_name, extra in ADAPTER_DEMOS:
        out.write(f"\n{title}:\n")
        try:
            module = importlib.import_module(module_name)
            demo = module.demo
        except (ImportError, AttributeError):
            out.write(f'  skipped: pip install "{extra}" to include it\n')
            continue
        try:
            demo(db_path, out)
        except Exception as exc:  # a demo failure is reported, not hidden
            out.write(f"  FAILED: {type(exc).__name__}: {exc}\n")
            status = 1
    with SQLiteStore(db_path) as store:
        stats = store.stats()
    out.write(
        f"\nstore totals: {stats['executions']} executions, {stats['replays']} replays, "
        f"{stats['seconds_saved']:.2f}s and {stats['tokens_saved']} tokens saved by replay\n"
    )
    if db:
        out.write(f"explore it: `musubi --db {db} stats` (or lineage, explain, runs)\n")
    else:
        out.write("keep the store to explore it: `musubi demo --db demo.db`\n")
    return status
