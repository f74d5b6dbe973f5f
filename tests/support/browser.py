"""The machine's Chromium, headless, driven with Selenium, with a guard on the network.

Chromium and its driver come from the machine's packages (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs where missing); nothing is downloaded. The
browser starts with its background networking off, and with every request it would send
beyond the loopback address routed to :class:`Tripwire`, a local proxy that answers 403 and
records it. :meth:`Browser.requests` reads the DevTools protocol's network events of the page
(every request the page made, whatever its address). A request that would leave 127.0.0.1
shows up in both.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

# Debian's /usr/bin/chromium is a wrapper script that exports Google API keys (sign-in and
# sync then call home); the browser itself is started without it.
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if os.path.exists(path):
            return path
    return shutil.which(name)


def unavailable() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not find(CHROMIUM, "chromium"):
        return "no Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    if not find(CHROMEDRIVER, "chromedriver"):
        return "no chromedriver: apt-get install chromium-driver (.ci/run does)"
    return None


class _TripwireHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _trip(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        body = b"musubi test tripwire: this request would have left 127.0.0.1\n"
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_CONNECT = do_HEAD = do_PUT = do_OPTIONS = _trip


class Tripwire(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A proxy on 127.0.0.1 that forwards nothing: it records each request sent to it."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a browser that hangs up on a 403 is no news

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TripwireHandler)
        self.seen: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@dataclass
class Browser:
    driver: Any
    tripwire: Tripwire
    _events: list[dict[str, Any]] = field(default_factory=list)

    def _drain(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self._events.append(message["params"])

    def requests(self) -> list[str]:
        """The address of every request the page made so far (DevTools network events)."""
        self._drain()
        return [e["request"]["url"] for e in self._events]

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


@contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[Browser]:
    """A headless Chromium (new profile, no background networking, requests beyond the
    loopback address sent to a tripwire), closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tripwire = Tripwire()
    profile = tempfile.mkdtemp(prefix="musubi-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = find(CHROMIUM, "chromium") or "chromium"
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
        "--disable-domain-reliability", "--disable-client-side-phishing-detection",
        "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
        "NetworkTimeServiceQuerying,DialMediaRouteProvider,InterestFeedContentSuggestions,"
        "PreconnectToSearch,NetworkPrediction,ChromeWhatsNewUI,PrivacySandboxSettings4",
        "--dns-prefetch-disable", "--disable-sync-preferences",
        "--no-pings", "--disable-search-engine-choice-screen", "--no-service-autorun",
        f"--user-data-dir={profile}", f"--window-size={width},{height}",
        # Everything not on the loopback address goes to the tripwire, never out.
        f"--proxy-server=http://{tripwire.address}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=find(CHROMEDRIVER, "chromedriver") or "chromedriver")
    # Selenium Manager (which could download a driver) stays off: the path is given.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield Browser(driver, tripwire)
    finally:
        driver.quit()
        tripwire.shutdown()
        tripwire.server_close()
        shutil.rmtree(profile, ignore_errors=True)
