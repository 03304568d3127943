"""The dataflow end to end: real `lmflow run` processes, a real Prefect server, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import BIN, MODELS, ROOT, lmflow_cmd, wait_for
from test_run import engines_with_alias

from lmflow.engine.records import read_record
from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

HELPERS = """\
import json
import os
import random
import time


def span(seconds, tag=None):
    started = time.time()
    time.sleep(seconds)
    return {"tag": tag, "start": started, "end": time.time()}


def echo(value, at=None, jitter=0.0):
    time.sleep(random.random() * jitter)  # finish out of order
    return {"value": value, "at": at}


def boom(x=None):
    raise ValueError(f"bad input {x}")


def picky(x):
    if x % 3 == 0:
        raise ValueError(f"{x} is a multiple of 3")
    return x * 10


def flaky(x, log):
    # fails the first attempt of every item, then answers
    path = f"{log}.{x}"
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return x


def logged(x, log, slow_from=99, seconds=0.0):
    with open(log, "a") as f:
        f.write(json.dumps(x) + "\\n")
    if x >= slow_from and os.path.exists(log + ".slow"):  # slow only while the flag file exists
        time.sleep(seconds)
    return x * x


def meet(tag, other):
    # here until step `other` is here too (60 s at most): two steps meet only if they run at once
    folder = os.path.dirname(os.path.abspath(__file__))
    open(os.path.join(folder, tag + ".here"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(folder, other + ".here")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"tag": tag, "met": os.path.exists(os.path.join(folder, other + ".here"))}


def counts():
    return {"urgent": 1, "count": 3}
"""


def write_spec(folder: Path, body: str, name: str) -> Path:
    (folder / "flowhelp.py").write_text(HELPERS)
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\n" + textwrap.dedent(body))
    return path


def task_runs_by_name(prefect_api: str, flow_run_id: str, count: int) -> dict[str, dict]:
    """The flow run's task runs by name, once the server has all `count` of them in their final
    states (it records events in batches: a task run may arrive before its last state)."""
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    runs = wait_for(lambda: (r := httpx.post(f"{prefect_api}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [flow_run_id]}}}).json()) and len(r) == count
        and all(t["state_type"] in final for t in r) and r, timeout=60)
    assert runs, "task runs did not reach the Prefect server"
    return {r["name"]: r for r in runs}


def waits_for(by_name: dict[str, dict], name: str) -> set[str]:
    return {e["id"] for e in by_name[name]["task_inputs"].get("wait_for", [])}


def run_json(spec: Path, *args: str, ok: bool = True) -> tuple[dict, subprocess.CompletedProcess[str]]:
    out = lmflow_cmd("run", str(spec), "--json", *args)
    assert (out.returncode == 0) is ok, out.stderr
    return json.loads(out.stdout), out


def test_independent_steps_overlap_and_a_failure_skips_only_its_dependents(
        prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: a
            python: {function: "flowhelp:meet", args: {tag: a, other: b}}
          - id: b
            python: {function: "flowhelp:meet", args: {tag: b, other: a}}
          - id: bad
            python: {function: "flowhelp:boom", args: {x: 1}}
          - id: after_bad
            python: {function: "flowhelp:echo", args: {value: "${{ steps.bad.output }}"}}
          - id: after_after
            python: {function: "flowhelp:echo", args: {value: "${{ steps.after_bad.output }}"}}
          - id: after_a
            python: {function: "flowhelp:echo", args: {value: "${{ steps.a.output.tag }}"}}
          - id: bad2
            python: {function: "flowhelp:boom", args: {x: 2}}
    """, name="branches")
    result, out = run_json(spec, ok=False)
    assert out.returncode == 1
    steps = {s["id"]: s for s in result["steps"]}
    assert [s["id"] for s in result["steps"]] == ["a", "b", "bad", "after_bad", "after_after", "after_a",
                                                  "bad2"]
    # each was still running when the other started
    assert steps["a"]["output"]["met"] and steps["b"]["output"]["met"], "a and b did not run at the same time"
    assert steps["after_a"]["output"]["value"] == "a"
    assert (steps["after_bad"]["status"], steps["after_bad"]["reason"]) == ("skipped", "upstream failed: bad")
    assert (steps["after_after"]["status"], steps["after_after"]["reason"]) == ("skipped",
                                                                                 "upstream failed: bad")
    # the graph in Prefect is the whole spec: a skipped step is a task run, Completed as Skipped,
    # that its own dependents wait for
    by_name = task_runs_by_name(prefect_api, result["flow_run_id"], 7)
    for name in ("after_bad", "after_after"):
        state = by_name[name]["state"]
        assert (state["type"], state["name"], state["message"]) == (
            "COMPLETED", "Skipped", "skipped: upstream failed: bad")
    assert waits_for(by_name, "after_after") == {by_name["after_bad"]["id"]}
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: step 'bad' failed: flowhelp:boom raised ValueError: bad input 1 at "
                      f"{tmp_path / 'flowhelp.py'}:19",
                      "error: step 'bad2' failed: flowhelp:boom raised ValueError: bad input 2 at "
                      f"{tmp_path / 'flowhelp.py'}:19"]


