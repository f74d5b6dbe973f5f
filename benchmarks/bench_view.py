#!/usr/bin/env python
"""``musubi view`` on a large store, in the machine's headless Chromium.

    python benchmarks/bench_view.py                 # a new 100,000-call store in a temp folder
    python benchmarks/bench_view.py --db big.db     # an existing store (made by view_store.py)
    python benchmarks/bench_view.py --json out.json --screenshots DIR

Measured (medians of --repeat page loads, each in a fresh tab state):

- the runs page: from the start of navigation to the runs table drawn (the browser's own
  clock, ``performance.now()``), served by ``musubi view --serve``;
- the large run (5,000 calls): from navigation to its graph drawn, collapsed; how many boxes it
  shows; one group expanded by a click (the time to lay out and draw again); what-if on one of
  its model calls;
- ``musubi view --out``: the time to write the file and its size.

Figures are reported, not judged (the machine is shared); the budget in docs/view.md is 2 s
for the runs page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from view_store import build_store  # noqa: E402

from tests.support.browser import chromium, unavailable  # noqa: E402


def _serve(db: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "musubi_core.cli", "--db", db, "view", "--serve", "--port", "0"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.split()[1]


def _wait(driver: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = driver.execute_script(script)
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"timed out: {script}")


def _load(driver: Any, url: str, what: str) -> float:
    """Milliseconds from the start of navigation to the view drawn (browser clock)."""
    driver.get("about:blank")
    driver.get(url)
    _wait(driver, f"return document.getElementById('main').getAttribute('data-ready') === '{what}'")
    return float(driver.execute_script(
        "return Number(document.getElementById('main').getAttribute('data-ready-at'))"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="an existing store (default: build one)")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--big-run", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--screenshots", help="save the runs page and the large run here")
    args = parser.parse_args()
    why = unavailable()
    if why:
        print(f"skipped: {why}")
        return 0
    folder = tempfile.mkdtemp(prefix="musubi-bench-view-")
    db = args.db or str(Path(folder) / "view.db")
    results: dict[str, Any] = {}
    if not args.db:
        started = time.perf_counter()
        big = build_store(db, calls=args.calls, big_run_calls=args.big_run)
        results["build_store_s"] = round(time.perf_counter() - started, 2)
    else:
        import sqlite3

        con = sqlite3.connect(db)
        big = con.execute("SELECT run_id FROM musubi_runs ORDER BY calls DESC LIMIT 1").fetchone()[0]
        con.close()
    import sqlite3

    con = sqlite3.connect(db)
    results["store_calls"] = con.execute("SELECT COUNT(*) FROM musubi_calls").fetchone()[0]
    results["store_runs"] = con.execute("SELECT COUNT(*) FROM musubi_runs").fetchone()[0]
    results["big_run_calls"] = con.execute(
        "SELECT COUNT(*) FROM musubi_calls WHERE run_id = ?", (big,)).fetchone()[0]
    chat = con.execute("SELECT call_id FROM musubi_calls WHERE run_id = ? AND kind = 'chat_model' "
                       "ORDER BY seq LIMIT 1", (big,)).fetchone()[0]
    con.close()

    proc, url = _serve(db)
    try:
        with chromium() as b:
            d = b.driver
            runs_ms = [_load(d, url, "runs") for _ in range(args.repeat)]
            results["runs_page_ms"] = statistics.median(runs_ms)
            results["runs_page_ms_all"] = runs_ms
            results["runs_listed"] = d.execute_script(
                "return document.querySelectorAll('[data-testid=run-row]').length")
            if args.screenshots:
                b.screenshot(Path(args.screenshots) / "view-bench-runs.png")
            run_ms = [_load(d, url + f"#run/{big}", "run") for _ in range(args.repeat)]
            results["big_run_open_ms"] = statistics.median(run_ms)
            results["big_run_boxes"] = int(d.execute_script(
                "return document.querySelector('[data-testid=graph]').getAttribute('data-boxes')"))
            expand_ms = []
            for _ in range(args.repeat):
                _load(d, url + f"#run/{big}", "run")
                before = results["big_run_boxes"]
                t0 = time.perf_counter()
                d.execute_script("document.querySelector('[data-testid=expand]')"
                                 ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
                _wait(d, "return Number(document.querySelector('[data-testid=graph]')"
                         f".getAttribute('data-boxes')) > {before}")
                expand_ms.append((time.perf_counter() - t0) * 1000)
                results["big_run_boxes_expanded"] = int(d.execute_script(
                    "return document.querySelector('[data-testid=graph]')"
                    ".getAttribute('data-boxes')"))
            results["big_run_expand_ms"] = round(statistics.median(expand_ms), 1)
            if args.screenshots:
                b.screenshot(Path(args.screenshots) / "view-bench-large-run.png")
            whatif_ms = []
            for _ in range(args.repeat):
                _load(d, url + f"#run/{big}/call/{chat}", "run")
                _wait(d, "return document.querySelector('[data-testid=whatif-button]')")
                t0 = time.perf_counter()
                d.execute_script("document.querySelector('[data-testid=whatif-button]').click()")
                _wait(d, "return document.querySelector('[data-testid=whatif]')")
                whatif_ms.append((time.perf_counter() - t0) * 1000)
            results["big_run_whatif_ms"] = round(statistics.median(whatif_ms), 1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    out = Path(folder) / "view.html"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "musubi_core.cli", "--db", db, "view", "--out",
                    str(out)], check=True, capture_output=True, cwd=ROOT)
    results["file_write_s"] = round(time.perf_counter() - started, 2)
    results["file_mb"] = round(out.stat().st_size / 1e6, 1)

    rows = [
        ("store", f"{results['store_calls']:,} calls in {results['store_runs']:,} runs"),
        ("runs page (served), navigation to table drawn", f"{results['runs_page_ms']:.0f} ms "
         f"median of {args.repeat} ({results['runs_listed']} runs listed)"),
        (f"large run ({results['big_run_calls']:,} calls), opened collapsed",
         f"{results['big_run_open_ms']:.0f} ms, {results['big_run_boxes']} boxes"),
        ("  one group expanded by a click", f"{results['big_run_expand_ms']:.0f} ms, "
         f"{results['big_run_boxes_expanded']} boxes"),
        ("  what-if on a model call", f"{results['big_run_whatif_ms']:.0f} ms"),
        ("musubi view --out (the file)", f"{results['file_write_s']} s, {results['file_mb']} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
