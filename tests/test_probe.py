"""The loadable-context probe against the test server, whose limits are known."""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from conftest import closing

from lmflow.backends.lmstudio import LMStudioBackend
from lmflow.probe import CLAMPED, LOAD_FAILED, probe_loadable, registry
from lmflow.spec.model import ModelConfig, ServerConfig
from lmflow.testing.pytest_plugin import running_lmstudio_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

FORGETFUL = [  # loads 2048, keeps only the last 200 tokens of a prompt
    {"key": "forgetful", "file": "smollm2-135m-instruct", "max_context_length": 2048,
     "working_context_length": 200, "answers": "retriever"},
]


@pytest.fixture(scope="module")
def forgetful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A test server whose model loads at 2048 but works nowhere: a key at the start of even the
    smallest fill is lost (the end's is still found)."""
    with running_lmstudio_server(tmp_path_factory.mktemp("forgetful"), models=FORGETFUL) as server:
        yield server.url


def backend(url: str) -> LMStudioBackend:
    return closing(LMStudioBackend(ServerConfig(name="default", backend="lmstudio", url=url)))


def nothing_loaded(url: str) -> bool:
    return all(m["loaded_instances"] == [] for m in httpx.get(f"{url}/api/v1/models").json()["models"])


@pytest.mark.parametrize(("key", "truth", "failure"), [("small-strict", 2048, LOAD_FAILED),
                                                        ("smollm2-135m-instruct", 3072, CLAMPED)])
def test_finds_the_loadable_maximum_within_the_granularity(lmstudio: str, key: str, truth: int,
                                                           failure: str) -> None:
    b = backend(lmstudio)
    try:
        report = probe_loadable(b, ModelConfig(alias="p", key=key), granularity=256, fresh=True)
    finally:
        b.close()
    assert report.declared_max == 8192
    assert truth - 256 < report.loadable_max <= truth
    bound = math.ceil(math.log2((8192 - 1024) / 256)) + 3
    assert report.loads <= bound
    assert failure in {a.outcome for a in report.attempts}  # clamping is not a pass
    assert nothing_loaded(lmstudio)
    assert any(e["model"] == key and e["loadable_max"] == report.loadable_max for e in registry())


def test_an_interrupted_probe_resumes_without_loading_again(lmstudio: str) -> None:
    b = backend(lmstudio)
    model = ModelConfig(alias="p", key="small-strict")
    loads = []
    real_load = b.load
    b.load = lambda m: loads.append(m.context_length) or real_load(m)  # type: ignore[method-assign]

    def stop_after_two(attempt: object) -> None:
        if len(loads) == 2:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            probe_loadable(b, model, fresh=True, on_attempt=stop_after_two)
        assert nothing_loaded(lmstudio)
        first = list(loads)
        report = probe_loadable(b, model)
    finally:
        b.close()
    assert report.loadable_max == 2048
    assert not set(first) & set(loads[len(first):])  # the finished attempts were not repeated


def test_an_interrupted_working_search_resumes_and_a_finished_one_replays(lmstudio: str) -> None:
    from lmflow.probe import probe_working, record_path

    b = backend(lmstudio)
    model = ModelConfig(alias="r", key="retriever")
    journal = record_path({"test": "resume-working"})
    journal.unlink(missing_ok=True)
    asked: list[str] = []
    loads: list[int | None] = []
    real_chat, real_load, real_unload = b.chat, b.load, b.unload
    b.chat = lambda r: asked.append(r.messages[0]["content"]) or real_chat(r)  # type: ignore[method-assign]
    b.load = lambda m: loads.append(m.context_length) or real_load(m)  # type: ignore[method-assign]

    def stop_after_six(trial: object) -> None:
        if len(asked) == 2 + 6:  # two calibration questions, then six trials
            raise KeyboardInterrupt

    def instances() -> list[tuple[str, int]]:
        models = httpx.get(f"{lmstudio}/api/v1/models").json()["models"]
        return [(i["id"], i["config"]["context_length"]) for m in models for i in m["loaded_instances"]]

    try:
        with pytest.raises(KeyboardInterrupt):
            probe_working(b, model, context_length=4096, granularity=256, journal=journal,
                          on_trial=stop_after_six)
        assert nothing_loaded(lmstudio)  # the interruption left nothing loaded
        first = set(asked[2:])
        asked.clear()
        # a SIGKILLed run cannot unload: its instance stays behind (journaled), and another
        # client has an instance of the same model
        b.unload = lambda m, every=False: []  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            probe_working(b, model, context_length=4096, granularity=256, journal=journal,
                          on_trial=lambda trial: (_ for _ in ()).throw(KeyboardInterrupt()))
        b.unload = real_unload  # type: ignore[method-assign]
        theirs = httpx.post(f"{lmstudio}/api/v1/models/load", timeout=120, json={
            "model": "retriever", "context_length": 2048}).json()["instance_id"]
        assert len(instances()) == 2
        asked.clear()
        working, trials = probe_working(b, model, context_length=4096, granularity=256, journal=journal)
        assert working == 2304
        assert instances() == [(theirs, 2048)]  # its own leftover unloaded first, another's left alone
        httpx.post(f"{lmstudio}/api/v1/models/unload", json={"instance_id": theirs}).raise_for_status()
        assert not first & set(asked[2:])  # answered trials were replayed, not asked again
        assert len(trials) == 6 + len(asked) - 2  # the same search: six replayed, the rest asked
        loads.clear()
        asked.clear()
        again, replayed = probe_working(b, model, context_length=4096, granularity=256, journal=journal)
        assert (again, loads, asked) == (2304, [], [])  # a finished search costs no load, no question
        assert [t.outcome for t in replayed] == [t.outcome for t in trials]
    finally:
        b.close()
        journal.unlink(missing_ok=True)


def test_the_registry_key_holds_the_server_version_and_the_model_variant(lmstudio: str) -> None:
    from lmflow.probe import ProbeMissing, probed_size

    b = backend(lmstudio)
    model = ModelConfig(alias="p", key="small-strict", context_length="probed: loadable")
    try:
        probe_loadable(b, dataclasses.replace(model, context_length=None), granularity=512, fresh=True)
        entry = next(e for e in registry() if e["model"] == "small-strict" and e["server"] == lmstudio)
        assert entry["version"] == "0.4.0-lmflow-test build 1"  # from the SDK's system namespace
        assert entry["variant"].startswith("gguf Q")  # format, quantization and file size
        assert probed_size(b, model) == 2048
        # a load-only probe has no working maximum: `probed` asks for one rather than take the other
        with pytest.raises(ProbeMissing, match=r"has no working maximum \(it was load-only, or judged "
                                               r"answers by an older rule; it loads at most 2048\): run "
                                               r"`lmflow probe small-strict --server "):
            probed_size(b, dataclasses.replace(model, context_length="probed"))
        b._version = "0.5.0 build 2"  # the server was upgraded: the old answer no longer holds
        with pytest.raises(ProbeMissing):
            probed_size(b, model)
    finally:
        b.close()


def test_probe_command(lmstudio: str) -> None:
    import json

    from conftest import lmflow_in_process

    out = lmflow_in_process("probe", "small-strict", "--server", lmstudio, "--json", "--fresh", "--load-only")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["loadable_max"] == 2048
    listed = lmflow_in_process("probe", "--list")
    line = next(x for x in listed.stdout.splitlines() if x.startswith(f"small-strict  {lmstudio}  "))
    assert line.startswith(f"small-strict  {lmstudio}  loadable max 2048  working max not measured  (gguf Q")
    assert line.endswith(", 0.4.0-lmflow-test build 1)")  # the variant and the server's version
    missing = lmflow_in_process("probe")
    assert missing.exit_code == 2 and "give a MODEL key, or --list" in missing.stderr


def test_finds_the_working_maximum_where_a_tiny_prompt_would_pass(lmstudio: str) -> None:
    from lmflow.backends.base import ChatRequest
    from lmflow.probe import probe_working

    b = backend(lmstudio)
    model = ModelConfig(alias="r", key="retriever")
    try:
        working, trials = probe_working(b, model, context_length=4096, granularity=256)
        # the truth is 2500 prompt tokens: the answer is the largest multiple of 256 below it
        assert working == 2304
        beyond = [t for t in trials if t.fill > 2500]
        assert beyond and all(t.outcome != "ok" for t in beyond if t.position == "start")
        assert any(t.outcome == "ok" for t in beyond if t.position == "end")  # only the start is lost
        assert all(t.prompt_tokens and abs(t.prompt_tokens - t.fill) < 64 for t in trials)
        assert all(t.first_token_seconds is not None for t in trials)  # streamed: time to first token
        assert nothing_loaded(lmstudio)
        # a short question near the end still gets answered far beyond the working limit
        b.load(dataclasses.replace(model, context_length=4096))
        filler = "The grass is green. " * 700 + "The pass key is 12345. What is the pass key?"
        answer = b.chat(ChatRequest(model=model, messages=[{"role": "user", "content": filler}]))
        assert answer.prompt_tokens > 3000 and answer.text == "12345"
    finally:
        b.unload(model)
        b.close()


def test_probe_command_reports_both_limits(lmstudio: str) -> None:
    from conftest import lmflow_in_process

    out = lmflow_in_process("probe", "retriever", "--server", lmstudio, "--granularity", "512", "--fresh")
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "retriever: declared 8192, loads at most 4096 (granularity 512, 5 loads)"
    assert lines[1] == ("retriever: works (pass key found at start, middle and end) up to 2048 "
                        "prompt tokens at context 4096")
    assert "fill  outcome  prompt tokens  first token  seconds  tokens/s" in lines[2]
    assert "fill    512 (start ): ok" in out.stderr
    chart = Path(lines[-1].split(": ", 1)[1])
    assert lines[-1].startswith("chart (pass/fail and speed against the fill): ")
    circles = ElementTree.parse(chart).getroot().findall("{http://www.w3.org/2000/svg}circle")
    fills = [line for line in lines[3:-1] if line.strip()]
    assert len(circles) == len(fills)  # one point per fill level
    assert {c.get("fill") for c in circles} == {"seagreen", "crimson"}  # passes below, fails above


def test_probe_step_then_load_at_the_probed_size(lmstudio: str, prefect_api: str, tmp_path) -> None:
    import json
    import textwrap

    from conftest import lmflow_cmd

    spec = tmp_path / "probed.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: probed
        server: {{backend: lmstudio, url: "{lmstudio}"}}
        models:
          r: {{key: retriever, context_length: probed - 10%}}
        steps:
          - id: measure
            probe_context: {{model: r, granularity: 512, fresh: true}}
          - id: load
            load_model: {{model: r}}
          - id: ask
            prompt: {{model: r, user: "The pass key is 424242. What is the pass key?"}}
        """))
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    steps = {s["id"]: s for s in result["steps"]}
    assert steps["measure"]["output"]["loadable_max"] == 4096
    assert steps["measure"]["output"]["working_max"] == 2048
    assert steps["load"]["output"]["context_length"] == int(2048 * 0.9)
    assert steps["ask"]["output"] == "424242"
    assert nothing_loaded(lmstudio)
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30,
                           json={"artifacts": {"key": {"any_": ["measure"]}}}).json()
    report = next(a["data"] for a in artifacts if "Context probe: retriever" in (a.get("data") or ""))
    # the chart is in the artifact as an image the UI shows (an SVG data URI)
    encoded = report.split("(data:image/svg+xml;base64,", 1)[1].split(")", 1)[0]
    svg = ElementTree.fromstring(base64.b64decode(encoded))
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert Path(steps["measure"]["output"]["chart"]).read_bytes() == base64.b64decode(encoded)


def test_probed_without_a_probe_says_how_to_get_one(lmstudio: str, prefect_api: str, tmp_path) -> None:
    import textwrap

    from conftest import lmflow_cmd

    spec = tmp_path / "unprobed.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        name: unprobed
        server: {{backend: lmstudio, url: "{lmstudio}"}}
        models:
          s: {{key: smollm2-135m-instruct, context_length: probed, options: {{flash_attention: true}}}}
        steps:
          - id: load
            load_model: {{model: s}}
        """))
    out = lmflow_cmd("run", str(spec))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"error: step 'load' failed: models.s: context_length 'probed' needs a probe of "
        f"'smollm2-135m-instruct' on {lmstudio}: run `lmflow probe smollm2-135m-instruct --server "
        f"{lmstudio}` or add a probe_context step before it")


