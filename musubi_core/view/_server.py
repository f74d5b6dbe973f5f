"""``musubi view --serve``: the page on 127.0.0.1, answering its questions from the store as
the person clicks.

Read only and local: it listens on the loopback address only, answers GET and HEAD only
(anything else is 405), and only to requests addressed to it by that address or
``localhost`` (a page elsewhere that renamed itself to 127.0.0.1 through DNS gets 403). The
store is read on one thread (its connections are per thread); requests are accepted on many,
so a browser's idle spare connection never holds up another request.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from ..errors import MusubiError, NodeNotFoundError
from ._data import NotFound

__all__ = ["HOST", "ViewServer"]

HOST = "127.0.0.1"

_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class ViewServer(ThreadingHTTPServer):
    """Serves ``page()`` at ``/`` and ``ask(path)`` at ``/api/PATH`` on 127.0.0.1:``port``
    (0: any free port; :attr:`url` says which)."""

    daemon_threads = True

    def __init__(self, page: Callable[[], str], ask: Callable[[str], Any], port: int = 0,
                 csp: str | None = None) -> None:
        self.page = page
        self.ask = ask
        self.csp = csp
        # One thread reads the store; the request threads hand it their questions.
        self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="musubi-view")
        self.requests_served = 0
        self._count_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def server_close(self) -> None:
        super().server_close()
        self.reader.shutdown(wait=True)


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints the URL
        pass

    def _send(self, status: int, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        if self.server.csp:
            self.send_header("Content-Security-Policy", self.server.csp)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        self._send(status, message.encode() + b"\n", "text/plain; charset=utf-8", extra)

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        port = self.server.port
        return host in {f"{HOST}:{port}", f"localhost:{port}"}

    def do_GET(self) -> None:
        with self.server._count_lock:
            self.server.requests_served += 1
        if not self._host_ok():
            self._text(403, "musubi view answers requests to 127.0.0.1 or localhost only")
            return
        path = self.path.split("#", 1)[0]
        if path in ("/", "/index.html"):
            html = self.server.reader.submit(self.server.page).result()
            self._send(200, html.encode("utf-8"), "text/html; charset=utf-8")
            return
        if not path.startswith("/api/"):
            self._text(404, "not found")
            return
        question = unquote(path[len("/api/"):])
        try:
            result = self.server.reader.submit(self.server.ask, question).result()
        except (NotFound, NodeNotFoundError) as err:
            self._text(404, str(err))
            return
        except (MusubiError, ValueError) as err:
            self._text(400, str(err))
            return
        body = json.dumps(result, separators=(",", ":"), default=str).encode("utf-8")
        self._send(200, body, "application/json")

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._text(405, "musubi view is read only: GET and HEAD only", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_CONNECT = do_TRACE = _refuse
