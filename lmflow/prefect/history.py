"""Run history through the Prefect API: `lmflow runs`, `lmflow runs show`, `lmflow rerun`.

Every run, however started, is a flow run of `lmflow.prefect.flow.lmflow_flow` named after its run
id, tagged `lmflow`, `spec:NAME`, `commit:SHA12` (+ `dirty`) and `sha256:HASH12`, whose
parameters are the spec's path, the params given, `refresh_cache` and `max_parallel`. When it
ends it writes a table artifact (`lmflow-summary-NAME`): a row per step, built by
lmflow.render.history, which also renders what is read here. The commands read those, so they
work wherever the run ran (a worker's run record is on the worker's machine). Nothing here
prints or exits; Prefect is imported only by the functions that talk to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from ..errors import (
    HistoryError,  # noqa: F401 - raised here, defined with the tree
    PrefectServerError,
)
from ..render.history import Run

#: the key of every run's summary is this plus the spec's name (the UI keeps the latest per spec)
SUMMARY_KEY = "lmflow-summary"
PAGE = 200  # the most a Prefect API read returns at once


# -- the summary a run writes (its rows and text: lmflow.render.history) -----------------------

def summary_key(spec_name: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    name = "".join(c if c.isalnum() else "-" for c in spec_name.lower()).strip("-")
    return f"{SUMMARY_KEY}-{name}" if name else SUMMARY_KEY


# -- reading runs ------------------------------------------------------------------------------

def spec_name(spec: str) -> str:
    """A spec file's `name` (read from the file), or the argument itself when it names no file."""
    path = Path(spec)
    if not path.is_file() and not spec.endswith((".yaml", ".yml")):
        return spec
    from ..spec.loader import load_yaml

    data = load_yaml(path).data
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return data["name"]
    from ..spec import load_spec

    return load_spec(path).name  # raises the SpecError that says what is wrong


#: after this long without a line in its journal, a killed run's task runs are all in Prefect's
#: database (the server records events in batches, seconds late): the last look at them
SETTLED = 300.0


def mark_killed_runs(client: Any, spec_name: str | None = None) -> list[str]:
    """Mark the flow runs of lmflow runs on this machine that were killed (a journal with no final
    record, its process gone) Crashed in Prefect, and their unfinished task runs: Prefect itself
    would show them running for good. Task runs the server records late are marked by a later
    call; once a run has settled (SETTLED) it is not looked at again. Returns the runs that
    this call marked Crashed."""
    import time

    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from .. import jsonl
    from ..engine.recovery import killed_journals

    marked = []
    for journal, entries in killed_journals(spec_name, marker="crash_marked"):
        header = next((e for e in entries if "run" in e), {})
        flow_run_id = next((e["flow_run"] for e in entries if isinstance(e.get("flow_run"), str)), None)
        if flow_run_id is None:
            continue
        message = (f"the lmflow process of this run (pid {header.get('pid')}) ended without finishing it "
                   "(killed); its journal keeps what was done, and a re-run reuses it")
        settled = time.time() - journal.stat().st_mtime > SETTLED
        try:
            flow_run = client.read_flow_run(flow_run_id)
            if not flow_run.state or not flow_run.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                marked.append(str(header.get("run")))
            unfinished = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING]))))
            for task_run in unfinished:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
        except Exception:  # noqa: BLE001 - another server's run, or the API failed: next time, then
            pass
        if settled:  # (a run another server knows, or a server gone: not looked at for ever)
            jsonl.append(journal, {"crash_marked": True})
    return marked


