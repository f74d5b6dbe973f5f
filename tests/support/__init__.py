"""Shared test support: a local OpenAI-compatible HTTP server and pytest fixtures."""

from tests.support.openai_server import ChatReply, OpenAIServer, RecordedRequest, ToolCall

__all__ = ["ChatReply", "OpenAIServer", "RecordedRequest", "ToolCall"]
