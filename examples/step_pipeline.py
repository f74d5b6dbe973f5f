"""A two-step pipeline with @step: run it twice and the second run replays.

    python examples/step_pipeline.py
"""

from __future__ import annotations

import os
import tempfile
import time

from musubi_core import Engine, Result, SQLiteStore, StepConfiguration, StepType, step, use_engine


@step
def extract_facts(text: str) -> list[str]:
    time.sleep(0.3)  # stands in for an LLM call
    return [s.strip() for s in text.split(".") if s.strip()]


@step(semantics=StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600))
def summarize(facts: Result[list[str]]) -> str:
    time.sleep(0.3)
    return f"{len(facts.value)} facts, starting with: {facts.value[0]}"


def main() -> None:
    path = os.environ.get("MUSUBI_DB") or os.path.join(tempfile.mkdtemp(), "musubi.db")
    text = "Steps become nodes. Nodes replay. Invalidation recomputes descendants."
    with Engine(SQLiteStore(path)) as engine, use_engine(engine):
        for attempt in (1, 2):
            start = time.perf_counter()
            summary = summarize(extract_facts(text))
            print(f"run {attempt}: {time.perf_counter() - start:.2f}s replayed={summary.replayed}")
        print(summary.value)
        print(f"try: musubi --db {path} lineage {summary.node_id[:12]}")


if __name__ == "__main__":
    main()