def test_max_parallel_one_runs_one_at_a_time(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: a
            python: {function: "flowhelp:span", args: {seconds: 0.5}}
          - id: b
            python: {function: "flowhelp:span", args: {seconds: 0.5}}
    """, name="serial")
    result, _ = run_json(spec, "--max-parallel", "1")
    a, b = (s["output"] for s in result["steps"])
    assert a["end"] <= b["start"] or b["end"] <= a["start"]


def test_map_over_a_list_jsonl_csv_and_glob_keeps_input_order(prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(8)))
    (tmp_path / "rows.csv").write_text("name,size\nx,1\ny,2\nz,3\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "docs").mkdir()
    for name, text in (("b.txt", "bee"), ("a.txt", "ay")):
        (tmp_path / "docs" / name).write_text(text)
    spec = write_spec(tmp_path, """\
        params: {words: [one, two, three, four, five]}
        defaults: {cache: false}
        steps:
          - id: listed
            foreach: ${{ params.words }}
            parallel: 3
            python: {function: "flowhelp:echo", args: {value: "${{ item }}", at: "${{ index }}", jitter: 0.3}}
          - id: jsonl
            foreach: {file: rows.jsonl}
            python: {function: "flowhelp:echo", args: {value: "${{ item.n }}", jitter: 0.2}}
          - id: csv
            foreach: {file: rows.csv}
            python: {function: "flowhelp:echo", args: {value: "${{ item.name }}-${{ item.size }}"}}
          - id: files
            foreach: {glob: "docs/*.txt"}
            python: {function: "flowhelp:echo", args: {value: "${{ item.name }}:${{ item.text }}"}}
          - id: chained
            foreach: ${{ steps.listed.output }}
            python: {function: "flowhelp:echo", args: {value: "${{ item.value }}!"}}
          - id: second
            python: {function: "flowhelp:echo", args: {value: "${{ steps.jsonl.output[1].value }}"}}
          - id: nothing
            foreach: {file: empty.jsonl}
            python: {function: "flowhelp:echo", args: {value: "${{ item }}"}}
    """, name="maps")
    result, out = run_json(spec)
    steps = {s["id"]: s for s in result["steps"]}
    assert steps["listed"]["output"] == [{"value": w, "at": i} for i, w in
                                         enumerate(["one", "two", "three", "four", "five"])]
    assert [o["value"] for o in steps["jsonl"]["output"]] == list(range(8))
    assert [o["value"] for o in steps["csv"]["output"]] == ["x-1", "y-2", "z-3"]
    assert [o["value"] for o in steps["files"]["output"]] == ["a.txt:ay", "b.txt:bee"]
    assert [o["value"] for o in steps["chained"]["output"]] == ["one!", "two!", "three!", "four!", "five!"]
    assert steps["second"]["output"]["value"] == 1
    assert steps["jsonl"]["items"] == {"total": 8, "completed": 8, "cached": 0, "failed": 0, "skipped": 0}
    assert steps["nothing"]["output"] == [] and steps["nothing"]["status"] == "completed"
    assert "warning: nothing: foreach has no items: the output is an empty list" in out.stderr

    # the graph in Prefect: items are task runs step[i]; a map with dependents joins its items in
    # one task run named after it, and its dependents wait for that one (a chain stays linear)
    by_name = task_runs_by_name(prefect_api, result["flow_run_id"], 26)
    assert {f"listed[{i}]" for i in range(5)} <= set(by_name)
    assert waits_for(by_name, "listed") == {by_name[f"listed[{i}]"]["id"] for i in range(5)}
    for i in range(5):
        assert waits_for(by_name, f"chained[{i}]") == {by_name["listed"]["id"]}
    assert waits_for(by_name, "jsonl") == {by_name[f"jsonl[{i}]"]["id"] for i in range(8)}
    assert waits_for(by_name, "second") == {by_name["jsonl"]["id"]}
    assert "chained" not in by_name and "csv" not in by_name  # no dependents: no join


def test_item_errors_fail_skip_or_collect_and_items_retry(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {xs: [1, 2, 3, 4, 5, 6, 7], log: ""}
        defaults: {cache: false}
        steps:
          - id: failing
            foreach: ${{ params.xs }}
            parallel: 1
            python: {function: "flowhelp:picky", args: {x: "${{ item }}"}}
          - id: skipping
            foreach: ${{ params.xs }}
            on_item_error: skip
            python: {function: "flowhelp:picky", args: {x: "${{ item }}"}}
          - id: collecting
            foreach: ${{ params.xs }}
            on_item_error: collect
            python: {function: "flowhelp:picky", args: {x: "${{ item }}"}}
          - id: retried
            foreach: [1, 2, 3]
            retries: 1
            retry_delay: 0.1s
            python: {function: "flowhelp:flaky", args: {x: "${{ item }}", log: "${{ params.log }}"}}
          - id: uses_failing
            python: {function: "flowhelp:echo", args: {value: "${{ steps.failing.output }}"}}
          # a map that skips or collects its failed items hands its output on (Prefect must not
          # refuse to start these because task runs they wait for failed)
          - id: uses_skipping
            python: {function: "flowhelp:echo", args: {value: "${{ steps.skipping.output }}"}}
          - id: uses_collecting
            foreach: ${{ steps.collecting.output }}
            python: {function: "flowhelp:echo", args: {value: "${{ item }}"}}
    """, name="itemerrors")
    result, out = run_json(spec, "-p", f"log={tmp_path / 'flaky'}", ok=False)
    steps = {s["id"]: s for s in result["steps"]}
    failing = steps["failing"]
    assert failing["status"] == "failed"
    assert failing["error"]["message"].startswith("item 2 failed: flowhelp:picky raised ValueError: "
                                                  "3 is a multiple of 3")
    # parallel 1: the first failure stops the map before items 3..6 start
    assert failing["items"]["completed"] == 2 and failing["items"]["failed"] == 1
    assert "4 not started" in failing["error"]["message"]
    assert steps["uses_failing"]["reason"] == "upstream failed: failing"
    assert steps["skipping"]["output"] == [10, 20, 40, 50, 70]
    assert [(p["index"], p["status"]) for p in steps["skipping"]["item_problems"]] == [
        (2, "failed"), (5, "failed")]
    assert steps["collecting"]["output"] == [10, 20, None, 40, 50, None, 70]
    assert steps["uses_skipping"]["status"] == "completed", steps["uses_skipping"]
    assert steps["uses_skipping"]["output"]["value"] == [10, 20, 40, 50, 70]
    assert steps["uses_collecting"]["status"] == "completed", steps["uses_collecting"]
    assert [o["value"] for o in steps["uses_collecting"]["output"]] == [10, 20, None, 40, 50, None, 70]
    assert result["error"] is None  # the run failed for `failing` alone, not for Prefect's reasons
    assert steps["retried"]["output"] == [1, 2, 3]
    failed_items = {e["step"] for e in result["errors"]}
    assert {"failing[2]", "skipping[2]", "skipping[5]", "collecting[2]", "collecting[5]"} <= failed_items
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: step 'failing' failed: " + failing["error"]["message"]]


