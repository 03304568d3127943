"""foreach, when, parallel and on_item_error in specs: validation with positions, the graph, datasets."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lmflow import SpecError, load_spec
from lmflow.datasets import DatasetError, items, read_dataset, read_glob
from lmflow.spec.model import Foreach


def write(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    (tmp_path / "helpers.py").write_text("def f(**kw):\n    return kw\n")
    path = tmp_path / name
    path.write_text("version: 1\nname: t\n" + textwrap.dedent(body))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return [p.render() for p in caught.value.problems]


def test_foreach_when_and_their_references_make_the_graph(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        params: {docs: [a, b], limit: 3}
        steps:
          - id: split
            python: {function: "helpers:f", args: {x: 1}}
          - id: gate
            python: {function: "helpers:f"}
          - id: each
            foreach: ${{ steps.split.output.parts }}
            when: item.size > params.limit and steps.gate.output.ok
            parallel: 2
            on_item_error: collect
            python: {function: "helpers:f", args: {text: "${{ item.text }}", at: "${{ index }}"}}
          - id: literal
            foreach: ["${{ params.limit }}", 2]
            python: {function: "helpers:f", args: {n: "${{ item }}"}}
    """))
    each = spec.step("each")
    assert set(each.depends_on) == {"split", "gate"}
    assert each.foreach == Foreach("value", "${{ steps.split.output.parts }}")
    assert (each.parallel, each.on_item_error) == (2, "collect")
    assert each.when.test({"params": {"limit": 3}, "item": {"size": 4},
                           "steps": {"gate": {"output": {"ok": True}}}, "index": 0})
    assert spec.step("literal").foreach.value == ["${{ params.limit }}", 2]
    assert spec.max_parallel == 4


def test_max_parallel_in_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        defaults: {max_parallel: 7}
        steps: [{id: a, python: {function: "helpers:f"}}]
    """))
    assert spec.max_parallel == 7


def test_item_outside_a_map_and_bad_conditions_are_errors_with_positions(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        params: {n: 1}
        steps:
          - id: a
            python: {function: "helpers:f", args: {x: "${{ item.x }}"}}
          - id: b
            when: params.n >
            python: {function: "helpers:f"}
          - id: c
            when: "item.ok"
            python: {function: "helpers:f"}
          - id: d
            when: params.m == 1 and steps.nope.output
            python: {function: "helpers:f"}
          - id: e
            parallel: 2
            python: {function: "helpers:f"}
          - id: f
            when: "__import__('os')"
            python: {function: "helpers:f"}
    """)
    found = problems(path)
    assert any(p.startswith(f"{path}:6:") and "steps[0].python.args.x: 'item.x': item is only defined "
               "in a step with foreach" in p for p in found), found
    assert any(p.startswith(f"{path}:8:") and "invalid condition" in p for p in found), found
    # the column points inside the quoted expression: `when: "item.ok"` -> the i of item
    assert any(p.startswith(f"{path}:11:12:") and "invalid condition" in p for p in found), found
    assert any(p.startswith(f"{path}:14:11:") and "unknown parameter 'm'" in p for p in found), found
    assert any(p.startswith(f"{path}:14:") and "unknown step 'nope'" in p for p in found), found
    assert any("steps[4].parallel: 'parallel' applies to the items of a foreach" in p for p in found), found
    assert any(p.startswith(f"{path}:20:") and "invalid condition" in p for p in found), found


