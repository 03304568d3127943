"""What each package may import (docs/architecture.md draws it): read from the source, lazy imports too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmflow"

#: the only package whose modules import Prefect: the adapter between the engine and Prefect
PREFECT_ADAPTER = "lmflow.prefect"

#: package (or module) -> lmflow modules it must not import, at any depth
FORBIDDEN = {
    "lmflow.engine": ("lmflow.prefect", "lmflow.compile", "lmflow.cli", "lmflow.render"),
    # (a kind sees the run through its StepContext; it names lmflow.engine.unit's Lifecycle as a type.
    # It may render its own text: the loop draws charts, probe_context words its verdicts)
    "lmflow.steps": ("lmflow.prefect", "lmflow.compile", "lmflow.cli", "lmflow.engine.scheduler",
                     "lmflow.engine.runtime", "lmflow.engine.records", "lmflow.engine.recovery",
                     "lmflow.engine.working_directory", "lmflow.render.report", "lmflow.render.history"),
    "lmflow.backends": ("lmflow.prefect", "lmflow.compile", "lmflow.cli", "lmflow.engine", "lmflow.steps",
                        "lmflow.render"),
    # (the spec reads the kinds and backends registered, to assemble its schema)
    "lmflow.spec": ("lmflow.prefect", "lmflow.compile", "lmflow.cli", "lmflow.engine", "lmflow.render"),
    # the text for humans: given its data by the commands and the adapter, which fetch it
    "lmflow.render": ("lmflow.prefect", "lmflow.compile", "lmflow.cli", "lmflow.engine.scheduler"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module the file imports, wherever the import statement stands (lazy ones included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
    return found


def _modules() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_only_the_prefect_adapter_imports_prefect() -> None:
    importers = {name for name, imports in _modules().items() if any(_under(i, "prefect") for i in imports)}
    assert importers and all(_under(name, PREFECT_ADAPTER) for name in importers), importers
    assert "lmflow.prefect.flow" in importers  # (the reader sees `from prefect import ...`)


def test_each_layer_imports_only_what_is_below_it() -> None:
    broken = []
    for name, imports in _modules().items():
        for package, forbidden in FORBIDDEN.items():
            if _under(name, package):
                broken += [f"{name} imports {i}" for i in sorted(imports)
                           if any(_under(i, f) for f in forbidden)]
    assert broken == []


def test_the_rules_read_lazy_and_relative_imports() -> None:
    """The reader itself: an import inside a function, and `from ..x import y`, are seen."""
    imports = _modules()
    assert "lmflow.engine.unit" in imports["lmflow.engine.scheduler"]  # `from .unit import ...`
    assert "lmflow.steps.loop.runner" in imports["lmflow.steps.loop"]  # inside LoopStep.run


def test_deployments_registered_before_the_adapter_package_still_find_the_flow() -> None:
    """A deployment stores its entrypoint in Prefect's database: the old name must keep working."""
    from lmflow.compile import lmflow_flow as old
    from lmflow.prefect.deploy import ENTRYPOINT
    from lmflow.prefect.flow import lmflow_flow

    assert old is lmflow_flow
    assert ENTRYPOINT == "lmflow.prefect.flow.lmflow_flow"


#: private names of the standard library that are its documented API
DOCUMENTED_PRIVATE = {"os._exit"}


def _private_reaches(path: Path) -> list[str]:
    """Where a module uses another object's `_private` name: `x._name` (x not self or cls), or
    `from m import _name`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls") and f"{owner}.{node.attr}" not in DOCUMENTED_PRIVATE:
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}")
                      for alias in node.names if alias.name.startswith("_")]
    return [f"{path.name}:{line}: {what}" for line, what in sorted(found)]


def test_the_test_servers_modules_use_each_other_only_through_public_names() -> None:
    """The instance pool, the REST router, the SDK protocol and the stateful chats of the LM Studio
    stand-in (lmflow/testing/) meet through public methods, never each other's private members."""
    modules = sorted((PACKAGE / "testing").glob("*.py"))
    assert [reach for path in modules for reach in _private_reaches(path)] == []


def test_the_private_reach_reader_sees_attributes_and_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from .server import _helper\n\nasync def f(self, server):\n"
                      "    await self.server._expire()\n    self._own = server._lock\n    os._exit(1)\n")
    assert _private_reaches(module) == ["m.py:1: from .server import _helper",
                                        "m.py:4: self.server._expire", "m.py:5: server._lock"]