def test_large_or_chunked_maps_run_as_chunks_and_keep_each_item_s_record(
        prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(250)))
    spec = write_spec(tmp_path, """\
        params: {log: "", data: big.jsonl}
        steps:
          - id: chunked
            foreach: [1, 2, 3, 4, 5, 6, 7]
            grain: 3
            retries: 1
            retry_delay: 0.1s
            python: {function: "flowhelp:flaky", args: {x: "${{ item }}", log: "${{ params.log }}"}}
          - id: collected
            foreach: ${{ steps.chunked.output }}
            grain: 4
            on_item_error: collect
            python: {function: "flowhelp:picky", args: {x: "${{ item }}"}}
          - id: stopped
            foreach: [1, 2, 3, 4, 5, 6, 7]
            grain: 5
            parallel: 1
            python: {function: "flowhelp:picky", args: {x: "${{ item }}"}}
          - id: big
            foreach: {file: "${{ params.data }}"}
            python: {function: "flowhelp:echo", args: {value: "${{ item.i }}"}}
    """, name="chunks")
    result, _ = run_json(spec, "-p", f"log={tmp_path / 'flaky'}", ok=False)
    steps = {s["id"]: s for s in result["steps"]}
    # every item of a chunk has its own tries: each failed its first and answered on its retry
    assert steps["chunked"]["output"] == [1, 2, 3, 4, 5, 6, 7]
    assert steps["chunked"]["items"]["completed"] == 7
    # ... its own outcome and record
    assert steps["collected"]["output"] == [10, 20, None, 40, 50, None, 70]
    assert [(p["index"], p["status"]) for p in steps["collected"]["item_problems"]] == [
        (2, "failed"), (5, "failed")]
    # the first failure stops the map's chunks from starting more items
    assert steps["stopped"]["status"] == "failed"
    assert steps["stopped"]["error"]["message"].startswith("item 2 failed: flowhelp:picky raised ValueError")
    assert "4 not started" in steps["stopped"]["error"]["message"], steps["stopped"]["error"]
    assert [o["value"] for o in steps["big"]["output"]] == list(range(250))

    # one item inside a chunk, from the run's journal: a failed one with what it was asked
    shown = lmflow_cmd("runs", "show", result["run_id"], "--item", "collected[2]")
    assert shown.returncode == 0, shown.stderr
    assert "item     collected[2]: failed in" in shown.stdout
    assert "flowhelp:picky raised ValueError: 3 is a multiple of 3" in shown.stdout
    assert '"x": 3' in shown.stdout  # its options
    item = json.loads(lmflow_cmd("runs", "show", result["run_id"], "--item", "big[249]", "--json").stdout)
    assert (item["status"], item["output"]["value"], item["run"]) == ("completed", 249, result["run_id"])
    for ref, message in (("5", "has 4 maps ("), ("stopped[6]", "stopped[6] is not in run"),
                         ("nope[1]", "journaled no items of 'nope'"),
                         ("each[x]", "give the map's step and the item's index")):
        refused = lmflow_cmd("runs", "show", result["run_id"], "--item", ref)
        assert refused.returncode != 0 and message in refused.stderr, (ref, refused.stderr)

    runs = wait_for(lambda: (r := httpx.post(f"{prefect_api}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [result["flow_run_id"]]}}}).json()) and len(r) == 24 and r, timeout=60)
    names = sorted(r["name"] for r in runs)
    by_name = {r["name"]: r for r in runs}
    assert [n for n in names if n.startswith("chunked")] == ["chunked", "chunked[0:3]", "chunked[3:6]",
                                                           "chunked[6:7]"]
    assert [n for n in names if n.startswith("collected")] == ["collected[0:4]", "collected[4:7]"]
    # `grain: auto`: 250 items run in chunks, 16 items each at max_parallel 4
    assert len([n for n in names if n.startswith("big[")]) == 16 and "big[0:16]" in names
    edges = {e["id"] for e in by_name["collected[0:4]"]["task_inputs"]["wait_for"]}
    assert edges == {by_name["chunked"]["id"]}
    # a chunked map's join waits for its chunks: each once, whatever its items
    joined = [e["id"] for e in by_name["chunked"]["task_inputs"]["wait_for"]]
    chunks = ("chunked[0:3]", "chunked[3:6]", "chunked[6:7]")
    assert sorted(joined) == sorted(by_name[n]["id"] for n in chunks)

    # the step cache is each item's, whatever the grain: item by item, all answered from it
    spec.write_text(spec.read_text().replace("grain: 3", "grain: item"))
    again, _ = run_json(spec, "-p", f"log={tmp_path / 'flaky'}", ok=False)
    assert {s["id"]: s["items"]["cached"] for s in again["steps"]}["chunked"] == 7


def test_a_broken_dataset_row_is_its_item_s_error(prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"x": 1}\n{"x": 2\n\n{"x": 4}\n')
    (tmp_path / "rows.csv").write_text("x\n1\n2,3\n4\n")
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: collected
            foreach: {file: rows.jsonl}
            on_item_error: collect
            python: {function: "flowhelp:echo", args: {value: "${{ item.x }}"}}
          - id: skipped
            foreach: {file: rows.csv}
            on_item_error: skip
            python: {function: "flowhelp:echo", args: {value: "${{ item.x }}"}}
          - id: failed
            foreach: {file: rows.jsonl}
            python: {function: "flowhelp:echo", args: {value: "${{ item.x }}"}}
    """, name="brokenrows")
    result, out = run_json(spec, ok=False)
    steps = {s["id"]: s for s in result["steps"]}
    assert [o and o["value"] for o in steps["collected"]["output"]] == [1, None, 4]
    (problem,) = steps["collected"]["item_problems"]
    assert problem["index"] == 1 and problem["error_type"] == "DatasetError"
    assert problem["reason"].startswith("rows.jsonl:2: not a JSON value")
    assert [o["value"] for o in steps["skipped"]["output"]] == ["1", "4"]
    assert steps["skipped"]["item_problems"][0]["reason"] == (
        "rows.csv:3: the row has more fields than the header")
    assert steps["failed"]["status"] == "failed"
    assert steps["failed"]["error"]["message"].startswith("item 1 failed: rows.jsonl:2: not a JSON value")
    assert "Traceback" not in out.stderr


def test_when_skips_steps_and_filters_items(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {notify: false, xs: [{n: 1, tag: keep}, {n: 2, tag: drop}, {n: 3, tag: KEEP}]}
        defaults: {cache: false}
        steps:
          - id: triage
            python: {function: "flowhelp:echo", args: {value: {urgent: true, score: 7}}}
          - id: escalate
            when: steps.triage.output.value.urgent and params.notify
            python: {function: "flowhelp:echo", args: {value: escalated}}
          - id: report
            python: {function: "flowhelp:echo", args: {value: "${{ steps.escalate.output.value }}"}}
          - id: high
            when: ${{ steps.triage.output.value.score >= 5 }}
            python: {function: "flowhelp:echo", args: {value: high}}
          - id: kept
            foreach: ${{ params.xs }}
            when: lower(item.tag) == 'keep' and index < 10
            python: {function: "flowhelp:echo", args: {value: "${{ item.n }}"}}
    """, name="conditions")
    result, out = run_json(spec)
    steps = {s["id"]: s for s in result["steps"]}
    assert (steps["escalate"]["status"], steps["escalate"]["reason"]) == ("skipped", "condition false")
    assert steps["escalate"]["output"] is None
    assert steps["report"]["status"] == "completed" and steps["report"]["output"]["value"] is None
    assert steps["high"]["output"]["value"] == "high"
    assert [o["value"] for o in steps["kept"]["output"]] == [1, 3]
    assert steps["kept"]["items"]["skipped"] == 1
    assert steps["kept"]["item_problems"] == []  # a false condition is counted, not a problem
    # a skipped step is in Prefect's graph (a skipped item is only counted: a filter over a big
    # dataset would flood it)
    by_name = task_runs_by_name(prefect_api, result["flow_run_id"], 6)
    assert set(by_name) == {"triage", "escalate", "report", "high", "kept[0]", "kept[2]"}
    assert (by_name["escalate"]["state"]["name"], by_name["escalate"]["state"]["message"]) == (
        "Skipped", "skipped: condition false")
    assert waits_for(by_name, "escalate") == {by_name["triage"]["id"]}
    assert waits_for(by_name, "report") == {by_name["escalate"]["id"]}

    notified, _ = run_json(spec, "-p", "notify=true")
    assert {s["id"]: s["status"] for s in notified["steps"]}["escalate"] == "completed"


def test_a_typo_in_a_condition_names_the_step_the_key_and_the_keys_there_are(prefect_api: str,
                                                                            tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        defaults: {cache: false}
        steps:
          - id: urgent
            python: {function: "flowhelp:counts"}
          - id: notify
            when: ${{ steps.urgent.output.urgnet > 0 }}
            python: {function: "flowhelp:echo", args: {value: notified}}
          - id: after
            python: {function: "flowhelp:echo", args: {value: "${{ steps.notify.output }}"}}
          - id: fine
            when: ${{ steps.urgent.output.urgnet == null and steps.urgent.output.urgent > 0 }}
            python: {function: "flowhelp:echo", args: {value: fine}}
    """, name="typo")
    result, out = run_json(spec, ok=False)
    message = ("when: cannot evaluate `steps.urgent.output.urgnet > 0`: '>' does not apply to null and a "
               "number: steps.urgent.output has no key 'urgnet' (keys: count, urgent; "
               "did you mean 'urgent'?)")
    assert out.stderr.splitlines()[-1] == f"error: step 'notify' failed: {message}"
    steps = {s["id"]: s for s in result["steps"]}
    assert (steps["notify"]["status"], steps["notify"]["error"]["message"]) == ("failed", message)
    assert [(e["step"], e["message"]) for e in result["errors"]] == [("notify", message)]
    assert (steps["after"]["status"], steps["after"]["reason"]) == ("skipped", "upstream failed: notify")
    assert steps["fine"]["output"]["value"] == "fine"  # a missing key is null where null is fine


def test_list_functions_and_a_map_s_items_in_later_steps(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {tickets: [{text: a, urgent: true}, {text: b, urgent: false}, {text: c, urgent: true}]}
        defaults: {cache: false}
        steps:
          - id: triage
            foreach: ${{ params.tickets }}
            python: {function: "flowhelp:echo", args: {value: "${{ item.urgent }}"}}
          - id: escalate
            when: any(pluck(steps.triage.output, 'value')) and count(pluck(steps.triage.output, 'value')) == 2
            python: {function: "flowhelp:echo", args: {value: "${{ steps.triage.items }}"}}
          - id: urgent
            foreach: ${{ params.tickets }}
            when: item.urgent and index > 0
            python: {function: "flowhelp:echo", args: {value: "${{ index }}"}}
          - id: pair
            python: {function: "flowhelp:echo", args: {value: ["${{ steps.urgent.items }}",
                                                               "${{ steps.urgent.output }}"]}}
          - id: each
            foreach: ${{ steps.urgent.items }}
            python: {function: "flowhelp:echo", args: {value: "${{ item.text }}"}}
    """, name="lists")
    result, _ = run_json(spec)
    steps = {s["id"]: s for s in result["steps"]}
    assert steps["escalate"]["output"]["value"] == [
        {"text": "a", "urgent": True}, {"text": "b", "urgent": False}, {"text": "c", "urgent": True}]
    # item 0 and 1 left out by the condition: the items left line up with the outputs
    items, outputs = steps["pair"]["output"]["value"]
    assert (items, [o["value"] for o in outputs]) == ([{"text": "c", "urgent": True}], [2])
    assert [o["value"] for o in steps["each"]["output"]] == ["c"]


def test_bad_foreach_values_fail_the_step_with_a_clear_message(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        params: {notalist: {a: 1}}
        defaults: {cache: false}
        steps:
          - id: each
            foreach: ${{ params.notalist }}
            python: {function: "flowhelp:echo", args: {value: "${{ item }}"}}
          - id: fine
            python: {function: "flowhelp:echo", args: {value: 1}}
    """, name="badforeach")
    result, out = run_json(spec, ok=False)
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        "error: step 'each' failed: foreach needs a list, got dict: \"{'a': 1}\" (refer to a list, e.g. "
        "a param holding one or a step whose output is one)")
    assert result["steps"][1]["status"] == "completed"


@pytest.mark.engine
def test_a_killed_map_leaves_no_engine_and_resumes_with_only_unfinished_items(
        prefect_api: str, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    spec = write_spec(tmp_path, f"""\
        params: {{xs: [0, 1, 2, 3, 4, 5, 6, 7]}}
        models: {{resumeeng: {{key: smollm2-135m-instruct, context_length: 512}}}}
        steps:
          - id: warm                    # the run owns an engine while the map runs
            prompt: {{model: resumeeng, user: "Say hi.", max_tokens: 2}}
          - id: square
            foreach: ${{{{ params.xs }}}}
            parallel: 2
            python: {{function: "flowhelp:logged", args: {{x: "${{{{ item }}}}", log: "{log}",
                      slow_from: 4, seconds: 60}}}}
    """, name="resume")
    home = Path(os.environ["LMFLOW_HOME"])
    Path(f"{log}.slow").touch()
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        journals = lambda: list((home / "runs").glob("resume-*.jsonl"))  # noqa: E731
        finished = lambda: sum(1 for j in journals() for line in j.read_text().splitlines()  # noqa: E731
                               if '"item"' in line and '"completed"' in line)
        # items 0-3 finish; 4 and 5 then sleep in flight
        assert wait_for(lambda: finished() >= 4 and log.exists() and len(log.read_text().split()) >= 6,
                        timeout=60)
        assert engines_with_alias("resumeeng"), "the engine is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: not engines_with_alias("resumeeng"), timeout=60), \
            "llama-server outlived lmflow"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for orphan in engines_with_alias("resumeeng"):
            orphan.kill()
    record = read_record(journals()[0])
    assert record["interrupted"] is True
    assert [i["output"] for i in record["steps"][1]["finished_items"]] == [0, 1, 4, 9]
    first_calls = [int(x) for x in log.read_text().split()]
    assert sorted(first_calls) == [0, 1, 2, 3, 4, 5]
    log.unlink()
    Path(f"{log}.slow").unlink()  # the same spec and code: the re-run is fast, not different

    result, _ = run_json(spec, "-p", "xs=[0, 1, 2, 3, 4, 5, 6, 7]")
    steps = result["steps"][1]
    assert steps["items"]["cached"] == 4 and steps["items"]["completed"] == 4
    assert steps["output"] == [x * x for x in range(8)]
    assert sorted(int(x) for x in log.read_text().split()) == [4, 5, 6, 7]
    # the re-run marked the killed one Crashed in Prefect, with the items it had in flight
    killed = journals()[0] if record["run_id"] in journals()[0].name else journals()[1]
    assert f"the run {record['run_id']} was killed: marked Crashed in Prefect" in [
        e["message"] for e in result["events"]]
    flow_run = next(line for line in killed.read_text().splitlines() if '"flow_run"' in line)
    flow_run_id = json.loads(flow_run)["flow_run"]
    assert httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=30).json()["state_type"] == "CRASHED"
    # its task runs reach Prefect's database seconds late (recorded in batches; those still in the
    # killed process's buffer never do): then any command that lists runs marks those too
    def task_runs() -> list[dict]:
        return httpx.post(f"{prefect_api}/task_runs/filter", timeout=30,
                          json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()

    seen: list[int] = []

    def settled() -> bool:  # the same count over 3 s: what will arrive has arrived
        seen.append(len(task_runs()))
        return len(seen) > 6 and len(set(seen[-6:])) == 1

    assert wait_for(settled, timeout=60, interval=0.5)
    assert lmflow_cmd("runs").returncode == 0
    unfinished = [t["name"] for t in task_runs() if t["state_type"] in ("RUNNING", "PENDING")]
    assert unfinished == []


def test_a_killed_chunked_map_resumes_item_by_item_not_chunk_by_chunk(
        prefect_api: str, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    spec = write_spec(tmp_path, f"""\
        params: {{xs: {list(range(20))}}}
        steps:
          - id: square
            foreach: ${{{{ params.xs }}}}
            grain: 8
            parallel: 2
            python: {{function: "flowhelp:logged", args: {{x: "${{{{ item }}}}", log: "{log}",
                      slow_from: 6, seconds: 60}}}}
    """, name="chunkresume")
    home = Path(os.environ["LMFLOW_HOME"])
    Path(f"{log}.slow").touch()
    proc = subprocess.Popen([str(BIN / "lmflow"), "run", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        journals = lambda: list((home / "runs").glob("chunkresume-*.jsonl"))  # noqa: E731
        finished = lambda: sum(1 for j in journals() for line in j.read_text().splitlines()  # noqa: E731
                               if '"item"' in line and '"completed"' in line)
        # items 0-5 of the chunk square[0:8] finish; 6 and 7 then sleep in flight
        assert wait_for(lambda: finished() >= 6 and log.exists() and len(log.read_text().split()) >= 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = read_record(journals()[0])
    assert record["interrupted"] is True
    assert [i["output"] for i in record["steps"][0]["finished_items"]] == [0, 1, 4, 9, 16, 25]
    assert sorted(int(x) for x in log.read_text().split()) == list(range(8))
    log.unlink()
    Path(f"{log}.slow").unlink()

    result, _ = run_json(spec)
    square = result["steps"][0]
    assert square["items"]["cached"] == 6 and square["items"]["completed"] == 14
    assert square["output"] == [x * x for x in range(20)]
    # only the unfinished items ran again: 6 and 7 of the first chunk, not the whole chunk
    assert sorted(int(x) for x in log.read_text().split()) == list(range(6, 20))


def test_a_map_s_rate_counts_only_the_items_it_computes(prefect_api: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """\
        steps:
          - id: each
            foreach: [1, 2, 3, 4]
            python: {function: "flowhelp:echo", args: {value: "${{ item }}"}}
        """, name="rated")
    first = lmflow_cmd("run", str(spec))
    assert first.returncode == 0, first.stderr
    assert "each: 4/4 items (" in first.stderr, first.stderr
    assert "each: 4/4 items (0.0/s)" not in first.stderr  # it computed them: a rate above zero
    again = lmflow_cmd("run", str(spec))
    assert again.returncode == 0, again.stderr
    assert "4 cached" in again.stdout, again.stdout
    # every item came from the cache: nothing computed, no rate (no "400/s, ~0s left" for a
    # resumed map whose cached items came back at once)
    assert "each: 4/4 items (0.0/s)" in again.stderr, again.stderr


@pytest.mark.engine
def test_a_map_never_has_more_requests_in_flight_than_the_server_allows(
        prefect_api: str, tmp_path: Path, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    url = lmstudio_server_factory(models=[{"key": "smollm2-135m-instruct", "max_context_length": 4096}],
                                  delay_seconds=0.05).url
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(400)))

    def spec(name: str, server_parallel: str) -> Path:
        return write_spec(tmp_path, f"""\
            server: {{backend: lmstudio, url: "{url}"{server_parallel}}}
            models: {{smol: {{key: smollm2-135m-instruct, context_length: 1024}}}}
            defaults: {{cache: false, max_parallel: 16}}
            steps:
              - id: ask
                foreach: {{file: {items.name}}}
                parallel: 16
                prompt: {{model: smol, user: "Number ${{{{ item.n }}}}: say ok.", max_tokens: 1}}
            """, name=name)

    bounded, _ = run_json(spec("bounded", ", parallel: 4"))
    seen = httpx.get(f"{url}/lmflow/stats").json()
    assert bounded["steps"][0]["items"]["completed"] == 400
    assert seen["chat_requests"] == 400
    assert seen["max_in_flight"] == 4, seen
    # the same map without the bound does send more at once: the check above can fail
    httpx.post(f"{url}/lmflow/stats/reset")
    items.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(40)))
    run_json(spec("unbounded", ""))
    assert httpx.get(f"{url}/lmflow/stats").json()["max_in_flight"] > 4


@pytest.mark.engine
def test_the_triage_spec_on_the_test_server(
        prefect_api: str, lmstudio_server_factory: Callable[..., RunningServer]) -> None:
    # its own test server: the spec's prompts JIT-load a model that stays loaded, as in LM Studio
    _triage(lmstudio_server_factory(models=MODELS).url)


def _triage(lmstudio: str) -> None:
    # the command in the spec's comment, as quoted there
    out = lmflow_cmd("run", "specs/triage-tickets.yaml", "-p", f"lmstudio_url={lmstudio}", "--json")
    assert out.returncode == 0, out.stderr
    steps = {s["id"]: s for s in json.loads(out.stdout)["steps"]}
    extracted = steps["extract"]["output"]
    assert len(extracted) == 6 and steps["extract"]["items"]["total"] == 6
    assert all(t is None or set(t) == {"customer", "problem", "urgency"} for t in extracted)
    urgent = [t for t in extracted if t and t["urgency"] in ("high", "medium")]
    assert len(steps["reply"]["output"]) == len(urgent)
    assert steps["reply"]["items"]["skipped"] == 6 - len(urgent)
    assert steps["summary"]["output"]["tickets"] == 6
    # every item is cached: a second run asks the model nothing
    again = json.loads(lmflow_cmd("run", "specs/triage-tickets.yaml", "-p", f"lmstudio_url={lmstudio}",
                                  "--json").stdout)
    assert again["steps"][0]["items"]["cached"] == 6
    assert again["steps"][1]["items"]["cached"] == len(urgent)
    assert again["steps"][0]["output"] == extracted


@pytest.mark.engine
def test_the_classify_example_runs_as_the_readme_says(prefect_api: str) -> None:
    out = lmflow_cmd("run", "examples/classify.yaml", "--json", "--refresh")
    assert out.returncode == 0, out.stderr
    classify, tally = json.loads(out.stdout)["steps"]
    assert classify["items"]["total"] == 12
    labels = [x for x in classify["output"] if x is not None]
    assert len(classify["output"]) == 12
    assert all(x["sentiment"] in ("positive", "neutral", "negative") for x in labels)
    assert sum(tally["output"]["sentiment"].values()) + tally["output"]["unanswered"] == 12
