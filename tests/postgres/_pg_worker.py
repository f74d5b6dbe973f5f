"""One worker process of the PostgreSQL concurrency tests (run by test_postgres_concurrency).

    python -m tests.postgres._pg_worker DSN SCHEMA MODE SEED BATCHES IDS_FILE

Opens its own PostgresStore, prints ``ready``, waits for a line on stdin (so that every worker
starts at once), then sends BATCHES batches over the node ids in IDS_FILE (one a line), each in
its own random order: ``replays`` adds one replay count per id (``add_replays``), ``writes``
upserts every node (one execution each) with an artifact and a data edge to the next id
(``write``). Prints one JSON line: batches sent, batches failed (with their errors) and how
many transactions the store retried.
"""

from __future__ import annotations

import json
import random
import sys
import time

from musubi_core.errors import MusubiError
from musubi_core.store import ArtifactWrite, EdgeWrite, NodeWrite
from musubi_core.store.postgres import PostgresStore


def main(argv: list[str]) -> int:
    dsn, schema, mode, seed, batches, ids_file = argv
    with open(ids_file, encoding="utf-8") as fh:
        ids = fh.read().split()
    following = dict(zip(ids, ids[1:] + ids[:1], strict=True))
    rng = random.Random(int(seed))
    store = PostgresStore(dsn, schema=schema)
    print("ready", flush=True)
    sys.stdin.readline()
    failed: list[str] = []
    for _ in range(int(batches)):
        order = ids[:]
        rng.shuffle(order)
        try:
            if mode == "replays":
                store.add_replays({node_id: 1 for node_id in order}, time.time())
            else:
                store.write(
                    [
                        NodeWrite(n, "op", "op", "step", "deterministic", "h" + n, "done", "a" + n)
                        for n in order
                    ],
                    [ArtifactWrite("a" + n, "json", n.encode(), n) for n in order],
                    [EdgeWrite(n, following[n]) for n in order],
                )
        except MusubiError as err:
            failed.append(str(err))
    print(
        json.dumps({"batches": int(batches), "failed": failed, "retries": getattr(store, "retries", None)}),
        flush=True,
    )
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
