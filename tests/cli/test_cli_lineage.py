"""``musubi show``, ``musubi lineage`` and ``musubi explain`` of calls and of nodes, and the
"not found" hints, on a store made by two real runs of one app over different documents."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _cli_support import build_store, musubi, musubi_json

WHEN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_store(tmp_path_factory.mktemp("lineage"))


def run_calls(db: Path, run_id: str) -> dict[str, dict[str, Any]]:
    return {c["op_name"]: c for c in musubi_json(db, "steps", run_id)["calls"]}


def test_show_a_call(store: dict[str, Any]) -> None:
    db, run2 = store["db"], store["run2"]
    calls = run_calls(db, run2["run_id"])
    data = musubi_json(db, "show", run2["answer_call"])
    assert data["what"] == "call" and data["call_id"] == run2["answer_call"]
    assert data["run"] == {"run_id": run2["run_id"], "kind": "script", "name": "rag"}
    assert data["parent"] == {"call_id": calls["rag.pipeline"]["call_id"],
                              "op_name": "rag.pipeline"}
    assert [(f["src_call_id"], f["src_op_name"]) for f in data["flows_in"]] == [
        (calls["rag.prompt"]["call_id"], "rag.prompt")]
    assert data["flows_out"] == [] and data["replayed"] is False
    assert data["value"] == run2["answer"] and data["node_id"] == calls["rag.answer"]["node_id"]

    retrieved = musubi_json(db, "show", run2["retrieve_call"])
    assert retrieved["value"] == [f"v2 document {i}: the sky is v2-blue" for i in range(2)]
    assert {f["dst_op_name"] for f in retrieved["flows_out"]} == {"rag.prompt", "rag.fmt"}
    assert [f["src_op_name"] for f in retrieved["flows_in"]] == ["rag.config"]

    text = musubi(db, "show", run2["retrieve_call"]).stdout
    assert re.search(rf"^run\s+{run2['run_id']} \(script rag\)$", text, re.MULTILINE)
    assert re.search(r"^started\s+" + WHEN.pattern + "$", text, re.MULTILINE)
    assert re.search(r"^replayed\s+no$", text, re.MULTILINE)
    assert f"  {run2['config_call']} rag.config" in text  # a flow in, with its op name
    assert "output: ['v2 document 0: the sky is v2-blue', 'v2 document 1: the sky is v2-blue']" in text
    prompt = musubi(db, "show", calls["rag.prompt"]["call_id"]).stdout
    preview = calls["rag.prompt"]["input_preview"]
    assert "why is the sky blue?" in preview and f"\ninput:  {preview}\n" in prompt

    retriever = musubi(db, "show", calls["VectorRetriever"]["call_id"]).stdout
    assert re.search(r"^node_id\s+- \(recorded only", retriever, re.MULTILINE)


def test_show_a_node_lists_its_calls(store: dict[str, Any]) -> None:
    db, run1, run2 = store["db"], store["run1"], store["run2"]
    config = run_calls(db, run2["run_id"])["rag.config"]
    data = musubi_json(db, "show", config["node_id"][:10])
    assert data["node_id"] == config["node_id"] and data["value"] == {"k": 2}
    # Most recent first: run 2's replay, then run 1's execution.
    assert [(c["call_id"], c["run_id"], c["replayed"]) for c in data["calls"]] == [
        (run2["config_call"], run2["run_id"], True),
        (run1["config_call"], run1["run_id"], False),
    ]
    assert data["output_preview"] == "{k: 2}"
    text = musubi(db, "show", config["node_id"][:10]).stdout
    assert re.search(r"^created_at\s+" + WHEN.pattern + "$", text, re.MULTILINE)
    assert "output: {k: 2}" in text
    rows = text.split("calls (2, most recent first", 1)[1].splitlines()
    assert run2["config_call"] in rows[3] and run2["run_id"] in rows[3] and " yes " in rows[3]
    assert run1["config_call"] in rows[4] and run1["run_id"] in rows[4]


def test_lineage_of_a_call_is_what_flowed_in_its_run(store: dict[str, Any]) -> None:
    db, run1, run2 = store["db"], store["run1"], store["run2"]
    graph = musubi_json(db, "lineage", run2["answer_call"])
    assert graph["root"] == run2["answer_call"] and graph["truncated"] is False
    ops = [c["op_name"] for c in graph["calls"]]
    assert ops == ["rag.config", "rag.retrieve", "rag.prompt", "rag.answer"]  # topological
    assert {c["run_id"] for c in graph["calls"]} == {run2["run_id"]}
    ids = {c["call_id"] for c in graph["calls"]}
    assert run2["retrieve_call"] in ids and run2["config_call"] in ids
    assert not ids & {run1["retrieve_call"], run1["config_call"], run1["answer_call"]}
    retrieved = next(c for c in graph["calls"] if c["op_name"] == "rag.retrieve")
    assert retrieved["value"][0] == "v2 document 0: the sky is v2-blue"
    assert {(f["src_call_id"], f["dst_call_id"]) for f in graph["flows"]} == {
        (run2["config_call"], run2["retrieve_call"]),
        (run2["retrieve_call"], next(c["call_id"] for c in graph["calls"]
                                     if c["op_name"] == "rag.prompt")),
        (next(c["call_id"] for c in graph["calls"] if c["op_name"] == "rag.prompt"),
         run2["answer_call"]),
    }

    text = musubi(db, "lineage", run2["answer_call"]).stdout
    assert "v2 document 0: the sky is v2-blue" in text and "v1" not in text
    assert run1["run_id"] not in text and "notice:" not in text
    assert re.search(rf"^\* {run2['answer_call']}\s+step\s+rag.answer", text, re.MULTILINE)
    # The stale answer of run 1 still shows the documents it was made from.
    old = musubi(db, "lineage", run1["answer_call"]).stdout
    assert "v1 document 0: the sky is v1-blue" in old and "v2 document" not in old

    down = musubi_json(db, "lineage", run2["retrieve_call"], "--down")
    assert [c["op_name"] for c in down["calls"]] == [
        "rag.retrieve", "rag.prompt", "rag.fmt", "rag.answer"]
    dot = musubi(db, "lineage", run2["answer_call"], "--format", "dot").stdout
    assert dot.startswith("digraph") and f'"{run2["config_call"]}" -> "{run2["retrieve_call"]}"' in dot
    mermaid = musubi(db, "lineage", run2["answer_call"], "--format", "mermaid").stdout
    assert f"c{run2['config_call']} --> c{run2['retrieve_call']}" in mermaid


def test_lineage_notices_a_cut(store: dict[str, Any]) -> None:
    db, answer = store["db"], store["run2"]["answer_call"]
    cut = musubi_json(db, "lineage", answer, "--depth", "1")
    assert cut["truncated"] is True
    assert [c["op_name"] for c in cut["calls"]] == ["rag.prompt", "rag.answer"]
    text = musubi(db, "lineage", answer, "--depth", "1").stdout
    assert "notice: output cut by --depth or --limit" in text.splitlines()[-1]
    assert "notice:" in musubi(db, "lineage", answer, "--limit", "2").stdout
    # Depth 3 reaches the config call, which has no upstream: nothing was cut.
    assert musubi_json(db, "lineage", answer, "--depth", "3")["truncated"] is False
    assert "notice:" not in musubi(db, "lineage", answer, "--depth", "3").stdout


def test_lineage_of_a_node_is_its_memo_lineage(store: dict[str, Any]) -> None:
    db, run2 = store["db"], store["run2"]
    calls = run_calls(db, run2["run_id"])
    answer_node = calls["rag.answer"]["node_id"]
    graph = musubi_json(db, "lineage", answer_node[:12], "--up")
    assert [n["op_name"] for n in graph["nodes"]] == [
        "rag.config", "rag.retrieve", "rag.prompt", "rag.answer"]
    assert {e["kind"] for e in graph["edges"]} == {"data"} and graph["truncated"] is False
    assert musubi_json(db, "lineage", answer_node, "--up", "--depth", "2")["truncated"] is True
    text = musubi(db, "lineage", answer_node, "--depth", "2").stdout
    assert "--data-->" in text and text.splitlines()[-1].startswith("notice:")
    # A durable step's node: data edges only, never the contains edges from run nodes.
    step_node = musubi_json(db, "steps", "nightly-1")["calls"][0]["node_id"]
    durable = musubi_json(db, "lineage", step_node)
    assert [n["op_name"] for n in durable["nodes"]] == ["run:nightly-1:fetch", "run:nightly-1:total"]
    assert {e["kind"] for e in durable["edges"]} == {"data"}
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT COUNT(*) FROM musubi_edges WHERE child = ? AND kind = 'contains'", (step_node,)
        ).fetchone()[0] == 1


def test_explain_every_kind(store: dict[str, Any]) -> None:
    db, run2 = store["db"], store["run2"]
    calls = run_calls(db, run2["run_id"])
    retriever = musubi_json(db, "explain", calls["VectorRetriever"]["call_id"])
    assert retriever["reason"] == "recorded_only" and retriever["replay"] is False
    assert retriever["call_kind"] == "retriever" and retriever["node_id"] is None
    text = musubi(db, "explain", calls["VectorRetriever"]["call_id"]).stdout
    assert "recorded, never replayed" in text and "retriever calls" in text

    answer = musubi_json(db, "explain", run2["answer_call"])
    assert (answer["reason"], answer["replay"]) == ("hit", True)
    assert answer["node_id"] == calls["rag.answer"]["node_id"]
    text = musubi(db, "explain", run2["answer_call"]).stdout
    assert f"reached node {answer['node_id'][:12]}" in text and "would REPLAY (hit)" in text

    run_node = musubi_json(db, "runs", "--kind", "durable")[0]["node_id"]
    durable = musubi_json(db, "explain", run_node[:12])
    assert (durable["kind"], durable["reason"]) == ("run", "recorded_only")
    assert "never replayed" in musubi(db, "explain", run_node).stdout


def test_not_found_hints_name_a_listing(store: dict[str, Any]) -> None:
    db = store["db"]
    cases = {
        ("show", "ffff"): "`musubi nodes`",
        ("lineage", "ffff"): "`musubi nodes`",
        ("explain", "ffff"): "`musubi nodes`",
        ("invalidate", "ffff"): "`musubi nodes`",
        ("steps", "nope"): "`musubi runs`",
        ("nodes", "--run", "nope"): "`musubi runs`",
    }
    for argv, listing in cases.items():
        res = musubi(db, *argv)
        assert res.returncode == 1, (argv, res.stderr)
        assert listing in res.stderr and "musubi stats" not in res.stderr, (argv, res.stderr)
    assert "no node or call matches 'ffff'" in musubi(db, "show", "ffff").stderr
    assert "`musubi steps RUN`" in musubi(db, "show", "ffff").stderr


def test_a_prefix_of_a_node_and_a_call_is_ambiguous(store: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    with sqlite3.connect(store["db"]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    node_id = musubi_json(db, "nodes", "--op", "rag.loose")[0]["node_id"]
    call_id = node_id[:6] + "0" * 18
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE musubi_calls SET call_id = ? WHERE call_id = ?",
                     (call_id, store["run2"]["answer_call"]))
    res = musubi(db, "show", node_id[:6])
    assert res.returncode == 1
    assert f"node {node_id}" in res.stderr and f"call {call_id}" in res.stderr
    # A longer prefix, or the full id, names one of them.
    assert musubi_json(db, "show", call_id)["what"] == "call"
    assert musubi_json(db, "show", node_id[:20])["node_id"] == node_id
