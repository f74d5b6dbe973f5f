"""The distribution as a user gets it: built with ``python -m build``, installed from
the wheel into a fresh virtualenv outside the repository (so the source tree is not
importable), extra by extra, then the README's install command and every README
snippet, each on its own in a fresh interpreter.

One virtualenv serves every stage, in order: the wheel alone (the adapters' import
errors must name the right install line), then ``[langchain]``, ``[langgraph]``,
``[postgres]`` and ``[llama-index]`` one at a time (each must be what its adapter needs), then the
README's own command with ``[all]``. This file takes about a minute (about 40 s of CPU,
mostly pip), so the tests that build are marked ``packaging``: ``pytest -m "not packaging"``
skips them while iterating; the full suite and CI run them.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.snippets import snippets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DIST = PYPROJECT["project"]["name"]
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
README_SNIPPETS = snippets(ROOT / "README.md")

# What each extra must make importable, and the error message that names it.
STAGES = (
    ("langchain", "import musubi_langchain"),
    ("langgraph", "from musubi_langchain.langgraph import MusubiNodeCache"),
    ("postgres", "import psycopg"),
    ("llama-index", "import musubi_llama_index"),
)
MISSING_EXTRA_PROBES = {
    "langchain": "import musubi_langchain",
    "llama-index": "import musubi_llama_index",
    "postgres": "from musubi_core import PostgresStore; PostgresStore('dbname=x host=/nowhere')",
}


def source_version() -> str:
    """``musubi_core.__version__`` read from the source, the one place it is written."""
    text = (ROOT / "musubi_core" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "musubi_core/__init__.py must assign __version__ a literal string"
    return match.group(1)


# -- install lines (no build needed) ---------------------------------------------------


def text_files() -> Iterator[Path]:
    yield from (ROOT / name for name in ("README.md", "CHANGELOG.md", "pyproject.toml"))
    yield from sorted((ROOT / "docs").glob("*.md"))
    for folder in ("musubi_core", "integrations", "examples", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_install_line_names_this_distribution_and_a_real_extra() -> None:
    """The name ``musubi`` on PyPI is an unrelated 2013 project, so installing it with an
    extra installs that: every requirement with extras, anywhere a user can read it,
    names this distribution, and an extra it has."""
    # Extras start with a letter: an index such as ``musubi_sent[0]`` is not a requirement.
    requirement = re.compile(r"""(?<![\w.-])([A-Za-z][\w.-]*|\.)\[([a-z][a-z0-9,\- ]*)\]""")
    upgrade = re.compile(r"pip install -U ([\w.-]+)")
    seen = 0
    for path in text_files():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        for match in requirement.finditer(text):
            name, extras = match.group(1), {e.strip() for e in match.group(2).split(",")}
            if not name.startswith("musubi") and name != ".":
                continue
            seen += 1
            assert name in (DIST, "."), f"{where}: {match.group(0)!r} must name {DIST!r}"
            assert extras <= EXTRAS, f"{where}: {match.group(0)!r}: no such extra ({EXTRAS})"
        for match in upgrade.finditer(text):
            assert match.group(1) == DIST, f"{where}: {match.group(0)!r} must name {DIST!r}"
    assert seen >= 8  # README, docs, the adapters' errors, the demo, pyproject


# -- build -----------------------------------------------------------------------------


@dataclass
class Built:
    wheel: Path
    sdist: Path


def _ignore(folder: str, names: list[str]) -> set[str]:
    junk = {".git", ".venv", ".venv310", "build", "dist", "__pycache__", ".mypy_cache",
            ".ruff_cache", ".pytest_cache", ".hypothesis", ".musubi", ".benchmarks"}
    return {n for n in names if n in junk or n.endswith(".egg-info")}


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=900)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {proc.args}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # Built from a copy, so the test never writes into the source tree.
    src = tmp_path_factory.mktemp("src") / "musubi"
    shutil.copytree(ROOT, src, ignore=_ignore)
    out = tmp_path_factory.mktemp("dist")
    proc = run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], cwd=out)
    assert proc.returncode == 0, explain(proc)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Built(wheel, sdist)


@pytest.mark.packaging
def test_wheel_and_sdist_carry_the_name_version_and_license(built: Built) -> None:
    version = source_version()
    assert built.wheel.name == f"musubi_lineage-{version}-py3-none-any.whl"
    assert built.sdist.name == f"musubi_lineage-{version}.tar.gz"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in license_text and "musubi developers" in license_text
    with zipfile.ZipFile(built.wheel) as wheel:
        names = wheel.namelist()
        info = f"musubi_lineage-{version}.dist-info"
        assert f"{info}/licenses/LICENSE" in names, names
        assert wheel.read(f"{info}/licenses/LICENSE").decode() == license_text
        metadata = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        for package in ("musubi_core", "musubi_langchain", "musubi_llama_index", "musubi_pytest"):
            assert f"{package}/__init__.py" in names and f"{package}/py.typed" in names
        # `musubi view`'s page: every script, style and license it ships, and the prices.
        static = ROOT / "musubi_core" / "view" / "static"
        for shipped in sorted(static.iterdir()):
            assert f"musubi_core/view/static/{shipped.name}" in names, shipped.name
        assert "musubi_core/view/static/dagre.LICENSE" in names
        assert "musubi_core/prices.toml" in names
    assert metadata["Name"] == DIST and metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT"
    assert set(metadata.get_all("Provides-Extra") or []) >= {"langchain", "llama-index",
                                                              "postgres", "all"}
    assert "musubi = musubi_core.cli:main" in entry_points
    # The pytest plugin, inert unless pytest runs with --musubi-mode.
    assert "[pytest11]\nmusubi = musubi_pytest.plugin" in entry_points
    with tarfile.open(built.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml"} <= members


# -- install into a fresh virtualenv outside the repository ------------------------------


@dataclass
class Installed:
    home: Path
    python: Path
    env: dict[str, str]
    missing: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    stages: dict[str, tuple[subprocess.CompletedProcess[str], ...]] = field(default_factory=dict)
    readme_command: subprocess.CompletedProcess[str] | None = None


def readme_install_command() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Set up", 1)[1]
    return re.findall(r"^```bash\n(.*?)\n```", section, re.MULTILINE | re.DOTALL)[0]


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    home = tmp_path_factory.mktemp("user")
    assert ROOT not in home.parents
    here = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MUSUBI_DB", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(here), env.get("PATH", "")])
    proc = run([sys.executable, "-m", "venv", ".venv"], cwd=home, env=env)
    assert proc.returncode == 0, explain(proc)
    python = home / ".venv" / "bin" / "python"
    result = Installed(home, python, env)

    def pip(requirement: str) -> subprocess.CompletedProcess[str]:
        return run([str(python), "-m", "pip", "install", "-q", requirement], cwd=home, env=env)

    def probe(code: str) -> subprocess.CompletedProcess[str]:
        return run([str(python), "-c", code], cwd=home, env=env)

    proc = pip(str(built.wheel))
    assert proc.returncode == 0, explain(proc)
    result.missing = {extra: probe(code) for extra, code in MISSING_EXTRA_PROBES.items()}
    for extra, code in STAGES:
        installing = pip(f"{built.wheel}[{extra}]")
        result.stages[extra] = (installing, probe(code) if installing.returncode == 0 else
                                installing)
    # The README's own command, with the wheel standing in for the index.
    command = readme_install_command().replace(f'"{DIST}[all]"', f'"{built.wheel}[all]"')
    assert str(built.wheel) in command, f"README's install command changed: {command}"
    result.readme_command = run(["bash", "-c", command], cwd=home, env=env)
    return result


@pytest.mark.packaging
def test_without_extras_each_adapter_names_its_install_line(installed: Installed) -> None:
    for extra, proc in installed.missing.items():
        assert proc.returncode != 0 and "ImportError" in proc.stderr, explain(proc)
        assert f'pip install "{DIST}[{extra}]"' in proc.stderr, explain(proc)


@pytest.mark.packaging
@pytest.mark.parametrize("extra", [extra for extra, _ in STAGES])
def test_each_extra_installs_what_its_adapter_needs(installed: Installed, extra: str) -> None:
    installing, probing = installed.stages[extra]
    assert installing.returncode == 0, explain(installing)
    assert probing.returncode == 0, explain(probing)


@pytest.mark.packaging
def test_readme_install_command_runs_the_demo_outside_the_repository(
    installed: Installed,
) -> None:
    proc = installed.readme_command
    assert proc is not None and proc.returncode == 0, explain(proc) if proc else ""
    assert "Traceback" not in proc.stderr, explain(proc)
    assert "skipped" not in proc.stdout and "FAILED" not in proc.stdout, explain(proc)
    assert re.search(r"run 2:.*extract_facts=replayed", proc.stdout), explain(proc)
    version = run([str(installed.home / ".venv" / "bin" / "musubi"), "--version"],
                  cwd=installed.home, env=installed.env)
    assert version.stdout.strip() == f"musubi {source_version()}", explain(version)
    where = run([str(installed.python), "-c", "import musubi_core; print(musubi_core.__file__)"],
                cwd=installed.home, env=installed.env)
    assert Path(where.stdout.strip()).is_relative_to(installed.home / ".venv"), explain(where)


@pytest.mark.packaging
@pytest.mark.parametrize("index", range(len(README_SNIPPETS)),
                         ids=[f"snippet{i + 1}" for i in range(len(README_SNIPPETS))])
def test_readme_snippet_runs_on_its_own_in_the_installed_package(
    installed: Installed, index: int, tmp_path: Path
) -> None:
    assert installed.readme_command is not None and installed.readme_command.returncode == 0
    proc = run([str(installed.python), "-"], cwd=tmp_path, env=installed.env,
               stdin=README_SNIPPETS[index])
    assert proc.returncode == 0, explain(proc)
