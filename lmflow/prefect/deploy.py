"""Deployments of specs: served from this machine (lmflow.prefect.serving), or sent to a Prefect
process work pool.

Every deployment is of the one flow (`lmflow.prefect.flow.lmflow_flow`, imported by module path,
so a worker needs lmflow installed, not a copy of a flows file), named after the spec, with
the spec's path as its parameter and the spec's `schedule:` (or the command line's) as its
schedules. A spec inside a git repository is referred to by its path in the repository, and
a worker finds it under `LMFLOW_REPO` (its own checkout), so one deployment runs on any
machine that has the repository. Each run records the spec's commit and content hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    DeployError,  # noqa: F401 - raised here, defined with the tree
    )
from ..provenance import spec_version, unpublished
from ..spec import load_spec
from ..spec.model import ScheduleSpec, Spec

#: a module path (no colon): Prefect imports it, with no flow code to download
ENTRYPOINT = "lmflow.prefect.flow.lmflow_flow"


@dataclass
class Target:
    """One spec to deploy: where a run finds it, and when it runs."""

    spec: Spec
    spec_path: str  # what the flow gets: the path in the repository, else an absolute path
    schedules: tuple[ScheduleSpec, ...]
    version: dict[str, Any]
    #: what the user should know before it runs elsewhere (local edits, a shared deployment)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def targets(paths: list[str | Path], schedules: tuple[ScheduleSpec, ...] = (), *,
            in_repository: bool = False) -> list[Target]:
    """Load each spec (a spec error stops here, before anything is registered)."""
    found = []
    for path in paths:
        spec = load_spec(path)
        version = spec_version(spec.file)
        if in_repository:
            if not version.get("repo_path"):
                raise DeployError(f"{spec.file} is not committed in a git repository: a work pool's "
                                  "workers find specs by their path in the repository; commit it, or "
                                  "use `lmflow serve` to run it from this machine")
            spec_path = version["repo_path"]
            notes = unpublished(spec.file)
        else:
            spec_path, notes = str(spec.file), []
        found.append(Target(spec, spec_path, schedules or spec.schedules, version, notes))
    return found


def _prefect_schedules(schedules: tuple[ScheduleSpec, ...]) -> list[Any]:
    import datetime

    from prefect.schedules import Cron, Interval

    made = []
    for s in schedules:
        parameters = {"params": s.params} if s.params else None
        try:
            if s.cron:
                made.append(Cron(s.cron, timezone=s.timezone, active=s.active, parameters=parameters))
            else:
                made.append(Interval(datetime.timedelta(seconds=s.interval or 0), timezone=s.timezone,
                                     active=s.active, parameters=parameters))
        except ValueError as exc:
            raise DeployError(f"schedule {s.describe()}: {exc}") from None
    return made


def runner_deployment(target: Target, *, pool: str | None = None) -> Any:
    """A Prefect deployment of the one flow for this spec."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    from .flow import lmflow_flow

    flow = lmflow_flow.with_options(name=target.name)
    description = (target.spec.description or f"lmflow spec {target.spec_path}").strip()
    deployment = RunnerDeployment.from_flow(
        flow, name=target.name, parameters={"spec_path": target.spec_path},
        schedules=_prefect_schedules(target.schedules), description=description,
        tags=["lmflow", f"spec:{target.name}"], work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        version=(target.version.get("commit") or target.version["sha256"])[:12],
        # a deploy resumes a deployment a stopped serve of the same spec paused (Prefect pauses a
        # served deployment when its serve stops)
        paused=False if pool else None,
    )
    deployment.entrypoint = ENTRYPOINT
    return deployment


def ensure_pool(name: str) -> None:
    """Create the process work pool when it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pool = client.read_work_pool(name)
            if pool.type != "process":
                raise DeployError(f"work pool '{name}' is of type {pool.type}; lmflow sends runs to "
                                  "process pools: choose another name") from None


def note_shared(chosen: list[Target], pool: str | None) -> None:
    """`serve` and `deploy` of one spec make one Prefect deployment (named after the spec): add a
    note to each target whose deployment the other command made, before it is taken over."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for target in chosen:
            try:
                before = client.read_deployment_by_name(f"{target.name}/{target.name}").work_pool_name
            except ObjectNotFound:
                continue
            if pool and not before:
                target.notes.append(
                    f"deployment {target.name}/{target.name} is also the one `lmflow serve` of this spec "
                    f"uses (one deployment per spec name): it now runs on pool '{pool}'; a serve of it "
                    "still running takes its runs too and pauses it when it stops: stop that serve, "
                    "then deploy again")
            elif not pool and before:
                target.notes.append(
                    f"deployment {target.name}/{target.name} is also the one `lmflow deploy` put on pool "
                    f"'{before}' (one deployment per spec name): this serve and that pool's workers both "
                    "take its runs, and when this serve stops Prefect pauses it: `lmflow deploy` it "
                    "again to resume it on the pool")


def deploy(paths: list[str | Path], *, pool: str,
           schedules: tuple[ScheduleSpec, ...] = ()) -> list[tuple[Target, str]]:
    """Register deployments on a process work pool; returns each target with its deployment id,
    and in its notes what the user should know (local edits, a deployment `serve` used)."""
    chosen = targets(paths, schedules, in_repository=True)
    require_server()
    note_shared(chosen, pool)
    ensure_pool(pool)
    return [(t, str(runner_deployment(t, pool=pool).apply())) for t in chosen]


def require_server() -> None:
    """A DeployError unless a Prefect server is chosen (PREFECT_API_URL is set)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("deployments live on a Prefect server, and none runs: start one with "
                          "`lmflow server start` (or set PREFECT_API_URL)")
