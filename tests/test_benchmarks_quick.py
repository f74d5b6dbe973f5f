"""The benchmark suite's quick mode is a smoke test: every case runs at small size and
asserts that hits came from the cache, misses ran the work, writes landed. No timing
thresholds (the machine running CI is shared and noisy); anchors that are not installed
are skipped by the suite itself with a message."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmarks_quick_mode_passes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "correctness FAILED" not in proc.stdout
    assert out.exists()
