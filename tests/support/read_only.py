"""Make a store really read-only for a test: file modes, the immutable attribute, or a mount.

``read_only_store(db, how)`` yields the path to open the store at:

* ``"permissions"``: the file and its folder lose every write bit (0444 / 0555). Root ignores
  modes, so for root the file and the folder are also made immutable (``chattr +i``); the
  test is skipped, saying why, where that is not permitted.
* ``"mount"``: the folder is seen through a read-only bind mount (root only, skipped where
  mounting is not permitted), the way a container sees a volume mounted ``:ro``.

Everything is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HOW = ("permissions", "mount")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True)


@contextlib.contextmanager
def read_only_store(db: Path, how: str) -> Iterator[Path]:
    folder = db.parent
    if how == "mount":
        with _read_only_mount(folder) as view:
            yield view / db.name
        return
    paths = [*sorted(folder.iterdir()), folder]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    immutable: list[Path] = []
    try:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.skip("running as root without chattr: cannot make a file read-only")
            for p in paths:
                result = _run("chattr", "+i", str(p))
                if result.returncode != 0:
                    pytest.skip(f"chattr +i is not permitted here: {result.stderr.strip()}")
                immutable.append(p)
        yield db
    finally:
        for p in reversed(immutable):
            _run("chattr", "-i", str(p))
        for p, mode in modes.items():
            p.chmod(mode)


@contextlib.contextmanager
def _read_only_mount(folder: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    view = folder.parent / f"{folder.name}-ro-view"
    view.mkdir()
    result = _run("mount", "--bind", str(folder), str(view))
    if result.returncode != 0:
        view.rmdir()
        pytest.skip(f"mount --bind is not permitted here: {result.stderr.strip()}")
    try:
        result = _run("mount", "-o", "remount,bind,ro", str(view))
        if result.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {result.stderr.strip()}")
        yield view
    finally:
        # Lazily: connections the test left open (an instrumented engine) must not keep it.
        _run("umount", "--lazy", str(view))
        view.rmdir()
