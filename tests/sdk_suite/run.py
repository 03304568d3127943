"""Run the `lmstudio` SDK's own test suite against lmflow's LM Studio stand-in (`make sdk-suite`).

The suite ships in the SDK's sdist on PyPI (`tests/`; its README says which models LM Studio must
have loaded). This script, from a fresh machine:

1. downloads the sdist of the `lmstudio` version installed here into build/sdk-suite/ (pip);
2. makes a venv there with that SDK and the suite's test tools (its own venv: lmflow's pytest
   plugin and settings stay out of it);
3. lays out an LM Studio models folder whose models are the bundled SmolLM2 file under the names
   the suite expects (lmstudio.yaml beside this script says which, and what cannot be served);
4. starts `lmflow testing serve --discoverable` on it, so that the suite's `Client()` finds it,
   and loads the suite's models with the suite's own `tests/load_models.py`;
5. runs the suite's sync and protocol-level tests (`tests/` without `tests/async/`, the async
   tests of the top-level files, and test_plugin_examples.py, whose examples are not in the sdist);
6. compares the outcome with expected_failures.yaml (test id: why it cannot pass here) and prints
   the counts. Exit status 1 if a test outside that list fails or a listed test passes (so the
   list stays honest; a listed test whose reason starts with "varies:" may pass: it asserts on
   what the small model writes), 0 otherwise.

Usage: `python tests/sdk_suite/run.py [-k EXPR] [--keep-going]`; extra pytest arguments after `--`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "sdk-suite"
#: the start of the reason of a listed test that passes or fails with what SmolLM2 writes
VARIES = "varies:"
#: the suite's test tools. pytest 8: the suite turns warnings into errors, and pytest 9 deprecates
#: what its parametrized tests do (and crashed rendering one of its failures)
TOOLS = ["pytest>=8.3,<9", "pytest-asyncio", "pytest-subtests", "pytest-timeout"]
SELECTION = ["tests", "--ignore=tests/async", "--ignore=tests/test_plugin_examples.py",
             "-m", "not asyncio"]
#: seconds any one test may take (a hang must not hold CI up)
TEST_TIMEOUT = 120


#: what the suite's tests/load_models.py does, except that a model that cannot be loaded is
#: reported, not fatal: that script expects LMStudioModelNotFoundError for a model not downloaded,
#: and LM Studio answers generic.pathNotFound, which SDK 1.5 does not map to it (1.6 does)
LOAD_MODELS = """
import lmstudio as lms
from tests.support import (EXPECTED_EMBEDDING_ID, EXPECTED_LLM_ID, EXPECTED_VLM_ID, LLM_LOAD_CONFIG,
                           TOOL_LLM_ID)
with lms.Client() as client:
    for session, key, config in [(client.llm, EXPECTED_LLM_ID, LLM_LOAD_CONFIG),
                                 (client.llm, EXPECTED_VLM_ID, LLM_LOAD_CONFIG),
                                 (client.llm, TOOL_LLM_ID, LLM_LOAD_CONFIG),
                                 (client.embedding, EXPECTED_EMBEDDING_ID, None)]:
        try:
            session.load_new_instance(key, config=config, ttl=None)
        except lms.LMStudioServerError as exc:
            print(f"sdk-suite: not loaded: {key}: {' '.join(str(exc).split())[:200]}")
"""


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def sdist(version: str) -> Path:
    """The unpacked sdist of lmstudio `version` (downloaded once)."""
    unpacked = BUILD / f"lmstudio-{version}"
    if not (unpacked / "tests").is_dir():
        BUILD.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                 "--no-deps", "--no-binary", ":all:", f"lmstudio=={version}", "-d", download])
            archive = next(Path(download).glob("lmstudio-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(BUILD, filter="data")
    return unpacked


def suite_python(version: str) -> Path:
    """A venv with lmstudio `version` and the suite's test tools (made once)."""
    home = BUILD / f"venv-{version}"
    python = home / "bin" / "python"
    marker = home / "ready"
    if not marker.exists():
        venv.create(home, with_pip=True, clear=True)
        run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             f"lmstudio=={version}", *TOOLS])
        marker.write_text(" ".join(TOOLS))
    return python


