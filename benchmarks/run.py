#!/usr/bin/env python
"""Run musubi's benchmark suite: musubi beside its anchors, in one process and one run.

    pip install -r benchmarks/requirements.txt   # the anchors (benchmark env only)
    python benchmarks/run.py                     # full suite (~10 min; builds a 1M-node store once)
    python benchmarks/run.py --quick             # smoke test: < 1 min, correctness only

Cases are measured in small shuffled, interleaved blocks; figures are medians,
ratios are medians of within-round (paired) ratios. Every "hit" is asserted to
come from the cache. Budget misses are reported, never turned into a failure
(use ``--strict`` for that); a failed correctness assertion exits 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
for extra in (ROOT, ROOT / "integrations" / "langchain", ROOT / "integrations" / "llama_index"):
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from _env import Env, cpu_count  # noqa: E402
from _harness import Comparison, RatioRow, Row, Skip, fmt_time, run  # noqa: E402

MODULES = [
    "bench_langchain",
    "bench_store",
    "bench_step",
    "bench_durable",
    "bench_llama_index",
    "bench_cold",
    "bench_concurrency",
]

PACKAGES = [
    "musubi-lineage",
    "langchain-core",
    "langchain-community",
    "llama-index-core",
    "diskcache",
    "mundane-sdk",
    "musubito",
    "pydantic",
]


def install_requirements() -> None:
    req = HERE / "requirements.txt"
    print(f"installing anchors: {sys.executable} -m pip install -r {req}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", str(req)])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {cpu_count()} cores, {platform.system()} {platform.release()}"


def collect(env: Env, only: list[str]) -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # module not written (yet)
            raise
        for case in getattr(module, "CASES", []):
            label = f"{name.removeprefix('bench_')}.{case.__name__}"
            # "llama_index_query" (the comparison names in docs/benchmarks.md) selects
            # "llama_index.query_replay" as well as "llama_index.query" does.
            names = (label, label.replace(".", "_"))
            if only and not any(o in n for o in only for n in names):
                continue
            cases.append((label, case))
    return cases


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def print_comparison(comp: Comparison, rows: list[Row], ratios: list[RatioRow]) -> None:
    print(f"\n## {comp.title}")
    width = max(len(r.variant) for r in rows)
    for r in rows:
        unit = f"/{comp.unit}"
        print(
            f"  {r.variant:<{width}}  {fmt_time(r.median_us):>10}{unit}  ±{r.spread * 100:4.0f}%  {r.note}"
        )
    for q in ratios:
        verdict = ""
        if q.budget is not None:
            op = "<" if q.strict else "<="
            verdict = f"  budget {op} {q.budget:g}: {'MET' if q.met else 'NOT MET'}"
        print(f"  ratio {q.label}: {fmt_ratio(q.value)}{verdict}")
    sys.stdout.flush()


def markdown(results: list[dict[str, object]], meta: dict[str, object]) -> str:
    lines = [
        f"Run: {meta['date']} · machine: {meta['machine']} · mode: {meta['mode']} · "
        f"wall time {meta['seconds']:.0f} s",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),  # type: ignore[attr-defined]
        "",
        "| case | variant | median | ±IQR |",
        "|---|---|---:|---:|",
    ]
    for res in results:
        for r in res["rows"]:  # type: ignore[attr-defined]
            lines.append(
                f"| {res['name']} | {r['variant']} | {fmt_time(r['median_us'])}/{res['unit']} | "
                f"{r['spread'] * 100:.0f}% |"
            )
    lines += [
        "",
        "| case | ratio (paired median) | value | budget (DESIGN §11) |",
        "|---|---|---:|---|",
    ]
    for res in results:
        for q in res["ratios"]:  # type: ignore[attr-defined]
            budget = ""
            if q["budget"] is not None:
                op = "<" if q["strict"] else "≤"
                budget = f"{op} {q['budget']:g}: **{'met' if q['met'] else 'NOT met'}**"
            lines.append(f"| {res['name']} | {q['label']} | {fmt_ratio(q['value'])} | {budget} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: small sizes, few rounds (< 1 min)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run cases whose name contains this (repeatable)",
    )
    parser.add_argument(
        "--install", action="store_true", help="pip install benchmarks/requirements.txt first"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write results as JSON here")
    parser.add_argument(
        "--markdown", type=pathlib.Path, help="write the results tables (markdown) here"
    )
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when a budget ratio is not met"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    if args.install:
        install_requirements()
    # Anchors warn on every call (langchain-community's SQLiteCache does); printing
    # that would be timed. musubi's own warnings stay visible.
    warnings.simplefilter("ignore")
    warnings.filterwarnings("always", message="musubi")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    started = time.perf_counter()
    failures: list[str] = []
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="musubi-bench-") as tmp:
        env = Env(quick=args.quick, tmp=pathlib.Path(tmp))
        os.environ.setdefault("MUSUBI_DB", str(env.tmp / "default.db"))
        cases = collect(env, args.only)
        if args.list:
            for label, _ in cases:
                print(label)
            return 0
        meta: dict[str, object] = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "mode": "quick" if args.quick else "full",
            "versions": versions(),
            "seed": seed,
        }
        print(f"musubi benchmarks · {meta['mode']} · seed {seed}\n{meta['machine']}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))  # type: ignore[attr-defined]
        for label, case in cases:
            t0 = time.perf_counter()
            try:
                comp = case(env)  # type: ignore[operator]
                comps = comp if isinstance(comp, list) else [comp]
                for c in comps:
                    rows, ratios = run(c, rng=rng)
                    print_comparison(c, rows, ratios)
                    results.append(
                        {
                            "name": c.name,
                            "title": c.title,
                            "unit": c.unit,
                            "rows": [r.__dict__ for r in rows],
                            "ratios": [{**q.__dict__, "met": q.met} for q in ratios],
                        }
                    )
            except Skip as exc:
                print(f"\n## {label}: SKIPPED ({exc})")
                env.skipped.append(f"{label}: {exc}")
            except Exception:
                print(f"\n## {label}: FAILED")
                traceback.print_exc()
                failures.append(label)
            print(f"  ({label}: {time.perf_counter() - t0:.1f} s)", flush=True)
        meta["seconds"] = time.perf_counter() - started
        meta["skipped"] = env.skipped
    missed = [
        f"{res['name']}: {q['label']}"
        for res in results
        for q in res["ratios"]  # type: ignore[attr-defined]
        if q["met"] is False
    ]
    print(f"\ndone in {meta['seconds']:.1f} s; {len(results)} comparisons")
    if env.skipped:
        print("skipped: " + "; ".join(env.skipped))
    if missed:
        print("budget NOT met: " + "; ".join(missed))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(results, meta))
    if failures:
        print("correctness FAILED: " + ", ".join(failures))
        return 1
    if args.strict and missed:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
