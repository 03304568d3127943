"""Prefect's UI in a real browser (Debian's headless chromium), on a server that is not on 4200.

The page is a JavaScript application: chromium runs it (`--dump-dom` after a virtual time
budget) and what it rendered is checked; screenshots are kept under `test-artifacts/ui/`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, lmflow_cmd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts" / "ui"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (`make test` installs it where apt-get can)")


def render(url: str, tmp_path: Path, screenshot: str, expect: tuple[str, ...]) -> str:
    """The DOM after the page's scripts ran (once it shows every `expect`, up to 5 tries: the
    page fetches its data after it loads), and a screenshot of it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000",
              "--window-size=1400,1000", "--hide-scrollbars"]
    subprocess.run([*common, f"--screenshot={ARTIFACTS / screenshot}", url], capture_output=True,
                   timeout=120, check=True)
    dom = ""
    for _ in range(5):  # a busy server answers the page's data requests late
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        if all(text in dom for text in expect):
            break
    return dom


def test_the_run_link_opens_the_runs_page_of_its_own_server(prefect_api: str, tmp_path: Path) -> None:
    assert ":4200/" not in prefect_api
    (tmp_path / "ui_helpers.py").write_text("def shout(word):\n    return word.upper()\n")
    spec = tmp_path / "ui.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: seen-in-the-ui
        defaults: {cache: false}
        steps:
          - id: shout_once
            python: {function: "ui_helpers:shout", args: {word: hello}}
          - id: shout_twice
            after: [shout_once]
            python: {function: "ui_helpers:shout", args: {word: "${{ steps.shout_once.output }}"}}
        """))
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 0, out.stderr
    link = next(line.split("Prefect UI: ")[1] for line in out.stdout.splitlines() if "Prefect UI: " in line)
    assert link.startswith(prefect_api.removesuffix("/api") + "/runs/flow-run/")
    result = json.loads(lmflow_cmd("runs", "--json", str(spec)).stdout)
    run_name = result[0]["name"]

    ui = prefect_api.removesuffix("/api")
    runs_page = render(f"{ui}/runs", tmp_path, "runs.png", (run_name,))
    assert "Can't connect to Server API" not in runs_page
    assert run_name in runs_page  # this server's run, listed by the UI talking to this server

    steps = ("shout_once", "shout_twice")  # task runs named exactly after the steps
    run_page = render(link, tmp_path, "run.png", (run_name, *steps))
    assert run_name in run_page and all(step in run_page for step in steps)
    # the run's summary artifact (the graph on the run's page is a canvas)
    summary = render(f"{ui}/artifacts/key/lmflow-summary-seen-in-the-ui", tmp_path, "summary.png",
                     (run_name, "2 steps: 2 completed"))
    assert run_name in summary and "2 steps: 2 completed" in summary
