#!/usr/bin/env python
"""musubi on PostgreSQL, in one run on one server: the LangChain cache hit against
``langchain_community``'s ``SQLAlchemyCache`` on the same server, and PostgreSQL against SQLite
(lookup and write latency, 8- and 16-worker hit throughput), as ratios.

    python benchmarks/bench_postgres.py               # starts a private PostgreSQL cluster
    python benchmarks/bench_postgres.py --dsn DSN     # or uses a server you name
    python benchmarks/bench_postgres.py --quick       # smoke test: correctness, small counts

Needs ``pip install -e ".[dev]"`` (langchain-community and SQLAlchemy are dev extras) and,
without --dsn, the PostgreSQL server binaries (``apt-get install postgresql``). Latencies are
medians over interleaved rounds; every hit is asserted to come from the cache (the model's
call count does not move).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", category=DeprecationWarning)

LLM_STRING = "[('_type', 'bench-chat'), ('model_name', 'bench-model'), ('temperature', 0.0)]"


def _generations(text: str) -> list[Any]:
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration

    return [ChatGeneration(message=AIMessage(content=text))]


def _prompt(i: int) -> str:
    # What LangChain passes a chat model's cache: the dumped messages.
    from langchain_core.load import dumps
    from langchain_core.messages import HumanMessage

    return dumps([HumanMessage(content=f"benchmark question {i}")])


def musubi_cache(target: str) -> Any:
    from musubi_langchain import MusubiCache

    return MusubiCache(target)


def sqlalchemy_cache(url: str) -> Any:
    from langchain_community.cache import SQLAlchemyCache
    from sqlalchemy import create_engine

    return SQLAlchemyCache(create_engine(url.replace("postgresql://", "postgresql+psycopg://")))


def _timed(fn: Any, n: int) -> float:
    """Median seconds of one call of ``fn`` over ``n`` calls (timed in blocks of 10)."""
    samples = []
    for _ in range(max(1, n // 10)):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        samples.append((time.perf_counter() - t0) / 10)
    return statistics.median(samples)


def _model(cache: Any) -> Any:
    """A chat model that counts how often it really runs (a hit must not run it)."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class CountingChat(BaseChatModel):
        calls: int = 0

        @property
        def _llm_type(self) -> str:
            return "bench-counting"

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                      **kw: Any) -> Any:
            self.calls += 1
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content="answer"))])

    return CountingChat(cache=cache)


def latencies(pg_url: str, sqlite_path: str, sa_url: str, n: int, rounds: int) -> dict[str, Any]:
    caches = {
        "musubi_pg": musubi_cache(pg_url),
        "musubi_sqlite": musubi_cache(sqlite_path),
        "sqlalchemy_pg": sqlalchemy_cache(sa_url),
    }
    prompt = _prompt(0)
    models = {}
    for name, cache in caches.items():
        cache.update(prompt, LLM_STRING, _generations("stored"))
        assert cache.lookup(prompt, LLM_STRING)[0].message.content == "stored", name
        model = _model(cache)
        model.invoke("benchmark question")  # the one execution; every later call is a hit
        models[name] = model
    written = iter(range(1, 10**9))
    results: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved: each case sees the same machine state
        for name, cache in caches.items():
            results.setdefault(f"lookup_hit/{name}", []).append(
                _timed(lambda c=cache: c.lookup(prompt, LLM_STRING), n)
            )
            results.setdefault(f"invoke_hit/{name}", []).append(
                _timed(lambda m=models[name]: m.invoke("benchmark question"), n)
            )
            if name.startswith("musubi"):
                results.setdefault(f"write/{name}", []).append(_timed(
                    lambda c=cache: c.update(_prompt(next(written)), LLM_STRING,
                                             _generations("new")), max(10, n // 5)))
    for name, model in models.items():
        assert model.calls == 1, f"{name}: the model ran {model.calls} times (hits must not)"
    for name, cache in caches.items():
        if name.startswith("musubi"):
            cache.engine.close()
        else:
            cache.engine.dispose()
    return {k: statistics.median(v) for k, v in results.items()}


def _worker(target: str, hits: int, start: Any, out: Any) -> None:
    cache = musubi_cache(target)
    prompts = [_prompt(i) for i in range(20)]
    for p in prompts:
        assert cache.lookup(p, LLM_STRING) is not None
    start.wait()
    t0 = time.perf_counter()
    for i in range(hits):
        assert cache.lookup(prompts[i % 20], LLM_STRING) is not None
    out.put((t0, time.perf_counter(), hits))
    cache.engine.close()


def throughput(target: str, workers: int, hits: int) -> float:
    """Hits per second of ``workers`` processes looking up (all hits) on one store."""
    cache = musubi_cache(target)
    for i in range(20):
        cache.update(_prompt(i), LLM_STRING, _generations(f"answer {i}"))
    cache.engine.close()
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(target, hits, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    first, last = min(r[0] for r in reports), max(r[1] for r in reports)
    return sum(r[2] for r in reports) / (last - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to use (default: a private cluster)")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke test)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    from tests.support.postgres import fresh_database, start_server

    server = None
    dsn = args.dsn
    if dsn is None:
        server = start_server()
        if server is None:
            print("no PostgreSQL server binaries: pass --dsn", file=sys.stderr)
            return 2
        dsn = server.dsn
    n, rounds, hits = (50, 2, 200) if args.quick else (1000, 5, 3000)
    try:
        folder = tempfile.mkdtemp(prefix="musubi-bench-pg-")
        lat = latencies(fresh_database(dsn), os.path.join(folder, "lat.db"),
                        fresh_database(dsn), n, rounds)
        tput: dict[str, float] = {}
        for workers in (8, 16):
            tput[f"pg/{workers}"] = throughput(fresh_database(dsn), workers, hits)
            tput[f"sqlite/{workers}"] = throughput(
                os.path.join(folder, f"t{workers}.db"), workers, hits
            )
    finally:
        if server is not None:
            server.stop()
    ratios = {
        "musubi_pg_hit / sqlalchemy_pg_hit (lookup)":
            lat["lookup_hit/musubi_pg"] / lat["lookup_hit/sqlalchemy_pg"],
        "musubi_pg_hit / sqlalchemy_pg_hit (invoke)":
            lat["invoke_hit/musubi_pg"] / lat["invoke_hit/sqlalchemy_pg"],
        "pg / sqlite lookup latency": lat["lookup_hit/musubi_pg"] / lat["lookup_hit/musubi_sqlite"],
        "pg / sqlite write latency": lat["write/musubi_pg"] / lat["write/musubi_sqlite"],
        "pg / sqlite throughput, 8 workers": tput["pg/8"] / tput["sqlite/8"],
        "pg / sqlite throughput, 16 workers": tput["pg/16"] / tput["sqlite/16"],
    }
    print(f"{'case':48} {'value':>14}")
    for key, value in lat.items():
        print(f"{key:48} {value * 1e6:11.1f} us")
    for key, value in tput.items():
        print(f"{'hits/s ' + key + ' workers':48} {value:14,.0f}")
    for key, value in ratios.items():
        print(f"{key:48} {value:13.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"latency_s": lat, "hits_per_s": tput, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
