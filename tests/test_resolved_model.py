"""One resolved model per use: what a step's cache key holds is what the step ran with.

A `probed` size enters the key as the number the registry holds (a new probe is a new key), and
the code that may answer or choose a cached answer (python fallbacks, a response-cache key
function) is part of it, so editing that code recomputes the step.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import lmflow_cmd

from lmflow.engine.records import RunRecorder
from lmflow.engine.runtime import Runtime
from lmflow.spec import load_spec

HELPERS = """\
def model_fallback(request):
    return "model's own"


def step_fallback(request):
    return "step's own"


def key(request):
    return request["messages"][-1]["content"]
"""


def _key(spec_path: Path) -> str:
    spec = load_spec(spec_path)
    recorder = RunRecorder(spec)
    runtime = Runtime(spec, recorder)
    try:
        step = spec.steps[0]
        return runtime.cache_key(step, runtime.resolve(step))
    finally:
        runtime.close()
        recorder.save()


def test_the_step_key_holds_the_code_that_may_answer(tmp_path: Path) -> None:
    helpers = tmp_path / "helpers.py"
    helpers.write_text(HELPERS)
    spec = tmp_path / "code.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: code
        server: {backend: openai, url: "http://127.0.0.1:9"}
        models:
          m: {key: any, fallback: [{python: "helpers:model_fallback"}]}
        steps:
          - id: ask
            prompt:
              model: m
              user: hi
              fallback: [{python: "helpers:step_fallback"}]
              response_cache: {key: "helpers:key"}
        """))
    first = _key(spec)
    assert _key(spec) == first  # nothing changed: the same key
    for old, new in (('"model\'s own"', '"model\'s own, changed"'), ('"step\'s own"', '"step\'s, changed"'),
                     ('["content"]', '["content"].lower()')):
        before = _key(spec)
        helpers.write_text(helpers.read_text().replace(old, new))
        assert _key(spec) != before, f"changing {old} did not change the key"


def test_a_new_probe_is_a_new_step_key(lmstudio: str, prefect_api: str, tmp_path: Path) -> None:
    """`probed: loadable` enters the key as the size: the same probe reuses the answer, a probe
    that measured another size recomputes it (and loads at the new size)."""

    def probe(maximum: int) -> None:
        out = lmflow_cmd("probe", "small-strict", "--server", lmstudio, "--max", str(maximum),
                         "--granularity", "512", "--load-only", "--fresh")
        assert out.returncode == 0, out.stderr

    def run() -> dict[str, str]:
        out = lmflow_cmd("run", str(spec), "--json")
        assert out.returncode == 0, out.stderr
        return {s["id"]: s for s in json.loads(out.stdout)["steps"]}

    spec = tmp_path / "probed-key.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: probed-key
        server: {{backend: lmstudio, url: "{lmstudio}"}}
        models:
          s: {{key: small-strict, context_length: "probed: loadable"}}
        steps:
          - id: ask
            prompt: {{model: s, user: "Say yes.", max_tokens: 4}}
        """))
    probe(2048)
    first = run()["ask"]
    assert first["status"] == "completed"
    assert run()["ask"]["status"] == "cached"
    probe(2048)  # measured again, the same size: still the same step
    assert run()["ask"]["status"] == "cached"
    probe(1024)  # a smaller size now: the model runs at it, the answer is asked again
    assert run()["ask"]["status"] == "completed"
    out = lmflow_cmd("run", str(spec), "--json")
    assert json.loads(out.stdout)["steps"][0]["status"] == "cached"


def test_a_probed_model_without_a_probe_fails_its_step_not_the_run(lmstudio: str, prefect_api: str,
                                                                   tmp_path: Path) -> None:
    """The key is computed before the step runs; a `probed` size with no probe behind it fails
    that step with the probe's hint, and independent steps still run."""
    (tmp_path / "helpers.py").write_text("def one():\n    return 1\n")
    spec = tmp_path / "unprobed-key.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: unprobed-key
        server: {{backend: lmstudio, url: "{lmstudio}"}}
        models:
          s: {{key: small-strict, context_length: probed}}
        steps:
          - id: ask
            prompt: {{model: s, user: "Say yes.", max_tokens: 4}}
          - id: other
            python: {{function: "helpers:one"}}
        """))
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 1
    steps = {s["id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["other"]["status"] == "completed"
    assert steps["ask"]["status"] == "failed"
    assert "needs a probe of 'small-strict'" in steps["ask"]["error"]["message"]
