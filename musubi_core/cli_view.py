"""``musubi view``: the store in a browser, as a file or served on 127.0.0.1.

    $ musubi view                                  # writes musubi-view.html: open it
    $ musubi view --run 5c1e0f7a --out run.html    # one run's page
    $ musubi view --serve                          # http://127.0.0.1:8765/ until Ctrl-C
    $ musubi view --serve --port 0 --prices my-prices.toml

The page needs no network: every script and style is in it. A file carries the store's runs,
its savings, and the details of the run named by ``--run`` (else of the newest runs, up to
3,000 calls); a served page reads the store as you click, read only. Money comes from a
price table (``--prices FILE`` or ``$MUSUBI_PRICES`` over musubi's dated default table).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ._cli import EXIT_OK, AddCommand, db_path
from .engine import Engine
from .errors import ConfigError, MusubiError
from .prices import ENV, load_prices
from .store import SQLiteStore, is_postgres_target, open_store

__all__ = ["DEFAULT_OUT", "DEFAULT_PORT", "add_commands", "add_prices_argument", "cmd_view"]

DEFAULT_OUT = "musubi-view.html"
DEFAULT_PORT = 8765


def add_prices_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prices", default=None, metavar="FILE",
        help=f"a TOML price table (US dollars per million tokens per model) laid over "
        f"musubi's default one (default: ${ENV})",
    )


def add_commands(add: AddCommand) -> None:
    view = add("view", cmd_view,
               "the store in a browser: runs, a run's graph, a call's details, what-if, savings")
    view.add_argument("--run", metavar="RUN", help="open on this run (id or unique prefix)")
    target = view.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="FILE.html",
                        help=f"write the page to this file (default: {DEFAULT_OUT})")
    target.add_argument("--serve", action="store_true",
                        help="serve the page on 127.0.0.1, read only, until Ctrl-C")
    view.add_argument("--port", type=int, default=None,
                      help=f"with --serve: the port (default {DEFAULT_PORT}; 0 picks a free one)")
    view.add_argument("--limit", type=int, default=500, help="list at most this many runs")
    add_prices_argument(view)


def _open_read_only(args: argparse.Namespace) -> Engine:
    path = db_path(args)
    if is_postgres_target(path):
        return Engine(open_store(path))
    if not os.path.exists(path):
        raise MusubiError(f"no musubi store at {path}; pass --db PATH or set MUSUBI_DB")
    return Engine(SQLiteStore(path, read_only=True))


def cmd_view(args: argparse.Namespace) -> int:
    from .view import ViewData, answer, build_page, content_security_policy, page_html
    from .view._server import ViewServer

    if args.port is not None and not args.serve:
        raise ConfigError("--port goes with --serve", target=str(args.port))
    prices = load_prices(args.prices)
    limit = max(1, int(args.limit))
    with _open_read_only(args) as engine:
        data = ViewData(engine, prices)
        run_id = engine.store.resolve_run(args.run) if args.run else None
        if not args.serve:
            out = args.out or DEFAULT_OUT
            html = build_page(data, run_id=run_id, limit=limit)
            with open(out, "w", encoding="utf-8") as fh:
                fh.write(html)
            print(f"wrote {out} ({len(html.encode()) / 1e6:.1f} MB): open it in a browser "
                  "(it needs no network)")
            return EXIT_OK
        page = page_html({"mode": "serve", "answers": {}, "focus": run_id})
        port = DEFAULT_PORT if args.port is None else args.port
        try:
            server = ViewServer(lambda: page, lambda q: _ask(data, answer, q), port,
                                content_security_policy())
        except OSError as err:
            raise MusubiError(f"cannot listen on 127.0.0.1:{port}: {err.strerror or err}; "
                              "pass --port N (0 picks a free port)") from None
        url = server.url + (f"#run/{run_id}" if run_id else "")
        print(f"serving {url} (read only; Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        print("stopped", file=sys.stderr)
    return EXIT_OK


def _ask(data: Any, answer: Any, question: str) -> Any:
    return answer(data, question)
