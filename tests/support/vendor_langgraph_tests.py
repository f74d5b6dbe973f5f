"""Refresh ``tests/data/langgraph_upstream/`` from a clone of langchain-ai/langgraph.

``python -m tests.support.vendor_langgraph_tests REPO`` (a work tree or a bare git directory)
copies, verbatim, the top-level imports and the test functions ``tests/langchain/test_lg_upstream.py``
runs (and the ``TestRedisCache`` methods it runs) from LangGraph's own test files, with a header
naming the commit. They are kept in the repository so that CI, which has no network, runs them;
``$MUSUBI_LANGGRAPH_REPO`` runs them from a newer clone instead.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.langchain.test_lg_upstream import BACKEND_TESTS, CACHE_TESTS, REDIS, VENDORED

HEADER = '''# Extracted verbatim from langchain-ai/langgraph {rel} at commit {commit}
# by tests/support/vendor_langgraph_tests.py: the file's top-level imports and the tests
# musubi runs against its LangGraph node cache (tests/langchain/test_lg_upstream.py).
# LangGraph is MIT-licensed: Copyright (c) 2024 LangChain, Inc. (see LICENSE-langgraph here).
# Kept as .py.txt so that neither pytest nor the linters take it for this project's code.
'''


def _read(repo: Path, rel: str) -> str:
    if (repo / rel).is_file():
        return (repo / rel).read_text(encoding="utf-8")
    return subprocess.run(
        ["git", f"--git-dir={repo}", "show", f"HEAD:{rel}"],
        capture_output=True, text=True, check=True,
    ).stdout


def _commit(repo: Path) -> str:
    args = ["git", "-C", str(repo)] if (repo / ".git").exists() else ["git", f"--git-dir={repo}"]
    return subprocess.run([*args, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _segment(source: str, node: ast.AST) -> str:
    lines = source.splitlines()
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[first - 1 : node.end_lineno])  # type: ignore[attr-defined]


def extract(source: str, names: set[str], cls: str | None) -> str:
    tree = ast.parse(source)
    imports = [_segment(source, n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    parts = ["\n".join(imports)]
    for node in tree.body:
        if cls is None and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in names:
                parts.append(_segment(source, node))
        elif cls is not None and isinstance(node, ast.ClassDef) and node.name == cls:
            methods = [
                "    " + _segment(source, m).lstrip()
                for m in node.body
                if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and m.name in names
            ]
            parts.append(f"class {cls}:\n" + "\n\n".join(methods))
    return "\n\n\n".join(parts) + "\n"


def main(repo_arg: str) -> None:
    repo = Path(repo_arg)
    commit = _commit(repo)
    wanted: dict[str, set[str]] = {}
    for rel, name, _ in CACHE_TESTS:
        wanted.setdefault(rel, set()).add(name)
    for rel, names in [*wanted.items(), (REDIS, set(BACKEND_TESTS))]:
        cls = "TestRedisCache" if rel == REDIS else None
        text = HEADER.format(rel=rel, commit=commit) + "\n" + extract(_read(repo, rel), names, cls)
        (VENDORED / f"{Path(rel).name}.txt").write_text(text, encoding="utf-8")
    (VENDORED / "LICENSE-langgraph").write_text(_read(repo, "LICENSE"), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
