"""The run summary in the terminal: errors and their fix hints are printed whole."""

from __future__ import annotations

from lmflow.engine.records import RunResult, StepRecord
from lmflow.errors import StepFailure
from lmflow.render.report import footer, table

# 300 characters; the fix is at the end, as in every lmflow message
HINT = ("LM Studio not reachable at http://127.0.0.1:1234 (connection refused after 3 attempts "
        "over 7.25 s; the breaker skips model worker for 300 s): start LM Studio's server "
        "(`lms server start`) or fix server.url, or give the model a fallback link "
        "so the step still gets an answer while it is down: zanzibar")


def failed_run() -> RunResult:
    failure = StepFailure(step="extract", error_type="BackendUnreachable", message=HINT, attempts=3)
    return RunResult(spec="s.yaml", name="s", run_id="s-1", steps=[
        StepRecord("extract", "prompt", status="failed", seconds=7.5, attempts=3, error=failure),
        StepRecord("reply", "prompt", status="skipped", reason="upstream failed: extract"),
    ], record_path="/tmp/s-1.json")


def words(text: str) -> str:
    return " ".join(text.split())


def test_table_and_error_list_print_a_long_error_whole_and_wrapped() -> None:
    result = failed_run()
    shown = table(result, width=80)
    listed = footer(result, width=80)
    assert "…" not in shown + listed
    assert words(HINT) in words(shown)
    assert words(HINT) in words(listed)
    # wrapped at spaces under its column, never past the width
    lines = shown.splitlines()
    assert all(len(line) <= 80 for line in lines + listed.splitlines())
    column = lines[0].index("result")
    assert lines[2].startswith("extract") and len(lines[3]) - len(lines[3].lstrip()) == column
    assert "http://127.0.0.1:1234" in shown  # words, such as a URL, are never broken
    assert lines[-1].split() == "reply prompt skipped 0.00s no upstream failed: extract".split()


def test_a_short_error_stays_on_its_row() -> None:
    result = failed_run()
    result.steps[0].error.message = "connection refused: start LM Studio"
    assert table(result, width=80).splitlines()[2].endswith(": start LM Studio")
    listed = footer(result, width=80).splitlines()
    assert "  extract attempt 3: BackendUnreachable: connection refused: start LM Studio" in listed


def test_runs_counts_answers_from_either_cache() -> None:
    from lmflow.render.history import Run, runs_table

    rows = [{"step": "a", "status": "cached", "cached": "step"},
            {"step": "b", "status": "completed", "cached": "answer"},
            {"step": "c", "status": "completed", "cached": "answer"},
            {"step": "d", "status": "failed", "cached": "no"}]
    run = Run(id="1", name="r-1", spec="r", state="Failed", start=None, end=None, version={},
              parameters={}, ui_url="", steps=rows)
    assert (run.cached, run.cached_answers, run.failed) == (1, 2, ["d"])
    assert run.as_dict()["cached_answers"] == 2
    header, _, row = runs_table([run]).splitlines()
    assert "cached step/answer" in header and row.split()[-2:] == ["1/2", "?"]


def test_a_503_says_loading_only_when_the_server_does() -> None:
    import httpx

    from lmflow.backends.openai import OpenAIClient

    def server(request: httpx.Request) -> httpx.Response:
        said = "Loading model" if request.url.path.endswith("loading") else "Service Unavailable"
        return httpx.Response(503, json={"error": {"message": said}})

    client = OpenAIClient("http://127.0.0.1:9", transport=httpx.MockTransport(server))
    errors = {}
    for path in ("/loading", "/busy"):
        try:
            client.request("GET", path)
        except Exception as exc:  # noqa: BLE001 - what it says is the test
            errors[path] = str(exc)
    assert "it is still loading the model" in errors["/loading"]
    assert "loading" not in errors["/busy"] and "overloaded or going down" in errors["/busy"]
