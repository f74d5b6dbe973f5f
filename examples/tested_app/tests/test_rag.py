from tested_app.rag import DOCUMENTS, KeywordRetriever, answer, stream_answer

QUESTION = "Where does musubi keep its records?"


def test_the_retriever_finds_the_storage_document() -> None:
    docs = KeywordRetriever(documents=DOCUMENTS).invoke(QUESTION)
    assert "SQLite" in docs[0].page_content


def test_answer() -> None:
    text = answer(QUESTION)
    assert text.strip()
    assert "records" in text or "SQLite" in text


def test_streamed_answer() -> None:
    chunks = list(stream_answer(QUESTION))
    assert chunks and "".join(chunks).strip()
