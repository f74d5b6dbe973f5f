"""Every ```python snippet in README.md and docs/*.md runs.

Snippets of one file run in order in one fresh interpreter (later snippets may
use names defined by earlier ones), in an empty working folder with its own
store, so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.snippets import snippets

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", [d for d in DOCS if snippets(d)], ids=lambda p: p.name)
def test_doc_snippets_run(doc: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = snippets(doc)
    program = "\n\n".join(
        f"# --- snippet {i + 1} of {doc.name}\n{block}" for i, block in enumerate(blocks)
    )
    script = tmp_path / "snippets.py"
    script.write_text(program, encoding="utf-8")
    env = dict(os.environ, MUSUBI_DB=str(tmp_path / "docs.db"), PYTHONPATH=str(ROOT))
    if doc.name == "postgres.md":
        # Its snippets talk to a real server: a fresh database of the session's test server.
        from tests.support.postgres import fresh_database

        env["MUSUBI_PG_URL"] = fresh_database(request.getfixturevalue("pg_dsn"))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{doc.name}: a snippet failed\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def test_readme_has_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```bash\n(.*?)\n```", section, re.MULTILINE | re.DOTALL)
    assert len(commands) == 2
    assert commands[0].endswith("musubi demo")
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_test_command" in ci


@pytest.mark.parametrize("doc", ["README.md", "docs/core.md"])
def test_docs_say_what_identity_does_not_see(doc: str) -> None:
    """Values a step reads that are not its arguments (module constants, globals,
    files) are not part of its identity: the doc says so, gives both fixes, and
    shows it in a snippet that test_doc_snippets_run executes."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert "module constant" in text and "not part of" in text
    assert "version=" in text and "as an argument" in text
    assert any("PROMPT =" in s and "replayed" in s for s in snippets(ROOT / doc))