def list_runs(spec: str | None = None, limit: int = 20) -> list[Run]:
    """lmflow's runs (of one spec: a file or a name), newest first; scheduled ones are left out.
    Killed runs of this machine are marked Crashed first (`mark_killed_runs`)."""
    tags = ["lmflow"] + ([f"spec:{spec_name(spec)}"] if spec else [])
    with _client() as (client, ui):  # before Prefect's imports: they read its settings
        mark_killed_runs(client)
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        wanted = FlowRunFilter(tags=FlowRunFilterTags(all_=tags), state=FlowRunFilterState(
            type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
        flow_runs = _pages(lambda offset, size: client.read_flow_runs(
            flow_run_filter=wanted, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=size, offset=offset),
            limit)
        found = [_run(f, ui) for f in flow_runs]
        _add_steps(client, found)
    return found


def show_run(ref: str) -> Run:
    """One run by its name or flow run id (or a unique prefix of either), with every step."""
    with _client() as (client, ui):
        mark_killed_runs(client)
        found = _run(find_flow_run(client, ref), ui)
        _add_steps(client, [found])
    return found


def find_flow_run(client: Any, ref: str) -> Any:
    """The lmflow flow run named `ref`, with id `ref`, or whose name or id starts with `ref`."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    try:
        flow_run = client.read_flow_run(UUID(ref))
    except ValueError:  # not a whole id
        pass
    except ObjectNotFound:
        raise HistoryError(f"no flow run has the id {ref}: `lmflow runs` lists the runs") from None
    else:
        if "lmflow" not in (flow_run.tags or ()):
            raise HistoryError(f"flow run {ref} ({flow_run.name}) is not an lmflow run")
        return flow_run
    lmflow = FlowRunFilterTags(all_=["lmflow"])

    def matching(name: FlowRunFilterName | None, keep: Callable[[Any], bool]) -> list[Any]:
        wanted = FlowRunFilter(tags=lmflow, name=name)
        return [f for f in _pages(lambda offset, size: client.read_flow_runs(
            flow_run_filter=wanted, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=size, offset=offset))
            if keep(f)]

    found = matching(FlowRunFilterName(any_=[ref]), lambda f: True)
    if not found:
        found = matching(FlowRunFilterName(like_=ref), lambda f: f.name.startswith(ref))
    if not found and len(ref) >= 4 and all(c in "0123456789abcdef-" for c in ref.lower()):
        found = matching(None, lambda f: str(f.id).startswith(ref.lower()))
    if not found:
        raise HistoryError(f"no lmflow run is named {ref!r} or has an id starting with it: "
                           "`lmflow runs` lists the runs")
    if len(found) > 1:
        names = ", ".join(f.name for f in found[:5]) + (", ..." if len(found) > 5 else "")
        raise HistoryError(f"{ref!r} matches {len(found)} runs ({names}): give more of the name or id")
    return found[0]


@contextmanager
def _client() -> Iterator[tuple[Any, str]]:
    """Prefect's sync client on the API `lmflow run` would use, and the UI's address; never a
    temporary server: history lives on a server that outlives its runs."""
    from .server import _healthy, configure_environment

    choice = configure_environment()
    if choice.url is None:
        raise PrefectServerError("no Prefect server: start one with `lmflow server start` "
                                 "(or set PREFECT_API_URL to the one your runs use)")
    if not _healthy(choice.url, timeout=5.0):
        raise PrefectServerError(f"the Prefect API at {choice.url} ({choice.source}) does not answer: "
                                 "check it with `lmflow server status`")
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            yield client, choice.url.removesuffix("/api")
    except httpx.HTTPError as exc:
        raise PrefectServerError(f"the Prefect API at {choice.url} failed: {exc}") from None


def _pages(read: Callable[[int, int], list[Any]], limit: int | None = None) -> list[Any]:
    """Every object a filtered read finds (or the first `limit`), a page at a time."""
    found: list[Any] = []
    while limit is None or len(found) < limit:
        size = PAGE if limit is None else min(PAGE, limit - len(found))
        page = read(len(found), size)
        found += page
        if len(page) < size:
            break
    return found


def _run(flow_run: Any, ui: str) -> Run:
    tags = flow_run.tags or []
    version: dict[str, Any] = {"commit": None, "dirty": "dirty" in tags, "sha256": None}
    spec = None
    for tag in tags:
        prefix, _, value = tag.partition(":")
        if prefix in ("commit", "sha256"):
            version[prefix] = value
        elif prefix == "spec":
            spec = value
    return Run(id=str(flow_run.id), name=flow_run.name, spec=spec, state=flow_run.state_name or "?",
               start=flow_run.start_time, end=flow_run.end_time, version=version,
               parameters=dict(flow_run.parameters or {}), ui_url=f"{ui}/runs/flow-run/{flow_run.id}")


def _add_steps(client: Any, runs: list[Run]) -> None:
    """Each run's steps from its summary (one read for all), else from its task runs."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort

    if not runs:
        return
    by_id = {UUID(r.id): r for r in runs}
    wanted = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(by_id)),
                            key=ArtifactFilterKey(any_=sorted({summary_key(r.spec or "") for r in runs})),
                            type=ArtifactFilterType(any_=["table"]))
    summarized: set[UUID] = set()
    for artifact in _pages(lambda offset, size: client.read_artifacts(
            artifact_filter=wanted, sort=ArtifactSort.CREATED_DESC, limit=size, offset=offset)):
        if artifact.flow_run_id in summarized:
            continue  # an older summary of the same run
        data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        by_id[artifact.flow_run_id].steps = list(data or [])
        summarized.add(artifact.flow_run_id)
    rest = [i for i in by_id if i not in summarized]
    if not rest:
        return
    # a run still going, or killed before its end: what Prefect saw of its steps
    task_runs = _pages(lambda offset, size: client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=rest)),
        sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=size, offset=offset))
    for t in task_runs:
        run = by_id[t.flow_run_id]
        run.steps_from = "task runs"
        state = "failed" if t.state_type in ("FAILED", "CRASHED") else (t.state_name or "?").lower()
        seconds = (t.end_time - t.start_time).total_seconds() if t.start_time and t.end_time else 0.0
        message = t.state.message if t.state is not None and state == "failed" else ""
        run.steps.append({"step": t.name, "kind": "", "status": state, "seconds": round(seconds, 3),
                          "attempts": t.run_count, "cached": "step" if state == "cached" else "no",
                          "answered by": "", "result": message or "", "errors": ""})
    for i in rest:
        by_id[i].steps_from = "task runs"


