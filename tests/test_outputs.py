"""A map's output on disk (lmflow.engine.outputs): written in input order, read on demand, whole in JSON."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from lmflow.datasets import items, read_dataset
from lmflow.engine.outputs import NOTHING, MapOutput, OutputWriter, journal_default, write_json
from lmflow.spec import templates
from lmflow.spec.expressions import parse_expression
from lmflow.spec.model import Foreach


def written(tmp_path: Path, puts: list[tuple[int, object]]) -> MapOutput:
    failures: list[object] = []
    writer = OutputWriter(tmp_path / "run" / "m.jsonl", lambda path, exc: failures.append(exc))
    for index, value in puts:
        writer.put(index, value)
    assert not failures
    return writer.close()


def test_outputs_are_written_in_input_order_whatever_order_items_finish_in(tmp_path: Path) -> None:
    output = written(tmp_path, [(2, {"n": 2}), (0, {"n": 0}), (3, NOTHING), (1, None), (4, "é")])
    assert list(output) == [{"n": 0}, None, {"n": 2}, "é"] and len(output) == 4
    assert output == [{"n": 0}, None, {"n": 2}, "é"] and output != [{"n": 0}]
    assert (output[2], output[-1], output[1:3]) == ({"n": 2}, "é", [None, {"n": 2}])
    assert pickle.loads(pickle.dumps(output)) == output  # a copy reads the file itself
    assert journal_default(output) == {"file": str(tmp_path / "run" / "m.jsonl"), "items": 4}


def test_json_holds_the_whole_list_written_row_by_row(tmp_path: Path) -> None:
    output = written(tmp_path, [(i, {"i": i}) for i in range(3)])
    stream = io.StringIO()
    write_json(stream, {"steps": [{"id": "m", "output": output}, {"id": "n", "output": [1]}], "x": "\x00"})
    assert json.loads(stream.getvalue()) == {"steps": [{"id": "m", "output": [{"i": 0}, {"i": 1}, {"i": 2}]},
                                                       {"id": "n", "output": [1]}], "x": "\x00"}
    empty = io.StringIO()
    write_json(empty, {"output": written(tmp_path, [(0, NOTHING)])})
    assert json.loads(empty.getvalue()) == {"output": []}


def test_templates_and_conditions_read_it_like_a_list(tmp_path: Path) -> None:
    output = written(tmp_path, [(i, {"label": f"l{i}"}) for i in range(5)])
    names = {"params": {}, "steps": {"m": {"output": output}}}
    # a whole reference in a step's options is a real list; a piece of text its JSON
    whole = templates.render("${{ steps.m.output }}", names)
    assert type(whole) is list and whole[4] == {"label": "l4"}
    assert templates.render("${{ steps.m.output[3].label }}", names) == "l3"
    assert templates.render("all: ${{ steps.m.output }}", names).startswith('all: [{"label": "l0"}')
    # a foreach over it streams it
    assert items(Foreach("value", "${{ steps.m.output }}"), tmp_path,
                 templates.value_of("${{ steps.m.output }}", names)) is output
    condition = parse_expression("len(steps.m.output) == 5 and steps.m.output[1].label == 'l1'",
                                 ("params", "steps"))
    assert condition.evaluate(names) is True


def test_a_map_s_items_sit_next_to_its_output_read_on_demand(tmp_path: Path) -> None:
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\nnot json\n{"text": "e"}\n')
    rows = read_dataset(dataset, "rows.jsonl")
    writer = OutputWriter(tmp_path / "run" / "m.jsonl", lambda path, exc: None)
    # item 2 was skipped (its condition was false), item 3 a broken row collected as null
    for index, value in [(4, {"urgent": True}), (1, {"urgent": False}), (0, {"urgent": False}), (2, NOTHING),
                         (3, None)]:
        writer.put(index, value)
    output, inputs = writer.close(), writer.inputs(rows)
    rows.close()  # (the map is over: its dataset is read again when its items are asked for)
    assert len(inputs) == len(output) == 4
    assert list(inputs) == [{"text": "a"}, {"text": "b"}, None, {"text": "e"}] and inputs[-1] == {"text": "e"}
    assert inputs == inputs[0:4] and pickle.loads(pickle.dumps(output)) == output
    names = {"params": {}, "steps": {"m": {"output": output, "items": inputs}}}
    assert templates.render("${{ steps.m.items }}", names) == list(inputs)
    assert templates.render("${{ steps.m.items[3].text }}", names) == "e"
    urgent = parse_expression("where(steps.m.output, 'urgent') and steps.m.items[3].text == 'e' "
                              "and any(pluck(steps.m.output, 'urgent'))", ("steps",))
    assert urgent.evaluate(names) is True
    texts = parse_expression("pluck(steps.m.items, 'text')", ("steps",)).evaluate(names)
    assert texts == ["a", "b", None, "e"]
    assert items(Foreach("value", "${{ steps.m.items }}"), tmp_path,
                 templates.value_of("${{ steps.m.items }}", names)) is inputs  # a map over them streams them