def test_probe_against_the_real_model_on_the_managed_engine(prefect_api: str, tmp_path) -> None:
    """The bundled 135M model answers in a sentence ("The pass key is 65210."), which is right: it
    works up to the largest fill tried (exact match once judged every such answer wrong)."""
    import json
    import textwrap

    from conftest import lmflow_cmd

    spec = tmp_path / "real.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: real-probe
        models:
          smol: {key: smollm2-135m-instruct}
        steps:
          - id: measure
            probe_context: {model: smol, max: 4096, granularity: 2048, fresh: true}
        """))
    out = lmflow_cmd("run", str(spec), "--json", timeout=600)  # real inference on 2048-token prompts
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)["steps"][0]["output"]
    assert measured["loadable_max"] == 4096
    assert measured["working_max"] == 2048  # the largest multiple of 2048 below 4096 less the reserve
    assert measured["loads"] <= math.ceil(math.log2((4096 - 1024) / 2048)) + 3


def test_probe_command_on_the_managed_engine() -> None:
    from conftest import lmflow_cmd

    missing = lmflow_cmd("probe", "smollm2-135m-instruct", "--backend", "local", "--load-only")
    assert missing.returncode == 3
    assert missing.stderr.splitlines()[-1] == (
        "error: local: no declared maximum context for 'smollm2-135m-instruct': give the largest "
        "size to try (--max, or max: in the step)")
    out = lmflow_cmd("probe", "smollm2-135m-instruct", "--backend", "local", "--max", "2048",
                     "--load-only", "--fresh")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        "smollm2-135m-instruct: declared 2048, loads at most 2048 (granularity 1024, 2 loads)")



def test_a_probe_by_command_is_used_by_a_spec_on_the_managed_engine(prefect_api: str, tmp_path) -> None:
    """The probe record's key is the one a run computes: the engine's changing port and its args
    (a tuple, read back from JSON as a list) do not make the run miss it."""
    import json
    import textwrap

    from conftest import lmflow_cmd

    out = lmflow_cmd("probe", "smollm2-135m-instruct", "--backend", "local", "--max", "2048",
                     "--load-only", "--fresh")
    assert out.returncode == 0, out.stderr
    spec = tmp_path / "probed.yaml"
    text = textwrap.dedent("""\
        version: 1
        name: probed-local
        server: {backend: local}
        models:
          smol: {key: smollm2-135m-instruct, context_length: SIZE}
        defaults: {cache: false}
        steps:
          - id: load
            load_model: {model: smol}
        """)
    spec.write_text(text.replace("SIZE", '"probed: loadable"'))
    run = lmflow_cmd("run", str(spec), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["steps"][0]["output"]["context_length"] == 2048
    spec.write_text(text.replace("SIZE", "probed"))  # a load-only probe has no working maximum
    run = lmflow_cmd("run", str(spec))
    assert run.returncode == 1
    assert "`lmflow probe smollm2-135m-instruct --backend local`" in run.stderr, run.stderr


def test_a_probe_that_finds_no_working_context_says_so(forgetful: str) -> None:
    from conftest import lmflow_cmd

    out = lmflow_cmd("probe", "forgetful", "--server", forgetful, "--granularity", "512", "--fresh")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "forgetful: declared 2048, loads at most 2048 (granularity 512, 3 loads)"
    assert lines[1] == (
        "forgetful: NO WORKING CONTEXT FOUND at context 2048: even at the smallest fill, 512 prompt "
        "tokens, the pass key was not returned at start, middle and end (start wrong, middle wrong, "
        "end ok). `context_length: probed` will refuse this record; \"probed: loadable\" loads at the "
        "loadable maximum (2048) instead")
    assert "None" not in out.stdout
    listed = lmflow_cmd("probe", "--list").stdout.splitlines()
    assert any(x.startswith(f"forgetful  {forgetful}  loadable max 2048  working max NONE FOUND")
               for x in listed)


def test_probed_refuses_a_record_without_a_working_maximum(forgetful: str, prefect_api: str,
                                                           tmp_path: Path) -> None:
    import json

    from conftest import lmflow_cmd

    from lmflow.probe import ProbeMissing, probe_working, probed_size, record_path

    b = backend(forgetful)
    model = ModelConfig(alias="f", key="forgetful")
    try:
        report = probe_loadable(b, model, granularity=512, fresh=True)
        working, _ = probe_working(b, model, context_length=2048, granularity=512,
                                   journal=record_path(report.key))
        assert (report.loadable_max, working) == (2048, None)
        for text in ("probed", "probed - 10%"):
            with pytest.raises(ProbeMissing) as refused:
                probed_size(b, dataclasses.replace(model, context_length=text))
            assert str(refused.value) == (
                f"models.f: context_length '{text}': the probe of 'forgetful' on {forgetful} found no "
                "working maximum: even at the smallest fill the model did not return the pass key at "
                "start, middle and end (it loads at most 2048); write context_length: \"probed: "
                "loadable\" (or \"probed: loadable - 10%\") to load at the loadable maximum, 2048, or "
                "give a number of tokens")
        assert probed_size(b, dataclasses.replace(model, context_length="probed: loadable")) == 2048
        assert probed_size(b, dataclasses.replace(model, context_length="probed: loadable - 10%")) == 1843
    finally:
        b.close()
    # in a spec (the schema takes it), quoted: YAML reads an unquoted second colon as a mapping
    spec = tmp_path / "loadable.yaml"
    spec.write_text(f'version: 1\nname: loadable\nserver: {{backend: lmstudio, url: "{forgetful}"}}\n'
                    'models:\n  f: {key: forgetful, context_length: "probed: loadable - 10%"}\n'
                    'steps:\n  - id: load\n    load_model: {model: f}\n')
    out = lmflow_cmd("run", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps"][0]["output"]["context_length"] == 1843
    assert nothing_loaded(forgetful)


def test_an_engine_that_does_not_start_is_a_failed_load_not_an_aborted_probe(prefect_api: str,
                                                                               tmp_path) -> None:
    import json
    import textwrap

    from conftest import lmflow_cmd

    spec = tmp_path / "broken.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        name: broken-engine
        server: {backend: local, args: ["--no-such-llama-flag"]}
        models:
          smol: {key: smollm2-135m-instruct}
        steps:
          - id: measure
            probe_context: {model: smol, max: 2048, load_only: true, fresh: true}
        """))
    out = lmflow_cmd("run", str(spec), "--json", timeout=300)
    result = json.loads(out.stdout)
    step = result["steps"][0]
    assert step["status"] == "completed", (step, out.stderr)
    assert step["output"]["loadable_max"] is None
    assert step["output"]["loads"] == 1  # the smallest size failed: nothing larger is tried
    assert any(e["event"] == "warning" and "loads at no size tried (not even 1024): llama-server for "
               "'smol' exited with code 1 while starting" in e["message"] and "--no-such-llama-flag"
               in e["message"] for e in result["events"]), result["events"]
