from tested_app.agent import run_agent


def test_the_agent_looks_up_the_weather() -> None:
    result = run_agent("What is the weather in Lisbon?")
    assert result.tool_calls == [("get_weather", {"city": "Lisbon"})]
    assert result.tool_results == ["21 C, sunny"]
    assert result.answer.strip()
