from tested_app.pipeline import report


def test_report() -> None:
    result = report("tide pools")
    assert len(result["points"]) >= 1
    assert result["words"] == len(str(result["draft"]).split()) > 0
