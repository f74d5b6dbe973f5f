"""Every prompt of the app, in one place (a change here is what the test mode must catch)."""

RAG_SYSTEM = (
    "You answer questions about musubi. Use only the context below and answer in one "
    "sentence.\n\nContext:\n{context}"
)

PLANNER_SYSTEM = (
    "You plan how to answer a question about the weather. Call the tools you need; do not "
    "answer yet."
)

ANSWER_SYSTEM = "You write the final answer from the tool results, in one friendly sentence."

QA_TEMPLATE = (
    "Context information is below.\n---------------------\n{context_str}\n"
    "---------------------\nGiven only the context, answer the query in one sentence.\n"
    "Query: {query_str}\nAnswer: "
)

OUTLINE_PROMPT = "List three short points a beginner should know about {topic}."

DRAFT_PROMPT = "Write a short paragraph covering these points: {points}"
