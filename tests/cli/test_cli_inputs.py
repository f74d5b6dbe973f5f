"""Bad input to the ``musubi`` command, run as a real subprocess on real files: store
targets it cannot use, ages without an unambiguous unit, damaged store files, a run id
too long for a file name, and the demo's store and output pipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FILL = textwrap.dedent(
    """
    import sys
    from musubi_core import Engine, SQLiteStore, step, use_engine

    @step(name="inputs.pad")
    def pad(i: int) -> str:
        return "x" * 300 + str(i)

    with Engine(SQLiteStore(sys.argv[1])) as engine, use_engine(engine):
        for i in range(int(sys.argv[2])):
            pad(i)
    """
)


def musubi(*args: str, cwd: Path, env: dict[str, str] | None = None,
           stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "musubi_core.cli", *args],
        cwd=cwd, env=child_env(**(env or {})), stdout=stdout, stderr=subprocess.PIPE,
        text=True, timeout=300,
    )


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MUSUBI_DB"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def make_store(path: Path, rows: int = 3) -> Path:
    script = path.parent / "fill.py"
    script.write_text(FILL)
    subprocess.run([sys.executable, str(script), str(path), str(rows)], check=True,
                   env=child_env(), capture_output=True, timeout=120)
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# -- store targets ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["stats"], ["check"], ["runs"], ["demo"]])
@pytest.mark.parametrize("how", ["--db", "MUSUBI_DB"])
def test_an_unknown_url_scheme_is_refused_and_creates_nothing(
    tmp_path: Path, command: list[str], how: str
) -> None:
    target = "mysql://admin:hunter2@x/y"
    if how == "--db":
        proc = musubi("--db", target, *command, cwd=tmp_path)
    else:
        proc = musubi(*command, cwd=tmp_path, env={"MUSUBI_DB": target})
    assert_clean_failure(proc, 2)
    assert "'mysql'" in proc.stderr and "hunter2" not in proc.stderr
    for form in ("sqlite:///", "postgresql://", "MUSUBI_DB"):
        assert form in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []  # no "mysql:" folder, no store file


def test_a_sqlite_url_names_the_store_file(tmp_path: Path) -> None:
    make_store(tmp_path / "a.db")
    for target in ("sqlite:///a.db", f"sqlite:///{tmp_path / 'a.db'}"):
        proc = musubi("--db", target, "stats", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["nodes"] == 3
    proc = musubi("stats", "--json", cwd=tmp_path, env={"MUSUBI_DB": "sqlite:///a.db"})
    assert proc.returncode == 0 and json.loads(proc.stdout)["nodes"] == 3, proc.stderr
    proc = musubi("--db", "sqlite://a.db", "stats", cwd=tmp_path)
    assert_clean_failure(proc, 2)
    assert "sqlite:///" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.db", "fill.py"]


@pytest.mark.parametrize("command", [["stats"], ["demo"], ["runs"]])
def test_a_directory_as_the_store_says_it_is_a_directory(tmp_path: Path, command: list[str]) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    proc = musubi("--db", str(folder), *command, cwd=tmp_path)
    assert_clean_failure(proc, 2)
    assert "is a directory" in proc.stderr and str(folder / "musubi.db") in proc.stderr
    assert os.listdir(folder) == []


# -- gc --older-than -------------------------------------------------------------------


def test_gc_takes_ages_with_units(tmp_path: Path) -> None:
    original = make_store(tmp_path / "gc.db")
    # One node from 1970, the others and the record of runs from the far future: any age
    # removes exactly one node and one run (with its call and the output only it kept).
    conn = sqlite3.connect(original)
    with conn:
        conn.execute("UPDATE musubi_nodes SET created_at = 4e9, finished_at = 4e9")
        conn.execute("UPDATE musubi_nodes SET created_at = 0, finished_at = 0 WHERE node_id = "
                     "(SELECT MIN(node_id) FROM musubi_nodes)")
        conn.execute("UPDATE musubi_runs SET created_at = 4e9, started_at = 4e9, "
                     "finished_at = 4e9")
        conn.execute("UPDATE musubi_calls SET started_at = 4e9")
        conn.execute("UPDATE musubi_runs SET created_at = 0, started_at = 0, finished_at = 0 "
                     "WHERE run_id = (SELECT run_id FROM musubi_calls WHERE node_id = "
                     "(SELECT MIN(node_id) FROM musubi_nodes))")
    conn.close()  # the last connection out checkpoints the WAL: the file alone is complete
    for age in ("30d", "12h", "45min", "90s", "500ms", "2w"):
        db = shutil.copy(original, tmp_path / f"{age}.db")
        proc = musubi("--db", str(db), "gc", "--older-than", age, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert (report["nodes"], report["artifacts"], report["runs"], report["calls"]) == (
            1, 1, 1, 1), age


def test_gc_refuses_an_ambiguous_age(tmp_path: Path) -> None:
    db = make_store(tmp_path / "gc.db")
    for age, says in (("5m", "'min' (5min)"), ("1h30m", "(1h30min)"), ("30", "30d"),
                      ("soon", "45min")):
        proc = musubi("--db", str(db), "gc", "--older-than", age, cwd=tmp_path)
        assert_clean_failure(proc, 2)
        assert says in proc.stderr, proc.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM musubi_nodes").fetchone()[0] == 3


# -- check on a damaged file -----------------------------------------------------------------


def damaged(tmp_path: Path, how: str) -> Path:
    good = make_store(tmp_path / "good.db", rows=300)
    size = good.stat().st_size
    assert size > 16 * 4096  # pages enough to damage the middle
    bad = tmp_path / f"{how}.db"
    shutil.copy(good, bad)
    with open(bad, "r+b") as fh:
        if how == "overwritten":
            fh.seek(size // 2)  # well past page 2
            fh.write(b"\xff" * 4 * 4096)
        else:
            fh.truncate(size // 3)
    return bad


@pytest.mark.parametrize("how", ["overwritten", "truncated"])
def test_check_reports_a_damaged_file(tmp_path: Path, how: str) -> None:
    bad = damaged(tmp_path, how)
    proc = musubi("--db", str(bad), "check", cwd=tmp_path)
    assert_clean_failure(proc, 1)
    assert f"{bad} is damaged" in proc.stdout, proc.stdout + proc.stderr
    assert "problem:" in proc.stdout and "backup" in proc.stdout
    if how == "truncated":
        assert "truncated" in proc.stdout
    assert "musubi check" not in proc.stdout + proc.stderr  # never "run the command you ran"
    report = json.loads(musubi("--db", str(bad), "check", "--json", cwd=tmp_path).stdout)
    assert report["ok"] is False and report["damaged"] is True and report["problems"]
    # The healthy original still checks clean.
    assert musubi("--db", str(tmp_path / "good.db"), "check", cwd=tmp_path).stdout.strip() == "ok"


def test_check_reports_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"these are not the bytes of a database\n" * 50)
    proc = musubi("--db", str(junk), "check", cwd=tmp_path)
    assert_clean_failure(proc, 1)
    assert "not a SQLite database" in proc.stdout


# -- durable run ids --------------------------------------------------------------------------


def test_a_run_id_too_long_for_a_file_name_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "flows.py").write_text("def ok(ctx):\n    return ctx.step('a', lambda: 1)\n")
    proc = musubi("run", "flows:ok", "--db", "t.db", "--run-id", "r" * 300, cwd=tmp_path)
    assert_clean_failure(proc, 2)
    assert "at most 128 characters" in proc.stderr
    assert not (tmp_path / "t.db").exists()
    proc = musubi("run", "flows:ok", "--db", "t.db", "--run-id", "r" * 128, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# -- demo -----------------------------------------------------------------------------------


def printed_commands(stdout: str) -> list[list[str]]:
    """Every ```musubi ...``` command the demo tells the reader to run."""
    return [shlex.split(command) for command in re.findall(r"`(musubi [^`]+)`", stdout)]


def test_demo_uses_musubi_db_and_its_commands_work_afterwards(tmp_path: Path) -> None:
    # (--db takes the same path through cmd_demo; test_cli.py runs the demo with it.)
    name = "my demo.db"
    proc = musubi("demo", cwd=tmp_path, env={"MUSUBI_DB": name})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / name).is_file()
    commands = printed_commands(proc.stdout)
    assert {c[3] for c in commands} == {"lineage", "stats"}, proc.stdout
    for command in commands:
        after = musubi(*command[1:], cwd=tmp_path)  # the demo has exited
        assert after.returncode == 0, f"{command}: {after.stderr}"


def test_demo_without_a_store_prints_no_command_that_needs_its_temporary_file(
    tmp_path: Path,
) -> None:
    proc = musubi("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert printed_commands(proc.stdout) == [["musubi", "demo", "--db", "demo.db"]]
    assert "musubi-demo-" not in proc.stdout  # the temporary folder is named nowhere
    assert os.listdir(tmp_path) == []


def test_demo_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the demo writes anything
    try:
        # Unbuffered, the first write fails; buffered, the final flush does
        # (which Python reports as "Exception ignored ... BrokenPipeError").
        quick = musubi("demo", cwd=tmp_path, env={"PYTHONUNBUFFERED": "1"}, stdout=write_end)
        stats = musubi("--db", str(make_store(tmp_path / "s.db")), "stats",
                       cwd=tmp_path, env={"PYTHONUNBUFFERED": ""}, stdout=write_end)
    finally:
        os.close(write_end)
    for proc in (quick, stats):
        assert proc.returncode == 1
        assert proc.stderr == "", proc.stderr


def test_demo_piped_into_head_ends_without_a_traceback(tmp_path: Path) -> None:
    command = f"{shlex.quote(sys.executable)} -m musubi_core.cli demo | head -1"
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.startswith("musubi demo (store: ") and proc.stdout.count("\n") == 1
    assert proc.stderr == "", proc.stderr
