"""Faults injected for real (a disk that fills up, a kill, result files lost or cut to 0 bytes),
and what each leaves behind: one clear error, nothing half-written trusted, and a next run that
finishes the work, reusing every answer the journal holds. See docs/faults.md."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, ROOT, lmflow_cmd, wait_for

from lmflow import jsonl

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

ITEMS = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: the disk that fills up in the middle of a run (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path, leave: int) -> None:
    """Fill the disk `path` is on, then give back `leave` bytes."""
    with path.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError:
            pass
        file.truncate(max(file.tell() - leave, 0))


def test_a_full_disk_stops_the_run_with_one_clear_error_and_the_next_run_finishes(
        prefect_api: str, tmp_path: Path, small_disk: Path) -> None:
    (tmp_path / "big.py").write_text(textwrap.dedent("""\
        import json


        def big(x, log):
            with open(log, "a") as f:
                f.write(json.dumps(x) + "\\n")
            return {"x": x, "text": "y" * 200}
    """))
    spec = tmp_path / "full.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: full
        steps:
          - id: big
            foreach: ${{{{ params.xs }}}}
            parallel: 2
            python: {{function: "big:big", args: {{x: "${{{{ item }}}}", log: "{tmp_path / 'calls'}"}}}}
        params: {{xs: {list(range(ITEMS))}}}
    """))
    home = small_disk / "lmflow"
    home.mkdir()
    # the Prefect server is the session's, as for every test; the run's journal and record are here
    (home / "prefect-server").symlink_to(Path(os.environ["LMFLOW_HOME"]) / "prefect-server")
    # Prefect's result files are where lmflow puts them by default: under LMFLOW_HOME, on the full disk
    env = {"LMFLOW_HOME": str(home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results")}
    # a disk nearly full: a few pages left. A result is a file (a page) of its own, so results
    # fail first, while journal lines still fit in the journal's last page
    _fill(small_disk / "filler", leave=4 * 4096)
    out = lmflow_cmd("run", str(spec), env=env)
    assert out.returncode == 1, out.stderr
    journal = next((home / "runs").glob("full-*.jsonl"))
    last = out.stderr.strip().splitlines()[-1]
    # the file that filled it up: the journal, or the map's output next to it
    written = (str(journal), str(journal.with_suffix("") / "big.jsonl"))
    said = ("No space left on device; free space there (or set LMFLOW_HOME to a disk with room) and "
            "run again")
    assert any(last.startswith(f"error: cannot write {path}: {said}") for path in written), out.stderr
    assert "Traceback" not in out.stderr
    assert not list((home / "runs").glob("*.tmp"))  # nothing half-written left to be read
    journaled = list(jsonl.read(journal))  # (its last line may be torn: not trusted)
    done = {e["item"] for e in journaled if "item" in e and e["status"] == "completed"}
    assert 0 < len(done) < ITEMS
    # room again: the next run finishes, and reuses every item the first one journaled (whatever
    # became of its result file: 0 bytes, or never written)
    stored = [f for f in (home / "results").iterdir() if f.stat().st_size]
    assert len(done) > len(stored)  # answers journaled, their result files 0 bytes (or none)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    calls_before = len((tmp_path / "calls").read_text().split())
    again = lmflow_cmd("run", str(spec), "--json", env=env)
    assert again.returncode == 0, again.stderr
    (step,) = json.loads(again.stdout)["steps"]
    assert [o["x"] for o in step["output"]] == list(range(ITEMS))
    second = Path(json.loads(again.stdout)["record_path"]).with_suffix(".jsonl")
    cached = {e["item"] for e in jsonl.read(second) if e.get("status") == "cached"}
    assert done <= cached  # (an item whose line the full disk cut may have its result stored)
    assert len((tmp_path / "calls").read_text().split()) - calls_before == ITEMS - len(cached)


LOGGED = """\
import json
import os
import time


def logged(x, log, gate=None):
    with open(log, "a") as f:
        f.write(json.dumps(x) + "\\n")
    while gate and os.path.exists(gate):  # held until the test lets it go (or kills the run)
        time.sleep(0.05)
    return {"x": x, "squared": x * x}
"""


def _calls(log: Path) -> list[int]:
    calls = sorted(int(x) for x in log.read_text().split()) if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _damage(results: Path) -> int:
    """What a full disk does to Prefect's result files: half of them 0 bytes, the rest never written."""
    files = sorted(p for p in results.iterdir() if p.is_file())
    for n, path in enumerate(files):
        if n % 2:
            path.unlink()
        else:
            path.write_bytes(b"")
    return len(files)


def test_a_re_run_reuses_every_journaled_answer_whose_stored_result_was_lost(
        prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "lost.py").write_text(LOGGED)
    log, gate = tmp_path / "calls", tmp_path / "gate"
    spec = tmp_path / "lost.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: lost
        params: {{xs: [0, 1, 2, 3, 4, 5, 6, 7], ys: [10, 11, 12, 13, 14, 15, 16, 17]}}
        steps:
          - id: whole
            python: {{function: "lost:logged", args: {{x: 100, log: "{log}"}}}}
          - id: each                      # an item is a task run of its own (Prefect's task cache)
            foreach: ${{{{ params.xs }}}}
            grain: item
            python: {{function: "lost:logged", args: {{x: "${{{{ item }}}}", log: "{log}"}}}}
          - id: chunked                   # items run in chunks (lmflow's reads of Prefect's store)
            foreach: ${{{{ params.ys }}}}
            grain: 3
            python: {{function: "lost:logged", args: {{x: "${{{{ item }}}}", log: "{log}"}}}}
          - id: last
            after: [whole, each, chunked]
            python: {{function: "lost:logged", args: {{x: -1, log: "{log}", gate: "{gate}"}}}}
    """))
    home = Path(os.environ["LMFLOW_HOME"])
    results = tmp_path / "results"  # this test's own result store: only its files are damaged
    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results)}
    gate.touch()
    with (tmp_path / "first.err").open("w") as err:
        proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:  # killed while `last` waits: every other step and item is journaled as completed
        running = '{"step": "last", "status": "running"}'
        assert wait_for(lambda: any(running in j.read_text() for j in (home / "runs").glob("lost-*.jsonl")),
                        timeout=120), (tmp_path / "first.err").read_text()
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gate.unlink()
    (journal,) = (home / "runs").glob("lost-*.jsonl")
    assert not journal.with_suffix(".json").exists()
    assert sorted(_calls(log)) == sorted([100, -1, *range(8), *range(10, 18)])
    # the kill also tore the journal: its last item line is cut in the middle (what followed it
    # is lost): that item is not trusted, and is computed again with every unit journaled after it
    lines = journal.read_bytes().splitlines(keepends=True)
    last_item = max(n for n, line in enumerate(lines) if b'"item"' in line and b'"completed"' in line)
    journal.write_bytes(b"".join(lines[:last_item]) + lines[last_item][:40])
    kept = [json.loads(line) for line in lines[:last_item]]
    journaled = {e["output"]["x"] for e in kept if e.get("status") == "completed" and "item" in e}
    if any(e.get("step") == "whole" and e["status"] == "completed" for e in kept):
        journaled.add(100)
    computed = sorted({100, -1, *range(8), *range(10, 18)} - journaled)
    assert len(computed) >= 2 and len(journaled) >= 8
    assert _damage(results) >= 17  # every step's and item's stored answer is lost or 0 bytes

    def rerun(*args: str) -> dict:
        out = lmflow_cmd("run", str(spec), "--json", *args, env={"PREFECT_RESULTS_LOCAL_STORAGE_PATH":
                                                               str(results)})
        assert out.returncode == 0, out.stderr
        return {s["id"]: s for s in json.loads(out.stdout)["steps"]}

    steps = rerun()
    # every answer the journal holds whole is reused; the rest, and `last`, are computed
    assert _calls(log) == sorted(computed)
    assert steps["whole"]["status"] == ("cached" if 100 in journaled else "completed")
    assert steps["whole"]["output"] == {"x": 100, "squared": 10000}
    for step, offset in (("each", 0), ("chunked", 10)):
        assert [o["x"] for o in steps[step]["output"]] == [x + offset for x in range(8)]
        assert steps[step]["items"]["cached"] == len(journaled & set(range(offset, offset + 8)))
    assert steps["last"]["status"] == "completed"
    # the answers the journal gave are in the step cache again: it alone answers the next run
    hidden = journal.rename(journal.with_suffix(".hidden"))
    steps = rerun()
    assert _calls(log) == []
    assert {s["status"] for s in steps.values()} == {"cached"}
    hidden.rename(journal)

    # --refresh: neither the step cache nor a journal answers
    _damage(results)
    rerun("--refresh")
    assert _calls(log) == sorted([100, -1, *range(8), *range(10, 18)])
    # and the killed run's journal still answers for what it holds, once the stored answers are lost
    _damage(results)
    rerun()
    assert _calls(log) == sorted(computed)