def test_foreach_sources_are_checked(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("x")
    path = write(tmp_path, """\
        steps:
          - id: a
            foreach: {file: missing.jsonl}
            python: {function: "helpers:f"}
          - id: b
            foreach: {file: data.txt}
            python: {function: "helpers:f"}
          - id: c
            foreach: "not a reference"
            python: {function: "helpers:f"}
          - id: d
            foreach: ["${{ item }}"]
            python: {function: "helpers:f"}
          - id: e
            foreach: 3
            python: {function: "helpers:f"}
    """)
    found = problems(path)
    assert any(":5:" in p and "file not found: missing.jsonl" in p for p in found), found
    assert any(":8:" in p and "cannot read data.txt as a dataset" in p and ".jsonl" in p
               for p in found), found
    assert [p for p in found if ":11:" in p] == [
        f"{path}:11:14: steps[2].foreach: foreach 'not a reference' is neither a list nor one reference "
        "(e.g. foreach: ${{ steps.split.output }} or {file: data.jsonl})"]
    assert any(":14:" in p and "foreach cannot refer to its own items" in p for p in found), found
    assert any(":17:" in p and "steps[4].foreach: invalid value 3" in p for p in found), found


def test_references_into_a_map_output_are_lists(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        steps:
          - id: m
            foreach: [1, 2]
            prompt: {model: x, user: "${{ item }}", response_schema: {type: object, properties: {a: {}}}}
          - id: ok
            python: {function: "helpers:f", args: {first: "${{ steps.m.output[0].a }}"}}
          - id: bad
            python: {function: "helpers:f", args: {a: "${{ steps.m.output.a }}"}}
        models: {x: {key: smollm2-135m-instruct}}
    """)
    found = problems(path)
    assert len(found) == 1 and "steps.m.output.a: output is array, it has no field 'a'" in found[0], found


def test_datasets_jsonl_json_csv_and_glob(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    (tmp_path / "d.json").write_text('[{"a": 1}, 2]')
    (tmp_path / "d.csv").write_text("a,b\n1,x\n2,y\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "2.txt").write_text("two")
    (tmp_path / "docs" / "1.txt").write_text("one")
    assert list(read_dataset(tmp_path / "d.jsonl", "d.jsonl")) == [{"a": 1}, {"a": 2}]
    assert read_dataset(tmp_path / "d.json", "d.json") == [{"a": 1}, 2]
    assert list(read_dataset(tmp_path / "d.csv", "d.csv")) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}]
    assert list(read_glob(tmp_path, "docs/*.txt")) == [
        {"path": "docs/1.txt", "name": "1.txt", "text": "one"},
        {"path": "docs/2.txt", "name": "2.txt", "text": "two"}]
    assert list(read_glob(tmp_path, "nothing/*.txt")) == []


def test_dataset_errors_say_where(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    (tmp_path / "obj.json").write_text('{"a": 1}')
    (tmp_path / "wide.csv").write_text("a\n1,2\n")
    good, broken = read_dataset(tmp_path / "bad.jsonl", "bad.jsonl")  # a broken row is its item's error
    assert good == {"a": 1}
    assert str(broken.error()).startswith("bad.jsonl:2: not a JSON value")
    with pytest.raises(DatasetError, match=r"obj.json holds a dict, not a list"):
        read_dataset(tmp_path / "obj.json", "obj.json")
    (broken,) = read_dataset(tmp_path / "wide.csv", "wide.csv")
    assert str(broken.error()) == "wide.csv:2: the row has more fields than the header"
    with pytest.raises(DatasetError, match=r"foreach needs a list, got dict"):
        items(Foreach("value", "${{ params.x }}"), tmp_path, {"a": 1})
    with pytest.raises(DatasetError, match=r"dataset not found: gone.csv"):
        items(Foreach("file", "gone.csv"), tmp_path)


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    from lmflow.engine.records import StepRecord
    from lmflow.render.report import Progress

    record = StepRecord("each", "prompt", status="running")
    events = [{"step": record, "progress": {"total": 4, "done": n, "completed": n, "failed": 0,
                                            "rate": 2.0, "eta": (4 - n) / 2}} for n in (1, 2, 3, 4)]
    tty = Progress(_Stream(tty=True))
    for data in events[:2]:
        tty.event("item_finished", data)
    assert tty.stream.text.endswith("  each [############............] 2/4 2.0/s ~1s")
    tty.event("warning", {"step": "each", "message": "careful"})
    # a line printed while the bar shows: the bar is cleared, the line printed, the bar drawn again
    assert "\r\x1b[K  warning: each: careful\n  each [####" in tty.stream.text

    plain = Progress(_Stream(tty=False))
    for data in events:
        plain.event("item_finished", data)
    lines = plain.stream.text.splitlines()
    assert lines == ["  each: 1/4 items (2.0/s, ~2s left)", "  each: 4/4 items (2.0/s)"]
    assert "\r" not in plain.stream.text


def test_written_order_holds_around_lifecycle_steps_and_after(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        servers:
          studio: {backend: lmstudio, url: "http://127.0.0.1:1"}
        models:
          coach: {key: c, server: studio}
          other: {key: o, server: studio}
        steps:
          - id: up
            ensure_server: {server: studio}
          - id: load
            load_model: {model: coach}
          - id: ask
            prompt: {model: coach, user: hi}
          - id: side
            prompt: {model: other, user: hi}
          - id: fresh
            reload_model: {model: coach}
          - id: ask2
            prompt: {model: coach, user: hi}
          - id: note
            after: [side]
            python: {function: "helpers:f"}
          - id: bye
            unload_model: {model: coach}
    """))
    deps = {s.id: set(s.depends_on) for s in spec.steps}
    assert deps["up"] == set()
    assert deps["load"] == {"up"}
    assert deps["ask"] == {"load", "up"}
    assert deps["side"] == {"up"}  # another model: not ordered after coach's load
    assert deps["fresh"] == {"load", "ask", "up"}
    assert deps["ask2"] == {"fresh", "up"}
    assert deps["note"] == {"side"}
    assert deps["bye"] == {"fresh", "ask2", "up"}
    bad = write(tmp_path, """\
        steps:
          - id: a
            after: [a, nope]
            python: {function: "helpers:f"}
    """, name="bad.yaml")
    assert [p.split(": ", 1)[1] for p in problems(bad)] == [
        "steps[0].after[0]: step 'a' cannot come after itself",
        "steps[0].after[1]: unknown step 'nope'"]


