"""A durable workflow: kill it (Ctrl-C or kill -9) while it sleeps, run it
again, and it resumes after the last committed step.

    python examples/durable_run.py /tmp/nightly.db
"""

from __future__ import annotations

import os
import sys
import tempfile

from musubi_core import Context, run


def workflow(ctx: Context) -> str:
    pages = [ctx.step(f"fetch-{i}", lambda i=i: f"page {i}") for i in range(3)]
    ctx.sleep("cool-off", "1s")  # a resumed run sleeps only what is left
    return ctx.step("report", lambda: f"{len(pages)} pages: {', '.join(pages)}")


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "run.db")
    print(run(path, workflow))
    print(f"inspect: musubi --db {path} steps default")
