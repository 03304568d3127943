"""The SDK suite runner's bookkeeping (tests/sdk_suite/run.py): which outcomes make it fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("sdk_suite_run", Path(__file__).parent / "sdk_suite/run.py")
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def test_an_async_test_is_expected_to_fail_where_its_sync_twin_is() -> None:
    expected = {"tests/sync/test_images_sync.py::test_vlm_predict_sync": "needs a vision model",
                "tests/sync/test_embedding_sync.py::test_tokenize_sync[nomic-ai/x]": "needs embeddings",
                "tests/test_convenience_api.py::test_embedding_any": "needs embeddings (sync only)"}
    assert run.with_async_twins(expected) == {
        **expected,
        "tests/async/test_images_async.py::test_vlm_predict_async": "needs a vision model",
        "tests/async/test_embedding_async.py::test_tokenize_async[nomic-ai/x]": "needs embeddings"}


def test_the_report_fails_on_an_unlisted_failure_or_a_listed_pass(capsys) -> None:
    expected = {"a": "needs a vision model", "b": "varies: what the model writes"}
    assert run.report({"a": "failed", "b": "passed", "c": "passed"}, expected, 1.0, selected=False) == 0
    assert run.report({"a": "passed", "b": "failed", "c": "passed"}, expected, 1.0, selected=False) == 1
    assert run.report({"a": "failed", "b": "failed", "c": "failed"}, expected, 1.0, selected=False) == 1
    assert "1 failed, not in expected_failures.yaml:\n  c" in capsys.readouterr().out
