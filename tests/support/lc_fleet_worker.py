"""One worker of the LangChain fleet tests (tests/langchain/test_lc_single_flight.py).

    python -m tests.support.lc_fleet_worker TARGET BASE_URL SEED PROMPTS_FILE

The same LangChain app in every worker: ``prompt | ChatOpenAI | StrOutputParser`` under
``instrument(TARGET, single_flight=True)``, the real OpenAI client pointed at the test
server. Prints ``ready``, waits for a line on stdin (every worker starts at once), asks every
prompt of PROMPTS_FILE (one a line) in its own order (SEED), and prints one JSON line: the
answers, the errors and the warnings it saw.
"""

from __future__ import annotations

import json
import random
import sys
import warnings


def main(target: str, base_url: str, seed: str, prompts_file: str) -> int:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    import musubi_langchain

    with open(prompts_file, encoding="utf-8") as fh:
        prompts = fh.read().splitlines()
    random.Random(int(seed)).shuffle(prompts)
    chat = ChatOpenAI(model="gpt-4o-mini", base_url=base_url, api_key="test", max_retries=0,
                      temperature=0)
    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | chat | StrOutputParser()
    print("ready", flush=True)
    sys.stdin.readline()
    answers: dict[str, str] = {}
    errors: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        musubi_langchain.instrument(target, single_flight=True)
        for question in prompts:
            try:
                answer = chain.invoke({"question": question})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if answers.setdefault(question, answer) != answer:
                errors.append(f"two answers to {question!r}")
        musubi_langchain.uninstrument()  # flushes what the recorder holds
    print(json.dumps({"answers": answers, "errors": errors,
                      "warnings": [str(w.message) for w in caught]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
