"""One lifecycle for every unit: the same step at the top level, as a map item and inside a checkpoint.

Each place asks lmflow.engine.unit for the same rules: a fallback's cached answer is not
reused, a `when` that cannot be evaluated fails the unit with one message, attempts are the
unit's own, and the outcome is recorded with the same fields. Real `lmflow run` processes
against a real Prefect server; the model server is down on purpose (a port nobody listens
on), so every answer comes from the fallback.
"""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from conftest import lmflow_cmd

pytestmark = pytest.mark.prefect

HELPERS = """\
def init():
    return {"x": 0}


def body(state, generation):
    return {"g": generation}


def plain():
    return "plain"


def boom():
    raise RuntimeError("always")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp_path: Path, name: str, unit: str, top: str, item: str, nested: str) -> Path:
    """A spec with `unit` (a step's body) at the top level, as a map's item and in a checkpoint;
    `top`, `item`, `nested` are each place's extra line (a `when`, say)."""
    (tmp_path / "unithelp.py").write_text(HELPERS)

    def body(indent: int, extra: str) -> str:
        lines = ([extra] if extra else []) + textwrap.dedent(unit).strip().splitlines()
        return "".join(" " * indent + line + "\n" for line in lines)

    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"version: 1\nname: {name}\n"
        "servers:\n"
        "  default: {backend: local}\n"
        f"  down: {{backend: openai, url: 'http://127.0.0.1:{_free_port()}'}}\n"
        "models:\n"
        "  big: {key: some-big-model, server: down, fallback: [{value: later}]}\n"
        "steps:\n"
        "  - id: top\n" + body(4, top)
        + "  - id: each\n    foreach: [1]\n    on_item_error: collect\n" + body(4, item)
        + "  - id: evolve\n    cache: false\n    loop:\n      init: unithelp:init\n"
          "      body: unithelp:body\n      generations: 1\n      checkpoints:\n        - at: 1\n"
          "          steps:\n            - id: plain\n              python: {function: 'unithelp:plain'}\n"
          "            - id: nested\n" + body(14, nested))
    return path


def _run(spec: Path) -> dict:
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


def _places(run: dict) -> dict[str, dict]:
    """What each place recorded of its unit: the step's record, the item's journal line (or
    the map's problem), the checkpoint step's entry in the loop's analysis."""
    steps = {s["id"]: s for s in run["steps"]}
    journal = [json.loads(line) for line in Path(run["record_path"]).with_suffix(".jsonl").read_text()
               .splitlines()]
    item = next(e for e in journal if e.get("step") == "each" and e.get("item") == 0)
    (analysis,) = steps["evolve"]["output"]["analyses"]
    return {"top": steps["top"], "item": item, "nested": analysis["steps"]["nested"],
            "nested_plain": analysis["steps"]["plain"], "each": steps["each"]}


def test_a_fallback_answer_is_asked_again_wherever_the_step_stands(prefect_api: str, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "units-cache", """\
        prompt: {model: big, user: "Say hi."}
        """, "", "", "")
    first, second = _places(_run(spec)), _places(_run(spec))
    for places in (first, second):
        # answered by the fallback everywhere, recorded with the same fields
        assert places["top"]["answered_by"] == {"link": 1, "target": "static value"}
        assert places["nested"]["answered_by"] == places["top"]["answered_by"]
        assert places["top"]["output"] == places["item"]["output"] == places["nested"]["output"] == "later"
    # the second run asks again in all three places (before, the checkpoint's step was served
    # its cached fallback answer); an answer from the first link is still reused
    assert [second[p]["status"] for p in ("top", "item", "nested")] == ["completed"] * 3
    assert first["nested_plain"]["status"] == "completed" and second["nested_plain"]["status"] == "cached"
    # nor does a journal give it back: the item's line holds no cache key
    assert "key" not in first["item"] and "key" not in second["item"]


def test_attempts_and_a_broken_condition_are_the_same_in_every_place(prefect_api: str,
                                                                        tmp_path: Path) -> None:
    spec = _spec(tmp_path, "units-attempts", """\
        retries: 1
        retry_delay: 0s
        python: {function: "unithelp:boom"}
        """, "", "", "")
    places = _places(_run(spec))
    top, item, nested = places["top"]["error"], places["item"]["error"], places["nested"]
    # two attempts each: before, an item said 1 and a checkpoint step said its loop's count
    assert top["attempts"] == item["attempts"] == nested["attempts"] == 2
    assert top["message"] == item["message"] == nested["message"]
    assert top["message"].startswith("unithelp:boom raised RuntimeError: always")
    assert places["each"]["item_problems"][0]["attempts"] == 2

    spec = _spec(tmp_path, "units-when", """\
        python: {function: "unithelp:plain"}
        """, "when: ${{ params.n > 'x' }}", "when: ${{ item > 'x' }}", "when: ${{ loop.generation > 'x' }}")
    spec.write_text("params: {n: 1}\n" + spec.read_text())
    places = _places(_run(spec))
    messages = [places["top"]["error"]["message"], places["item"]["error"]["message"],
                places["nested"]["message"]]
    assert all(m.startswith("when: ") for m in messages), messages
    assert [places["top"]["error"]["error_type"], places["item"]["error"]["error_type"],
            places["nested"]["error_type"]] == ["TemplateError"] * 3
