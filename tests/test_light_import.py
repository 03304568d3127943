"""`import lmflow`, `lmflow validate` and `--help` must not import Prefect (or lmstudio)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
{body}
heavy = sorted(m for m in ("prefect", "lmstudio", "httpx") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def heavy_modules(body: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("HEAVY="))
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def test_import_lmflow_is_light() -> None:
    assert heavy_modules("import lmflow") == []


def test_validate_does_not_import_prefect() -> None:
    body = ("from lmflow.cli import main\n"
            "main(['validate', 'examples/quickstart.yaml', 'specs/extract-ticket.yaml'])")
    assert "prefect" not in heavy_modules(body)


def test_help_does_not_import_prefect() -> None:
    body = "from lmflow.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass"
    assert "prefect" not in heavy_modules(body)


def test_public_api() -> None:
    import lmflow

    assert sorted(lmflow.__all__) == [
        "FixedModels", "LmflowError", "Problem", "RunResult", "Session", "Spec", "SpecError", "Step",
        "StepContext",
        "StepFailed", "StepResult", "load_spec", "register", "run", "spec_schema",
        "validate_files"]
    for name in lmflow.__all__:
        assert getattr(lmflow, name) is not None
