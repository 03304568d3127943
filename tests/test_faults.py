"""Faults injected for real (a disk that fills up), and what each leaves behind: one clear error,
nothing half-written trusted, and a next run that finishes the work. See docs/faults.md."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lmflow_cmd

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


def test_a_full_disk_stops_the_run_with_one_clear_error_and_the_next_run_finishes(
        prefect_api: str, tmp_path: Path, small_disk: Path) -> None:
    (tmp_path / "big.py").write_text(textwrap.dedent("""\
        import json


        def big(x, log):
            with open(log, "a") as f:
                f.write(json.dumps(x) + "\\n")
            return {"x": x, "text": "y" * 16000}
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
    env = {"LMFLOW_HOME": str(home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
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
    journaled = [json.loads(line) for line in journal.read_text().splitlines()[:-1]]
    done = {e["item"] for e in journaled if "item" in e and e["status"] == "completed"}
    assert 0 < len(done) < ITEMS
    # room again: the next run finishes, and reuses what the first one finished
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    calls_before = len((tmp_path / "calls").read_text().split())
    again = lmflow_cmd("run", str(spec), "--json", env=env)
    assert again.returncode == 0, again.stderr
    (step,) = json.loads(again.stdout)["steps"]
    assert [o["x"] for o in step["output"]] == list(range(ITEMS))
    assert step["items"]["cached"] >= len(done)
    assert len((tmp_path / "calls").read_text().split()) - calls_before == ITEMS - step["items"]["cached"]
