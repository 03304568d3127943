"""Files lmflow reads back (journals, the probe registry, loop stats) survive damage: a line that
cannot be read is skipped with a warning naming the file and the line, never a traceback."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmflow import jsonl
from lmflow.cli import cli
from lmflow.engine.records import read_record

DAMAGED = b'{"a": 1}\n42\n\xff\xfe{"b": 2}\nnot json\n[1, 2]\n{"c": 3}\n{"torn": '


def test_lines_that_are_not_objects_are_skipped_with_their_place(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(DAMAGED)
    said: list[str] = []
    assert list(jsonl.read(path, said.append)) == [{"a": 1}, {"c": 3}]
    assert said == [f"{path}:2: skipped a line that lmflow cannot read (a JSON int, not an object)",
                    f"{path}:3: skipped a line that lmflow cannot read (not UTF-8 at byte 0)",
                    f"{path}:4: skipped a line that lmflow cannot read (not JSON)",
                    f"{path}:5: skipped a line that lmflow cannot read (a JSON list, not an object)"]
    # the last line, torn by a kill while it was written, is expected: no warning
    assert list(jsonl.read(tmp_path / "missing.jsonl", said.append)) == [] and len(said) == 4


def test_an_entry_appended_after_a_torn_line_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": 1}\n{"torn": ')
    jsonl.append(path, {"b": 2})
    jsonl.append(path, {"c": 3})
    said: list[str] = []
    assert list(jsonl.read(path, said.append)) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert said == [f"{path}:2: skipped a line that lmflow cannot read (not JSON)"]  # the torn one


def test_a_damaged_journal_still_gives_the_record_of_a_killed_run(tmp_path: Path) -> None:
    journal = tmp_path / "spec-1.jsonl"
    journal.write_bytes(b'{"run": "spec-1", "spec": "s.yaml", "name": "spec", "steps": [["a", "python"], 5, '
                        b'["b", "python"]]}\n42\n{"step": ["a"], "status": "x"}\n'
                        b'{"step": "a", "status": "completed", "output": 1}\n'
                        b'{"step": "b", "status": "running"}\n{"step": "b", "item": "zero"}\n'
                        b'{"step": "b", "item": 0, "status": "completed", "output": 7}\n')
    record = read_record(journal)
    assert record["interrupted"] is True
    a, b = record["steps"]
    assert (a["id"], a["status"], a["output"]) == ("a", "completed", 1)
    assert (b["status"], [i["output"] for i in b["finished_items"]]) == ("running", [7])


def test_probe_list_reads_past_damaged_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    probes = Path(os.environ["LMFLOW_HOME"]) / "probes"
    probes.mkdir(parents=True, exist_ok=True)
    record = probes / "0123.jsonl"
    key = {"server": "http://127.0.0.1:1234", "backend": "lmstudio", "model": "m", "path": None, "gpu": None,
           "options": {}}
    record.write_bytes(json.dumps({"probe": key, "declared_max": 8192, "granularity": 1024}).encode()
                       + b'\n42\n\xc3\x28 broken\n{"probe": 7}\n{"size": 1024, "outcome": "ok", "extra": 1}\n'
                       + json.dumps({"loadable_max": 4096, "finished": True}).encode() + b"\n")
    with caplog.at_level(logging.WARNING, logger="lmflow"):
        out = CliRunner().invoke(cli, ["probe", "--list"])
    assert out.exit_code == 0, out.output
    assert "m  http://127.0.0.1:1234  loadable max 4096" in out.output
    assert f"{record}:2: skipped a line that lmflow cannot read (a JSON int, not an object)" \
        in caplog.messages
    assert f"{record}:3: skipped a line that lmflow cannot read (not UTF-8 at byte 0)" in caplog.messages


def _gone_pid() -> int:
    """The PID of a process that has ended (a killed run's)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_journaled_answers_trust_only_whole_unexpired_lines_of_runs_that_did_not_end() -> None:
    import time

    from lmflow.engine.recovery import JournaledAnswers
    from lmflow.home import subdir

    runs = subdir("runs")

    def journal(run: str, *entries: dict, torn: bytes = b"", pid: int | None = None) -> Path:
        path = runs / f"{run}.jsonl"
        header = {"run": run, "name": "spec", "pid": pid or _gone_pid()}
        path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in (header, *entries)) + torn)
        return path

    now = time.time()
    journal("spec-20260101T000000Z-1",
            {"step": "m", "item": 0, "status": "completed", "output": "old", "key": "k0"},
            {"step": "m", "item": 1, "status": "completed", "output": "one", "key": "k1"},
            {"step": "m", "item": 2, "status": "failed", "key": "k2"},
            {"step": "m", "item": 3, "status": "completed", "output": "x", "key": "k3", "expires": now - 1},
            {"step": "m", "item": 4, "status": "cached", "output": "soon", "key": "k4", "expires": now + 60},
            {"step": "s", "status": "completed", "output": {"a": 1}, "meta": {"tokens": 3},
             "answered_by": {"link": 0, "target": "model x"}, "key": "k5"},
            {"step": "m", "item": 6, "status": "completed", "output": "no key"},
            torn=b'{"step": "m", "item": 7, "status": "completed", "key": "k7", "output": "to')
    journal("spec-20260102T000000Z-2", {"step": "m", "item": 0, "status": "completed", "output": "new",
                                        "key": "k0"})
    # a run that ended (its final record) or still runs (its process) answers nothing
    ended = journal("spec-20260103T000000Z-3", {"step": "m", "item": 8, "status": "completed",
                                                "output": "x", "key": "k8"})
    ended.with_suffix(".json").write_text("{}")
    journal("spec-20260104T000000Z-4", {"step": "m", "item": 9, "status": "completed", "output": "x",
                                        "key": "k9"}, pid=1)  # (PID 1 always runs)
    answers = JournaledAnswers("spec")
    assert answers.get("k0")[0].output == "new"  # the latest run's
    one, left = answers.get("k1")
    assert (one.output, one.meta, one.answered_by, one.errors, left) == ("one", {}, None, [], None)
    step, left = answers.get("k5")
    assert (step.output, step.meta, step.answered_by, left) == ({"a": 1}, {"tokens": 3},
                                                                {"link": 0, "target": "model x"}, None)
    assert 0 < answers.get("k4")[1] <= 60
    for key in ("k2", "k3", "k7", "k8", "k9", "nope"):  # failed, expired, torn, ended, running, none
        assert answers.get(key) is None, key


def test_only_values_a_json_line_gives_back_as_they_were_are_exact() -> None:
    assert jsonl.exact({"a": [1, 2.5, "x", None, True, {"b": []}]})
    for value in ((1, 2), {1: "a"}, {"a": {1, 2}}, [object()], b"x", {"a": (1,)}):
        assert not jsonl.exact(value), value
