"""A synthetic store for measuring ``musubi view``: many small RAG-shaped runs (a chain, its
retriever, a prompt, a model call reaching a node, a parser; half of them replays of the
others) over 30 days, and one large run (a pipeline of document batches: embeddings, a
retrieval, model calls and tools under each batch), written straight through the store's
``write`` in large transactions.

    python benchmarks/view_store.py STORE.db --calls 100000 --big-run 5000
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from musubi_core import SQLiteStore  # noqa: E402
from musubi_core.store.base import (  # noqa: E402
    CallWrite,
    EdgeWrite,
    FlowWrite,
    NodeWrite,
    RunWrite,
)

DAY = 86_400.0
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-20241022")
SMALL_RUN = 6  # calls per small run


def _id(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class _Writer:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.calls: list[CallWrite] = []
        self.flows: list[FlowWrite] = []
        self.nodes: list[NodeWrite] = []
        self.edges: list[EdgeWrite] = []
        self.runs: list[RunWrite] = []

    def call(self, run: str, seq: int, parent: str | None, kind: str, op: str, start: float,
             node: str | None = None, replayed: int = 0, tokens: tuple[int, int] | None = None,
             model: str | None = None, took: float = 0.01) -> str:
        call_id = f"{run}{seq:08x}"
        self.calls.append(CallWrite(
            call_id, run, parent, seq, kind, op, node, None, replayed, "done", None, start,
            0.0005 if replayed else took, tokens[0] if tokens else None,
            tokens[1] if tokens else None, took if replayed else None, model,
            f"input of {op} #{seq}", f"output of {op} #{seq}", "default",
        ))
        return call_id

    def node(self, node_id: str, kind: str, op: str, start: float, tokens: tuple[int, int] | None,
             took: float) -> None:
        self.nodes.append(NodeWrite(
            node_id, op + ":v1", op, kind, "deterministic", node_id[:32], "done", None,
            "default", start, start + took, None, took, tokens[0] if tokens else None,
            tokens[1] if tokens else None,
        ))

    def flush(self, force: bool = False) -> None:
        if force or len(self.calls) >= 20_000:
            self.store.write(self.nodes, (), self.edges, calls=self.calls, flows=self.flows,
                             runs=self.runs)
            self.calls, self.flows, self.nodes, self.edges, self.runs = [], [], [], [], []


def _small_run(w: _Writer, i: int, start: float) -> int:
    """One RAG-shaped run; odd runs replay the model call of the run before them."""
    run = f"{i + 1:016x}"
    replay = i % 2
    model = MODELS[(i // 2) % len(MODELS)]
    tokens = (400 + (i // 2) % 300, 60 + (i // 2) % 90)
    node = _id("chat", i // 2)
    root = w.call(run, 0, None, "chain", "RunnableSequence", start, took=1.2)
    ret = w.call(run, 1, root, "retriever", "KnowledgeBase", start + 0.01, took=0.05)
    prompt = w.call(run, 2, root, "chain", "ChatPromptTemplate", start + 0.06)
    chat = w.call(run, 3, root, "chat_model", "ChatOpenAI", start + 0.07, node=node,
                  replayed=replay, tokens=tokens, model=model, took=1.1)
    parser = w.call(run, 4, root, "chain", "StrOutputParser", start + 1.17)
    fmt = w.call(run, 5, root, "chain", "format_docs", start + 0.055)
    w.flows += [FlowWrite(fmt, ret), FlowWrite(prompt, fmt), FlowWrite(chat, prompt),
                FlowWrite(parser, chat)]
    if not replay:
        w.node(node, "chat_model", "chat_model:ChatOpenAI", start, tokens, 1.1)
    saved = tokens[0] + tokens[1] if replay else 0
    w.runs.append(RunWrite(run, "langchain", "RunnableSequence", "done", start, start + 1.2,
                           1.2, "bench", 1, None, "default", root, SMALL_RUN, replay,
                           tokens[0], tokens[1], saved, 1.1 if replay else 0.0))
    return SMALL_RUN


def _big_run(w: _Writer, calls: int, start: float) -> tuple[str, int]:
    """A pipeline of batches of 100 calls: a splitter, 60 embeddings, a retrieval, 30 model
    calls (each fed by the retrieval and by two embeddings' nodes), 8 tools."""
    run = "b16" + "0" * 13  # hex, like every run id
    seq = 0
    root = w.call(run, seq, None, "workflow", "nightly_pipeline", start, took=600.0)
    t = start
    prev_chat: str | None = None
    tokens_in = tokens_out = 0
    for batch in range(max(1, round((calls - 1) / 100))):
        seq += 1
        parent = w.call(run, seq, root, "chain", f"document_batch[{batch}]", t, took=5.0)
        seq += 1
        split = w.call(run, seq, parent, "chain", "TokenTextSplitter", t)
        embeds = []
        for k in range(60):
            seq += 1
            node = _id("emb", batch, k)
            embeds.append((w.call(run, seq, parent, "embedding", "OpenAIEmbedding", t,
                                  node=node, took=0.02), node))
            w.node(node, "embedding", "embedding:OpenAIEmbedding", t, None, 0.02)
            w.flows.append(FlowWrite(embeds[-1][0], split))
            t += 0.02
        seq += 1
        ret = w.call(run, seq, parent, "retriever", "VectorIndexRetriever", t)
        w.flows += [FlowWrite(ret, e) for e, _ in embeds[:5]]
        for k in range(30):
            seq += 1
            node = _id("big-chat", batch, k)
            chat = w.call(run, seq, parent, "chat_model", "ChatOpenAI", t, node=node,
                          tokens=(900, 120), model="gpt-4o-mini", took=1.3)
            w.node(node, "chat_model", "chat_model:ChatOpenAI", t, (900, 120), 1.3)
            tokens_in, tokens_out = tokens_in + 900, tokens_out + 120
            w.flows.append(FlowWrite(chat, ret))
            for _e_call, e_node in embeds[2 * k % 60: 2 * k % 60 + 2]:
                w.edges.append(EdgeWrite(e_node, node, "data"))
            if prev_chat is not None and k == 0:
                w.edges.append(EdgeWrite(prev_chat, node, "data"))
            prev_chat = node
            t += 1.3
        for _ in range(8):
            seq += 1
            tool = w.call(run, seq, parent, "tool", "lookup_customer", t, took=0.2)
            w.flows.append(FlowWrite(tool, chat))
            t += 0.2
        w.flush()
    total = seq + 1
    w.runs.append(RunWrite(run, "workflow", "nightly_pipeline", "done", start, t, t - start,
                           "bench", 1, None, "default", root, total, 0, tokens_in, tokens_out, 0, 0.0))
    return run, total


def build_store(path: str, *, calls: int = 100_000, runs: int | None = None,
                big_run_calls: int = 5_000) -> str:
    """Write the synthetic store at ``path``; return the large run's id."""
    store = SQLiteStore(path)
    try:
        w = _Writer(store)
        start = time.time() - 30 * DAY
        big, written = _big_run(w, big_run_calls, start + 15 * DAY)
        left = calls - written
        count = runs if runs is not None else max(0, -(-left // SMALL_RUN))
        for i in range(count):
            _small_run(w, i, start + (i / max(count, 1)) * 30 * DAY)
            w.flush()
        w.flush(force=True)
    finally:
        store.close()
    return big


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--big-run", type=int, default=5_000)
    args = parser.parse_args()
    started = time.perf_counter()
    big = build_store(args.path, calls=args.calls, big_run_calls=args.big_run)
    print(f"wrote {args.path} in {time.perf_counter() - started:.1f}s; large run {big}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