def models_folder(config: dict, folder: Path) -> None:
    """The LM Studio models folder of the config: each path a link to the bundled model."""
    from lmflow.backends.catalog import locate

    gguf = locate("smollm2-135m-instruct", folder / ".bundled")
    for path in config["models_folder"]:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(gguf)


def test_id_of(suite: Path, classname: str, name: str) -> str:
    """pytest's id of a JUnit test case (`tests.mod.Class` is `tests/mod.py::Class`)."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        if (suite / Path(*parts[:end])).with_suffix(".py").is_file():
            return "::".join(["/".join(parts[:end]) + ".py", *parts[end:], name])
    return f"{classname}::{name}"


def outcomes(suite: Path, junit: Path) -> dict[str, str]:
    """Test id -> passed, failed or skipped, from pytest's JUnit XML."""
    found: dict[str, str] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        test_id = test_id_of(suite, case.get("classname", ""), case.get("name", ""))
        if case.find("failure") is not None or case.find("error") is not None:
            found[test_id] = "failed"
        elif case.find("skipped") is not None:
            found.setdefault(test_id, "skipped")
        else:
            found.setdefault(test_id, "passed")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", help="run only the tests matching this pytest expression")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    from lmflow.testing.pytest_plugin import running_lmstudio_server

    started = time.monotonic()
    version = importlib.metadata.version("lmstudio")
    suite = sdist(version)
    python = suite_python(version)
    config = yaml.safe_load((HERE / "lmstudio.yaml").read_text())
    expected: dict[str, str] = yaml.safe_load((HERE / "expected_failures.yaml").read_text()) or {}
    with tempfile.TemporaryDirectory(prefix="lmflow-sdk-suite-") as tmp:
        work = Path(tmp)
        models_folder(config, work / "models")
        os.environ.setdefault("LMFLOW_HOME", str(work / "home"))  # the server's engine logs, PID files
        with running_lmstudio_server(work / "server", discoverable=True, models=config["models"],
                                     models_dir=str(work / "models")) as server:
            if server.sdk_host is None:
                print("sdk-suite: the SDK's five ports (41343, ...) are all taken: the suite's "
                      "Client() cannot find the stand-in", file=sys.stderr)
                return 2
            print(f"sdk-suite: lmstudio {version}'s tests against {server.url} "
                  f"(found by Client() at {server.sdk_host})", flush=True)
            run([str(python), "-c", LOAD_MODELS], cwd=suite)
            junit = work / "junit.xml"
            command = [str(python), "-m", "pytest", *SELECTION, "-q", "-p", "no:cacheprovider",
                       "--tb=line", "-o", "junit_family=xunit1", f"--junitxml={junit}",
                       f"--timeout={TEST_TIMEOUT}", *(["-k", args.k] if args.k else []),
                       *args.pytest_args]
            subprocess.run(command, cwd=suite, text=True)
        found = outcomes(suite, junit)
    return report(found, expected, time.monotonic() - started, selected=bool(args.k or args.pytest_args))


def report(found: dict[str, str], expected: dict[str, str], seconds: float, selected: bool) -> int:
    """Print the counts and what disagrees with the expected failures; the exit status."""
    passed = [t for t, o in found.items() if o == "passed"]
    failed = [t for t, o in found.items() if o == "failed"]
    unexpected = [t for t in failed if t not in expected]
    # (a test whose outcome depends on what the small model writes may pass: its reason says so)
    fixed = [t for t in passed if t in expected and not expected[t].startswith(VARIES)]
    missing = [] if selected else [t for t in expected if t not in found]
    print(f"\nsdk-suite: {len(found)} tests: {len(passed)} passed, {len(failed)} failed "
          f"({len(failed) - len(unexpected)} expected: listed in expected_failures.yaml), "
          f"{len(found) - len(passed) - len(failed)} skipped; {seconds:.0f} s")
    for title, tests in [("failed, not in expected_failures.yaml", unexpected),
                         ("passed, but listed in expected_failures.yaml (remove them)", fixed),
                         ("listed in expected_failures.yaml but not run", missing)]:
        if tests:
            print(f"\n{len(tests)} {title}:")
            print("\n".join(f"  {t}" for t in sorted(tests)))
    return 1 if unexpected or fixed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