def test_a_map_s_grain_is_validated_and_shown_by_plan(tmp_path: Path) -> None:
    from lmflow.render.report import plan

    spec = load_spec(write(tmp_path, """\
        steps:
          - id: each
            foreach: [1, 2, 3]
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
          - id: chunked
            foreach: [1, 2, 3]
            grain: 2
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
          - id: items
            foreach: [1, 2, 3]
            grain: item
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
        """))
    assert [s.grain for s in spec.steps] == ["auto", 2, "item"]
    foreach = [line.strip() for line in plan(spec).splitlines() if line.strip().startswith("foreach")]
    assert [line.rsplit("on_item_error fail", 1)[1] for line in foreach] == [
        "", ", chunks of 2", ", a task run per item"]
    path = write(tmp_path, """\
        steps:
          - id: one
            grain: 5
            python: {function: "helpers:f"}
        """)
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        "steps[0].grain: 'grain' applies to the items of a foreach (add foreach: to this step, or remove it)"]


def test_distribute_is_for_maps_in_chunks_and_shown_by_plan(tmp_path: Path) -> None:
    from lmflow.render.report import plan

    spec = load_spec(write(tmp_path, """\
        steps:
          - id: far
            foreach: [1, 2, 3]
            distribute: true
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
        """))
    assert spec.steps[0].distribute
    assert "on_item_error fail, chunks on task workers (distribute)" in plan(spec)
    spec = load_spec(write(tmp_path, """\
        defaults: {distribute: true}
        steps:
          - id: one
            python: {function: "helpers:f"}
          - id: far
            foreach: [1, 2, 3]
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
          - id: here
            foreach: [1, 2, 3]
            distribute: false
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
          - id: items
            foreach: [1, 2, 3]
            grain: item
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
        """))
    assert [s.distribute for s in spec.steps] == [False, True, False, False]
    path = write(tmp_path, """\
        steps:
          - id: one
            distribute: true
            python: {function: "helpers:f"}
          - id: each
            foreach: [1, 2]
            distribute: true
            grain: item
            python: {function: "helpers:f", args: {x: "${{ item }}"}}
        """)
    assert [p.split(": ", 1)[1] for p in problems(path)] == [
        "steps[0].distribute: 'distribute' applies to the items of a foreach (add foreach: to this step, "
        "or remove it)",
        "steps[1].grain: a distributed map travels in chunks, not item by item (remove grain (chunks sized "
        "for the map), or give the items per chunk, e.g. grain: 200)"]


