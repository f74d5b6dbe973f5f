"""A small OpenAI-compatible HTTP server for tests (stdlib only).

It lets real provider client classes (``llama_index.llms.openai.OpenAI``,
``langchain_openai.ChatOpenAI``, ``OpenAIEmbedding`` ...) run end to end against
127.0.0.1, so tests can assert exactly how many requests reached the "provider".

Endpoints:

* ``POST /v1/chat/completions``: non-streaming and SSE streaming (with
  ``stream_options.include_usage``), tool calls, usage tokens.
* ``POST /v1/completions``: legacy completions (non-streaming and streaming).
* ``POST /v1/embeddings``: deterministic vectors from the text (hash-seeded), batch
  inputs (strings or token-id lists), ``encoding_format`` float or base64,
  ``dimensions``.
* ``GET /v1/models``.

Replies to chat requests come, in order of precedence, from a FIFO queue of
scripted replies (:meth:`OpenAIServer.enqueue_chat`), a rule function
(:meth:`OpenAIServer.set_chat_rule`), or a deterministic default derived from the
request messages (so equal requests get equal answers).

Offline note: ``langchain_openai.OpenAIEmbeddings`` tokenises with tiktoken (a network
download) unless built with ``check_embedding_ctx_length=False``; token-id inputs are
accepted anyway.

Example::

    with OpenAIServer() as server:
        server.enqueue_chat(ChatReply(tool_calls=[ToolCall("add", {"a": 1, "b": 2})]))
        llm = OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="test")
        ...
        assert server.count("chat") == 1
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ChatReply", "OpenAIServer", "RecordedRequest", "ToolCall", "deterministic_embedding"]

# Endpoint short names used by the request log / counters.
_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
    "/v1/models": "models",
    "/models": "models",
}


@dataclass
class ToolCall:
    """A tool call the fake model asks for. ``arguments`` may be a dict or a JSON string."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, sort_keys=True)


@dataclass
class ChatReply:
    """A scripted reply to one chat (or completion) request.

    ``status`` != 200 makes the server answer with an OpenAI-style error body
    (use 400 for non-retryable errors: clients retry 429/5xx).
    """

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int = 200
    error: str = "scripted error"
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    """One request the server received."""

    endpoint: str  # "chat", "completions", "embeddings", "models" or "other"
    method: str
    path: str
    body: Any
    headers: dict[str, str]
    time: float

    @property
    def stream(self) -> bool:
        return bool(isinstance(self.body, dict) and self.body.get("stream"))


ChatRule = Callable[[dict[str, Any]], "ChatReply | str | None"]


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def deterministic_embedding(text: str | list[int], dim: int = 8) -> list[float]:
    """A unit-ish vector derived from sha256 of the input: equal inputs, equal vectors."""
    raw = json.dumps(text) if not isinstance(text, str) else text
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.sha256(f"{counter}:{raw}".encode()).digest()
        for i in range(0, len(digest), 4):
            if len(out) == dim:
                break
            (n,) = struct.unpack("<I", digest[i : i + 4])
            out.append(round(n / 2**32 * 2 - 1, 6))
        counter += 1
    norm = sum(v * v for v in out) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in out]


