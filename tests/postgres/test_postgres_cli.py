"""Every ``musubi`` command with ``--db postgresql://...``, in real subprocesses: a durable run
is started and inspected, its nodes explained, exported into a second server database and
imported, invalidated, collected; the two commands that copy or create a SQLite file say
what to use instead."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.core._runner_support import child_env
from tests.support.postgres import fresh_database

FLOWS = """
def body(ctx):
    words = ctx.step("split", lambda: "a b c".split())
    return ctx.step("count", lambda: len(words))
"""


def _musubi(cwd: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", "--db", url, *args],
        cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=120,
    )


def test_every_command_on_postgres(pg_dsn: str, tmp_path: Path) -> None:
    url = fresh_database(pg_dsn)
    (tmp_path / "flows.py").write_text(textwrap.dedent(FLOWS))

    def ok(*args: str) -> str:
        proc = _musubi(tmp_path, url, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc.stdout

    assert json.loads(ok("run", "flows:body", "--run-id", "job-1")) == 3
    assert json.loads(ok("run", "flows:body", "--run-id", "job-1")) == 3  # replayed
    stats = json.loads(ok("stats", "--json"))
    assert stats["nodes"] >= 3
    (run,) = json.loads(ok("runs", "--json"))
    assert run["run_id"] == "job-1" and run["status"] == "done"
    steps = json.loads(ok("steps", "job-1", "--json"))
    assert [s["name"] for s in steps["steps"]] == ["split", "count"]
    nodes = json.loads(ok("nodes", "--json"))
    step_nodes = [n for n in nodes if n["kind"] == "run_step"]
    assert len(step_nodes) == 2
    node = step_nodes[0]["node_id"]
    assert node in ok("show", node[:12], "--json")
    assert ok("lineage", node[:12])
    assert ok("explain", node[:12])
    export = tmp_path / "export.jsonl"
    ok("export", "-o", str(export))
    assert len(export.read_text().splitlines()) >= 2
    other = fresh_database(pg_dsn)
    ok_other = _musubi(tmp_path, other, "import", str(export))
    assert ok_other.returncode == 0, ok_other.stderr
    assert json.loads(_musubi(tmp_path, other, "stats", "--json").stdout)["nodes"] >= 2
    html = tmp_path / "view.html"
    ok("view", "--out", str(html))
    assert "job-1" in html.read_text()
    assert json.loads(ok("check", "--json"))["ok"] is True
    ok("invalidate", node[:12])
    assert json.loads(ok("gc", "--older-than", "1s", "--dry-run", "--json"))["dry_run"] is True
    for args, says in ((("backup", str(tmp_path / "b.db")), "pg_dump"), (("demo",), "SQLite")):
        refused = _musubi(tmp_path, url, *args)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