def test_dataset_rows_are_read_when_asked_for_not_held(tmp_path: Path) -> None:
    import tracemalloc

    row = {"text": "x" * 2000}
    path = tmp_path / "big.jsonl"
    with path.open("w") as file:
        for i in range(10_000):  # 20 MB
            file.write(json.dumps({"i": i, **row}) + "\n")
    tracemalloc.start()
    try:
        rows = read_dataset(path, "big.jsonl")
        seen = sum(r["i"] for r in rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 10_000 and seen == sum(range(10_000))
    assert rows[-1]["i"] == 9_999 and rows[2:4] == [{"i": 2, **row}, {"i": 3, **row}]
    assert peak < path.stat().st_size / 10, peak  # the index and a row, never the file
    rows.close()


def test_csv_rows_with_quoted_newlines_blank_lines_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b'a,b\n1,"two\nlines"\n\n3\n4,\xff\n5,six\n')
    rows = read_dataset(path, "d.csv")
    assert [rows[0], rows[1]] == [{"a": "1", "b": "two\nlines"}, {"a": "3", "b": None}]
    assert str(rows[2].error()).startswith("d.csv:6: not UTF-8 text")
    assert rows[3] == {"a": "5", "b": "six"} and len(rows) == 4
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"a": 1}\n"\xff"\n')
    assert str(read_dataset(jsonl, "d.jsonl")[1].error()).startswith("d.jsonl:2: not UTF-8 text")


def test_a_dataset_path_may_come_from_params(tmp_path: Path) -> None:
    (tmp_path / "one.jsonl").write_text('{"a": 1}\n')
    path = write(tmp_path, """
        params: {dataset: one.jsonl}
        steps:
          - id: m
            foreach: {file: "${{ params.dataset }}"}
            python: {function: "helpers:f", args: {a: "${{ item.a }}"}}
          - id: bad
            foreach: {file: "${{ params.nothing }}"}
            python: {function: "helpers:f", args: {a: "${{ item.a }}"}}
    """)
    found = problems(path)
    assert len(found) == 1 and "foreach.file: unknown parameter 'nothing'" in found[0], found
    assert list(items(Foreach("file", "${{ params.dataset }}"), tmp_path, "one.jsonl")) == [{"a": 1}]
    with pytest.raises(DatasetError, match=r"cannot read one.txt as a dataset"):
        items(Foreach("file", "${{ params.dataset }}"), tmp_path, "one.txt")
    with pytest.raises(DatasetError, match=r"resolved to None, not a path"):
        items(Foreach("file", "${{ params.dataset }}"), tmp_path, None)


def test_a_map_s_items_are_steps_id_items_only_for_a_map(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        params: {docs: [a, b]}
        steps:
          - id: m
            foreach: ${{ params.docs }}
            python: {function: "helpers:f", args: {doc: "${{ item }}"}}
          - id: pairs
            when: any(pluck(steps.m.output, 'x')) and len(steps.m.items) == len(steps.m.output)
            python:
              function: "helpers:f"
              args: {docs: "${{ steps.m.items }}", first: "${{ steps.m.items[0] }}"}
          - id: again
            foreach: ${{ steps.m.items }}
            python: {function: "helpers:f", args: {doc: "${{ item }}"}}
    """))
    assert spec.step("pairs").depends_on == ("m",) and spec.step("again").depends_on == ("m",)

    path = write(tmp_path, """\
        steps:
          - id: plain
            python: {function: "helpers:f"}
          - id: a
            python: {function: "helpers:f", args: {x: "${{ steps.plain.items }}"}}
          - id: b
            when: steps.plain.inputs
            python: {function: "helpers:f"}
    """, "bad.yaml")
    assert problems(path) == [
        f"{path}:7:47: steps[1].python.args.x: 'steps.plain.items': step 'plain' has no foreach: only a map "
        "has items (refer to its output, steps.plain.output)",
        f"{path}:9:11: steps[2].when: 'steps.plain.inputs': a step reference is steps.ID.output[.field...] "
        "(a map's items are steps.ID.items)"]
