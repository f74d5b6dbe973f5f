"""Running ``examples/tested_app``'s suite in a subprocess against the local test server.

The provider is :class:`~tests.support.openai_server.OpenAIServer` on a fixed port (a stopped
server's clients fail to connect; a restarted one is where they expect it). Its chat rule plays
a tool-calling provider: a request offering tools gets a ``get_weather`` call for the city in
the question, under a fresh random tool-call id every time (as real providers do); any other
request gets the server's deterministic answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.openai_server import ChatReply, OpenAIServer, ToolCall

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "tested_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def provider_rule(body: dict[str, Any]) -> ChatReply | None:
    """Tool calls with random ids for requests that offer tools (and have no results yet)."""
    messages = body.get("messages") or []
    answered = any(isinstance(m, dict) and m.get("role") == "tool" for m in messages)
    if body.get("tools") and not answered:
        found = re.search(r"in ([A-Z][a-z]+)", _last_user_text(body))
        city = found.group(1) if found else "Lisbon"
        call_id = "call_" + uuid.uuid4().hex[:24]
        return ChatReply(tool_calls=[ToolCall("get_weather", {"city": city}, id=call_id)])
    return None


def provider(port: int) -> OpenAIServer:
    server = OpenAIServer(port=port)
    server.set_chat_rule(provider_rule)
    return server


def copy_app(dest: Path) -> Path:
    """A copy of the app and its suite (so a test may edit a prompt)."""
    target = dest / "tested_app"
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("__pycache__", ".musubi", "*.db"))
    return target


def edit_prompt(app: Path, old: str, new: str) -> None:
    prompts = app / "tested_app" / "prompts.py"
    text = prompts.read_text(encoding="utf-8")
    assert old in text, f"{old!r} is not in {prompts}"
    prompts.write_text(text.replace(old, new), encoding="utf-8")


@dataclass
class SuiteRun:
    proc: subprocess.CompletedProcess[str]
    report: dict[str, Any] | None

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    @property
    def passed(self) -> bool:
        return self.proc.returncode == 0


def run_suite(
    app: Path,
    port: int,
    *args: str,
    key: str | None = "sk-test-key-for-the-local-server",
    extra_env: dict[str, str] | None = None,
    report: Path | None = None,
) -> SuiteRun:
    """``python -m pytest`` in ``app`` (its own rootdir and config), provider on ``port``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MUSUBI_DB", "MUSUBI_MODE", "OPENAI_API_KEY", "PYTEST_ADDOPTS")}
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    if key is not None:
        env["OPENAI_API_KEY"] = key
    env.update(extra_env or {})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args]
    if report is not None:
        command += ["--musubi-report", str(report)]
    proc = subprocess.run(
        command, cwd=app, env=env, capture_output=True, text=True, timeout=600
    )
    data = json.loads(report.read_text()) if report is not None and report.exists() else None
    return SuiteRun(proc, data)
