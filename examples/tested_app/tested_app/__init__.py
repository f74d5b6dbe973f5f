"""A small LLM application: a LangChain RAG chain, a tool-calling agent, a LlamaIndex query
engine and an ``@step`` pipeline, all talking to an OpenAI-compatible provider.

Configuration comes from the environment, as in any app: ``OPENAI_BASE_URL`` (the provider;
default OpenAI's), ``OPENAI_API_KEY``. Nothing here knows about testing: the suite in
``tests/`` runs it against a recording with ``pytest --musubi-mode=replay``.
"""