class OpenAIServer:
    """Threaded OpenAI-compatible server bound to 127.0.0.1 on an ephemeral port.

    Thread-safe: the request log, counters and reply queue are guarded by a lock.
    ``delay_s`` adds latency to every request (benchmarks, examples).
    """

    def __init__(
        self,
        *,
        embedding_dim: int = 8,
        delay_s: float = 0.0,
        model: str = "gpt-4o-mini",
        port: int = 0,
    ):
        # ``port``: 0 picks a free one; a fixed port lets a test stop the server and start
        # another where its clients expect it.
        self.requested_port = port
        self.embedding_dim = embedding_dim
        self.delay_s = delay_s
        self.model = model
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._chat_queue: deque[ChatReply] = deque()
        self._chat_rule: ChatRule | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OpenAIServer:
        if self._httpd is not None:
            return self
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer(("127.0.0.1", self.requested_port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """Base URL including ``/v1`` (what OpenAI clients call ``base_url``/``api_base``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ scripting
    def enqueue_chat(self, *replies: ChatReply | str) -> None:
        """Queue replies for the next chat/completion requests (FIFO, one per request)."""
        with self._lock:
            for r in replies:
                self._chat_queue.append(ChatReply(content=r) if isinstance(r, str) else r)

    def set_chat_rule(self, rule: ChatRule | None) -> None:
        """``rule(request_body) -> ChatReply | str | None``; ``None`` falls back to the default."""
        with self._lock:
            self._chat_rule = rule

    def reset(self) -> None:
        """Clear the request log, the reply queue, the rule and the delay."""
        with self._lock:
            self._requests.clear()
            self._chat_queue.clear()
            self._chat_rule = None
            self.delay_s = 0.0

    def clear_log(self) -> None:
        """Clear only the request log (keeps queued replies and rule)."""
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ inspection
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, endpoint: str | None = None) -> int:
        """Number of requests to ``endpoint`` ("chat", "embeddings", ...) or in total."""
        with self._lock:
            if endpoint is None:
                return len(self._requests)
            return sum(1 for r in self._requests if r.endpoint == endpoint)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for r in self._requests:
                out[r.endpoint] = out.get(r.endpoint, 0) + 1
            return out

    @property
    def chat_count(self) -> int:
        return self.count("chat")

    @property
    def embedding_count(self) -> int:
        return self.count("embeddings")

    def embedded_texts(self) -> list[str | list[int]]:
        """Every input sent to /embeddings, flattened, in arrival order."""
        texts: list[str | list[int]] = []
        for r in self.requests:
            if r.endpoint == "embeddings" and isinstance(r.body, dict):
                texts.extend(_embedding_inputs(r.body.get("input")))
        return texts

    # ------------------------------------------------------------------ internals
    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def _next_reply(self, body: dict[str, Any]) -> ChatReply:
        with self._lock:
            if self._chat_queue:
                return self._chat_queue.popleft()
            rule = self._chat_rule
        if rule is not None:
            got = rule(body)
            if isinstance(got, str):
                return ChatReply(content=got)
            if got is not None:
                return got
        return ChatReply(content=self.default_reply(body))

    @staticmethod
    def default_reply(body: dict[str, Any]) -> str:
        """Deterministic answer: a digest of the request's messages/prompt + the last user text."""
        if "messages" in body:
            messages = body.get("messages") or []
            canon = json.dumps(messages, sort_keys=True)
            last = ""
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role") == "user":
                    last = _message_text(m)
                    break
        else:
            canon = json.dumps(body.get("prompt"), sort_keys=True)
            last = str(body.get("prompt") or "")
        digest = hashlib.sha256(canon.encode()).hexdigest()[:10]
        snippet = " ".join(last.split()[-6:])
        return f"answer-{digest}: {snippet}".strip()


def _embedding_inputs(inp: Any) -> list[str | list[int]]:
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list):
        if inp and all(isinstance(x, int) for x in inp):
            return [list(inp)]  # one tokenised input
        return [x if isinstance(x, str) else list(x) for x in inp]
    return []


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # silence stderr
            pass

        # -------------------------------------------------------------- plumbing
        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, status: int, message: str) -> None:
            self._send_json(
                status,
                {"error": {"message": message, "type": "invalid_request_error", "code": None}},
            )

        def _read_body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode("utf-8", "replace")

        def _endpoint(self) -> str:
            path = self.path.split("?", 1)[0].rstrip("/")
            return _ENDPOINTS.get(path, "other")

        def _log(self, body: Any) -> str:
            endpoint = self._endpoint()
            server._record(
                RecordedRequest(
                    endpoint=endpoint,
                    method=self.command,
                    path=self.path,
                    body=body,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    time=time.time(),
                )
            )
            if server.delay_s:
                time.sleep(server.delay_s)
            return endpoint

        # -------------------------------------------------------------- verbs
        def do_GET(self) -> None:
            endpoint = self._log(None)
            if endpoint == "models":
                self._send_json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": server.model,
                                "object": "model",
                                "created": 0,
                                "owned_by": "musubi-tests",
                            }
                        ],
                    },
                )
            else:
                self._send_error(404, f"unknown path {self.path}")

        def do_POST(self) -> None:
            body = self._read_body()
            endpoint = self._log(body)
            if not isinstance(body, dict):
                self._send_error(400, "body must be a JSON object")
                return
            try:
                if endpoint == "chat":
                    self._chat(body)
                elif endpoint == "completions":
                    self._completions(body)
                elif endpoint == "embeddings":
                    self._embeddings(body)
                else:
                    self._send_error(404, f"unknown path {self.path}")
            except (BrokenPipeError, ConnectionResetError):
                pass

        # -------------------------------------------------------------- chat
        def _chat(self, body: dict[str, Any]) -> None:
            reply = server._next_reply(body)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            if reply.status != 200:
                self._send_error(reply.status, reply.error)
                return
            model = str(body.get("model") or server.model)
            prompt_text = " ".join(
                _message_text(m) for m in body.get("messages") or [] if isinstance(m, dict)
            )
            content = reply.content
            if content is None and not reply.tool_calls:
                content = ""
            tool_calls = [
                {
                    "id": tc.id or f"call_{i}_{hashlib.sha256(tc.name.encode()).hexdigest()[:8]}",
                    "type": "function",
                    "function": {"name": tc.name, "arguments": tc.arguments_json()},
                }
                for i, tc in enumerate(reply.tool_calls)
            ]
            finish = reply.finish_reason or ("tool_calls" if tool_calls else "stop")
            usage = _usage(
                reply,
                prompt_text,
                (content or "") + "".join(t["function"]["arguments"] for t in tool_calls),
            )
            cid = (
                "chatcmpl-"
                + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
            )
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream(
                    _chat_chunks(cid, model, content, tool_calls, finish, usage, include_usage)
                )
                return
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            self._send_json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                    ],
                    "usage": usage,
                    "system_fingerprint": "fp_musubi_test",
                },
            )

        def _completions(self, body: dict[str, Any]) -> None:
            reply = server._next_reply(body)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            if reply.status != 200:
                self._send_error(reply.status, reply.error)
                return
            model = str(body.get("model") or server.model)
            text = reply.content or ""
            usage = _usage(reply, str(body.get("prompt") or ""), text)
            cid = (
                "cmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
            )
            finish = reply.finish_reason or "stop"
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

                def chunks() -> Iterator[dict[str, Any]]:
                    pieces = _split(text)
                    for i, piece in enumerate(pieces):
                        yield {
                            "id": cid,
                            "object": "text_completion",
                            "created": 0,
                            "model": model,
                            "choices": [
                                {
                                    "index": 0,
                                    "text": piece,
                                    "logprobs": None,
                                    "finish_reason": finish if i == len(pieces) - 1 else None,
                                }
                            ],
                        }
                    if include_usage:
                        yield {
                            "id": cid,
                            "object": "text_completion",
                            "created": 0,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }

                self._stream(chunks())
                return
            self._send_json(
                200,
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": usage,
                },
            )

        def _stream(self, chunks: Iterator[dict[str, Any]]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

        # -------------------------------------------------------------- embeddings
        def _embeddings(self, body: dict[str, Any]) -> None:
            inputs = _embedding_inputs(body.get("input"))
            if not inputs:
                self._send_error(400, "input must be a non-empty string or list")
                return
            dim = int(body.get("dimensions") or server.embedding_dim)
            b64 = body.get("encoding_format") == "base64"
            data = []
            tokens = 0
            for i, text in enumerate(inputs):
                vec = deterministic_embedding(text, dim)
                tokens += _words(text) if isinstance(text, str) else len(text)
                emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
                data.append({"object": "embedding", "index": i, "embedding": emb})
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": body.get("model", "text-embedding"),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )

    return Handler


def _usage(reply: ChatReply, prompt_text: str, completion_text: str) -> dict[str, int]:
    p = reply.prompt_tokens if reply.prompt_tokens is not None else _words(prompt_text)
    c = reply.completion_tokens if reply.completion_tokens is not None else _words(completion_text)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _split(text: str) -> list[str]:
    """Split text into stream pieces that concatenate back to exactly ``text``."""
    if not text:
        return [""]
    pieces: list[str] = []
    buf = ""
    for ch in text:
        buf += ch
        if ch == " ":
            pieces.append(buf)
            buf = ""
    if buf:
        pieces.append(buf)
    return pieces


def _chat_chunks(
    cid: str,
    model: str,
    content: str | None,
    tool_calls: list[dict[str, Any]],
    finish: str,
    usage: dict[str, int],
    include_usage: bool,
) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "system_fingerprint": "fp_musubi_test",
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }

    yield chunk({"role": "assistant", "content": ""})
    if content:
        for piece in _split(content):
            yield chunk({"content": piece})
    for i, tc in enumerate(tool_calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": tc["id"],
                        "type": "function",
                        "function": {"name": tc["function"]["name"], "arguments": ""},
                    }
                ]
            }
        )
        args = tc["function"]["arguments"]
        half = len(args) // 2
        for part in (args[:half], args[half:]):
            if part:
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]})
    yield chunk({}, finish)
    if include_usage:
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [],
            "usage": usage,
        }