# -- running a run again -----------------------------------------------------------------------

@dataclass
class Rerun:
    """What `lmflow rerun` runs: a spec file (maybe in a temporary worktree) and the run's settings."""

    run: Run
    spec_path: Path
    params: dict[str, Any] | None
    max_parallel: int | None
    #: which version runs, in words for the user
    version: str


@contextmanager
def rerun_target(ref: str, current: bool = False) -> Iterator[Rerun]:
    """The spec version run `ref` ran, with its params and max_parallel; a temporary git worktree
    at its commit when the file has changed since (removed afterwards, also after a failure).

    Refuses (HistoryError) when that version is gone, unless `current`: then the spec as it is now.
    """
    with _client() as (client, ui):
        run = _run(find_flow_run(client, ref), ui)
    spec_path = run.parameters.get("spec_path")
    if not spec_path:
        raise HistoryError(f"run {run.name} has no spec_path parameter: it is not a run of lmflow's flow")
    path = Path(spec_path)
    if not path.is_absolute():  # a deployment's run: the path in the repository
        path = Path(os.environ.get("LMFLOW_REPO") or Path.cwd()) / path
    recorded = run.version.get("sha256")
    now = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    def target(spec: Path, version: str) -> Rerun:
        return Rerun(run, spec, run.parameters.get("params"), run.parameters.get("max_parallel"), version)

    if now is not None and recorded and now.startswith(recorded):
        yield target(path, f"{path} as it ran (unchanged since: sha256 {recorded})")
        return
    if current:
        if now is None:
            raise HistoryError(f"{path} no longer exists: there is no current version to run")
        yield target(path, f"{path} as it is now (--current: sha256 {now[:12]}, "
                           f"the run had {recorded or 'no recorded version'})")
        return
    changed = (f"{path} changed since run {run.name} (sha256 {recorded} then, {now[:12]} now)"
               if now is not None else f"{path}, the spec of run {run.name}, no longer exists")
    if not recorded:
        raise HistoryError(f"run {run.name} recorded no spec version (it stopped before lmflow labelled "
                           f"it): `lmflow rerun {run.name} --current` runs the spec as it is now")
    checkout = _committed_version(path, run.version, recorded)
    if isinstance(checkout, str):  # why the recorded version cannot be had
        raise HistoryError(f"{changed}, and {checkout}: restore that version of the file, or "
                           f"`lmflow rerun {run.name} --current` runs the spec as it is now")
    root, commit, relative = checkout
    with _worktree(root, commit) as tree:
        yield target(tree / relative, f"{relative} at commit {commit[:12]}, as it ran (the file has changed "
                                      f"since; run from a temporary worktree of {root})")


def _committed_version(path: Path, version: dict[str, Any], recorded: str) -> tuple[Path, str, str] | str:
    """(repository root, commit, path in it) holding exactly the recorded spec, else why not."""
    commit = version.get("commit")
    if not commit:
        return "it was not committed in git when it ran"
    folder = next((p for p in path.parents if p.is_dir()), Path.cwd())
    root = _git(folder, "rev-parse", "--show-toplevel")
    if root is None:
        return f"{folder} is not in a git repository to find its commit {commit} in"
    root_path = Path(root.decode().strip())
    full = _git(root_path, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if full is None:
        return f"its commit {commit} is not in the repository at {root_path} (fetch it first)"
    try:
        relative = path.resolve().relative_to(root_path.resolve()).as_posix()
    except ValueError:
        return f"it is outside the repository at {root_path}"
    full_sha = full.decode().strip()
    content = _git(root_path, "show", f"{full_sha}:{relative}")
    if content is None:
        return f"commit {commit} has no {relative}"
    if not hashlib.sha256(content).hexdigest().startswith(recorded):
        return f"it ran with changes never committed on top of commit {commit}"
    return root_path, full_sha, relative


@contextmanager
def _worktree(root: Path, commit: str) -> Iterator[Path]:
    """A detached worktree of `root` at `commit` (so prompts, schemas and helpers next to the spec
    are that version too), removed afterwards whatever happens."""
    parent = Path(tempfile.mkdtemp(prefix="lmflow-rerun-"))
    tree = parent / "tree"
    try:
        done = subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=root,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise HistoryError(f"could not check out commit {commit[:12]} of {root} into a temporary "
                               f"worktree: {done.stderr.strip()}")
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root,
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, timeout=60, check=False)


def _git(where: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", *args], cwd=where, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
