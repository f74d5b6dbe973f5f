"""The LlamaIndex adapter serves a stored output only if it hashes to its content id.

An LLM answer, an embedding or a key/value entry edited in the store file (into another value
the decoder accepts) is a miss with one warning; the call goes to the provider (or, for the
key/value store, the caller computes and puts it again) and the fresh record repairs the store,
so the next call replays the right value.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from llama_index.core.llms import ChatMessage

from musubi_llama_index import MusubiKVStore, instrument
from tests.support.openai_server import OpenAIServer
from tests.support.storedb import rows
from tests.support.tamper import edit_payload, payload_of

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _artifact(db: str, op_name: str) -> str:
    found = rows(
        db,
        "SELECT artifact_id FROM musubi_nodes WHERE op_name LIKE ? AND status = 'done'",
        (op_name + "%",),
    )
    assert len(found) == 1, found
    return str(found[0][0])


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if "musubi" in str(w.message)]


def test_edited_llm_answer_is_a_miss(openai_server: OpenAIServer, db_path: str, llm: Any) -> None:
    inst = instrument(db_path, llm=llm)
    msgs = [ChatMessage(role="user", content="What does musubi mean?")]
    answer = llm.chat(msgs).message.content
    assert answer and openai_server.count("chat") == 1
    inst.flush()
    art = _artifact(db_path, "llama_index.llm.chat")
    original = payload_of(db_path, art)
    edit_payload(db_path, art, original.replace(answer.encode(), b"a kind of rice ball"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = llm.chat(msgs).message.content
    assert again == answer and openai_server.count("chat") == 2
    assert len(_ours(caught)) == 1 and "content id" in str(_ours(caught)[0].message)

    inst.flush()
    assert b"rice ball" not in payload_of(db_path, _artifact(db_path, "llama_index.llm.chat"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert llm.chat(msgs).message.content == answer
    assert openai_server.count("chat") == 2


def test_edited_embedding_is_a_miss(
    openai_server: OpenAIServer, db_path: str, embed_model: Any
) -> None:
    inst = instrument(db_path, embed_model=embed_model)
    text = "Musubi is the Japanese word for a knot."
    vector = embed_model.get_text_embedding(text)
    assert openai_server.count("embeddings") == 1
    inst.flush()
    art = _artifact(db_path, "llama_index.embedding")
    original = payload_of(db_path, art)
    edited = json.loads(original)  # [{"$float": "0.12..."}, ...]: floats keep their exact text
    assert [float(v["$float"]) for v in edited] == vector
    edited[0] = {"$float": repr(vector[0] + 1.0)}
    edit_payload(db_path, art, json.dumps(edited, separators=(",", ":")).encode())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = embed_model.get_text_embedding(text)
    assert again == vector and openai_server.count("embeddings") == 2
    assert len(_ours(caught)) == 1 and "content id" in str(_ours(caught)[0].message)

    inst.flush()
    assert payload_of(db_path, art) == original  # the same vector: the same artifact, repaired
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert embed_model.get_text_embedding(text) == vector
    assert openai_server.count("embeddings") == 2


def test_edited_kv_entry_is_a_miss(db_path: str) -> None:
    kv = MusubiKVStore(db_path)
    kv.put("doc-1", {"hash": "3f2a", "nodes": [1, 2]})
    art = _artifact(db_path, "llama_index.kv:default/")
    original = payload_of(db_path, art)
    edit_payload(db_path, art, original.replace(b"3f2a", b"0000"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kv.get("doc-1") is None  # a miss: the caller computes the entry again
        assert kv.get_all() == {}
    assert len(_ours(caught)) == 1 and "content id" in str(_ours(caught)[0].message)

    kv.put("doc-1", {"hash": "3f2a", "nodes": [1, 2]})
    assert payload_of(db_path, art) == original
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert kv.get("doc-1") == {"hash": "3f2a", "nodes": [1, 2]}
        assert kv.get_all() == {"doc-1": {"hash": "3f2a", "nodes": [1, 2]}}
    # Another process (a new store object) reads the repaired entry too.
    assert MusubiKVStore(db_path).get("doc-1") == {"hash": "3f2a", "nodes": [1, 2]}
