"""``musubi export`` and ``musubi import`` on a store built by real processes: one JSON line per
recorded node, a stable order, filters, and an import into an empty store that replays as the
original did (the app run again in replay mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from musubi_core import Engine, SQLiteStore
from musubi_core.policy import RECORDED_ONLY_KINDS
from tests.cli._cli_support import build_store, env, musubi


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_store(tmp_path_factory.mktemp("export"))


def _lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _app(folder: Path, db: Path, corpus: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(folder / "app.py"), str(db), corpus],
        capture_output=True, text=True, timeout=120, env={**env(), "MUSUBI_MODE": mode},
    )


def test_export_writes_one_sorted_line_per_recorded_node(built: dict[str, Any]) -> None:
    first = musubi(built["db"], "export")
    lines = _lines(first)
    assert musubi(built["db"], "export").stdout == first.stdout  # the same bytes every time
    keys = [(r["namespace"], r["op_name"], r["node"]) for r in lines]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert {r["op_name"] for r in lines} >= {"rag.config", "rag.retrieve", "rag.answer"}
    assert not {r["kind"] for r in lines} & RECORDED_ONLY_KINDS
    for record in lines:
        assert record["musubi_export"] == 1 and list(record) == sorted(record)
        assert record["artifact"]["id"] and "value" in record["artifact"]
        assert not {"run_id", "owner", "replay_count", "host", "pid"} & set(record)
    answer = next(r for r in lines if r["op_name"] == "rag.answer")
    assert answer["meta"]["inputs"]["text"] == {"$result": answer["upstream"][0]["artifact"]}
    with Engine(SQLiteStore(str(built["db"]))) as engine:
        done = [n for n in engine.store.list_nodes(limit=10_000, status="done")
                if n.kind not in RECORDED_ONLY_KINDS]
    assert len(lines) == len(done)


def test_export_filters(built: dict[str, Any], tmp_path: Path) -> None:
    everything = _lines(musubi(built["db"], "export"))
    run_id = built["run1"]["run_id"]
    of_run = _lines(musubi(built["db"], "export", "--run", run_id[:10]))
    assert 0 < len(of_run) < len(everything)
    assert {r["node"] for r in of_run} < {r["node"] for r in everything}
    assert all("v2" not in json.dumps(r["artifact"]) for r in of_run)
    assert _lines(musubi(built["db"], "export", "--namespace", "elsewhere")) == []
    assert len(_lines(musubi(built["db"], "export", "--namespace", "default"))) == len(everything)
    assert len(_lines(musubi(built["db"], "export", "--since", "1d"))) == len(everything)
    time.sleep(1.1)
    assert _lines(musubi(built["db"], "export", "--since", "1s")) == []
    out = tmp_path / "calls.jsonl"
    written = musubi(built["db"], "export", "-o", str(out))
    assert written.returncode == 0 and f"exported {len(everything)} recording(s)" in written.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == everything


def test_an_imported_export_replays_like_the_original(
    built: dict[str, Any], tmp_path: Path
) -> None:
    folder = Path(built["db"]).parent
    calls = tmp_path / "calls.jsonl"
    calls.write_text(musubi(built["db"], "export").stdout, encoding="utf-8")
    count = len(calls.read_text().splitlines())
    fresh = tmp_path / "new" / "folder" / "imported.db"

    loaded = musubi(fresh, "import", str(calls))
    assert loaded.returncode == 0, loaded.stderr
    assert f"imported {count} new recording(s)" in loaded.stdout
    again = musubi(fresh, "import", "--json", str(calls))
    assert json.loads(again.stdout)["unchanged"] == count
    assert musubi(fresh, "export").stdout == calls.read_text()

    # The app, run again in replay mode on the imported store: every step is served.
    replayed = _app(folder, fresh, "v1", "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["answer"] == built["run1"]["answer"]
    missing = _app(folder, fresh, "v3", "replay")
    assert missing.returncode != 0 and "ReplayMissError" in missing.stderr
    assert 'corpus: "v1" -> "v3"' in missing.stderr or 'corpus: "v2" -> "v3"' in missing.stderr


def test_import_refuses_an_edited_or_foreign_line_and_writes_nothing(
    built: dict[str, Any], tmp_path: Path
) -> None:
    lines = musubi(built["db"], "export").stdout.splitlines()
    record = json.loads(lines[1])
    record["artifact"]["value"] = "an answer edited by hand"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    target = tmp_path / "target.db"
    refused = musubi(target, "import", str(edited))
    assert refused.returncode == 1
    assert "line 2:" in refused.stderr and "does not match its content id" in refused.stderr
    with Engine(SQLiteStore(str(target))) as engine:
        assert engine.store.list_nodes() == []  # nothing of the good lines either

    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"hello": 1}\n')
    proc = musubi(target, "import", str(foreign))
    assert proc.returncode == 1 and "line 1: not a line of a musubi export" in proc.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(lines[0] + "\n{not json\n")
    proc = musubi(target, "import", str(garbage))
    assert proc.returncode == 1 and "line 2: not JSON" in proc.stderr


def test_import_reads_standard_input(built: dict[str, Any], tmp_path: Path) -> None:
    exported = musubi(built["db"], "export").stdout
    target = tmp_path / "stdin.db"
    proc = subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", str(target), "import", "-"],
        input=exported, capture_output=True, text=True, timeout=120, env=env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(target)
    assert musubi(target, "export").stdout == exported
