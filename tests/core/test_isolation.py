"""The core imports and runs with every LLM framework (and pytest) made
unimportable: it never imports langchain or llama_index."""

from __future__ import annotations

from typing import Any

BLOCKED_RUN = """
    import importlib.abc, json, sys

    BLOCKED = ("langchain", "langchain_core", "langchain_openai", "langchain_community",
               "llama_index", "openai", "anthropic", "pytest", "_pytest", "hypothesis")
    attempts = []

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    try:
        import langchain_core  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import musubi_core
    import musubi_core.testing
    from musubi_core import Engine, Result, SQLiteStore, StepConfiguration, StepType
    from musubi_core import merge, step, use_engine

    executed = []

    @step()
    def load(name: str) -> str:
        executed.append("load")
        return name.upper()

    @step(semantics=StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=60))
    def chat(doc: Result[str]) -> str:
        executed.append("chat")
        return doc.value + "!"

    with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
        for _ in range(2):
            doc = load("musubi")
            with merge(doc):
                out = chat(doc)
        changed = engine.invalidate(doc.node_id)

    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    print(json.dumps({"executed": executed, "value": out.value, "replayed": out.replayed,
                      "invalidated": changed, "loaded": loaded,
                      "core_attempts": sorted(set(attempts) - {"langchain_core"})}))
"""


def test_core_runs_with_llm_frameworks_unimportable(
    run_py: Any, parse_json: Any, tmp_path: Any
) -> None:
    out = parse_json(run_py(BLOCKED_RUN, str(tmp_path / "iso.db")))
    assert out["executed"] == ["load", "chat"]
    assert out["value"] == "MUSUBI!" and out["replayed"] is True
    assert out["invalidated"] == 2
    assert out["loaded"] == []
    # The core never even tried to import one of them.
    assert out["core_attempts"] == []


def test_importing_the_core_does_not_import_pytest(run_py: Any, parse_json: Any) -> None:
    code = """
        import json, sys
        import musubi_core, musubi_core.testing, musubi_core.store
        before = "pytest" in sys.modules
        import musubi_core.testing.conformance  # the suite itself needs pytest
        print(json.dumps({"before": before, "after": "pytest" in sys.modules}))
    """
    assert parse_json(run_py(code)) == {"before": False, "after": True}
