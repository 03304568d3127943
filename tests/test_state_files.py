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
