"""One model server, many runs: a Prefect global concurrency limit per shared server.

A server that runs share (LM Studio, an OpenAI-compatible server; not the managed
`local` engine, which is each run's own) gets a limit named after its address,
`lmflow-server-<host>-<port>`, of size `servers.X.parallel` (else LM Studio's default
of 4 concurrent predictions). lmflow creates it when it is missing and never changes
it afterwards: a size set in Prefect's UI wins, and an inactive limit is not enforced.
Every model call of a flow run holds one slot (strict: a missing limit fails the call
instead of being silently ignored), inside the run's own `Slots`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any
from urllib.parse import urlsplit

from ..backends import backend_class
from ..errors import PrefectServerError
from ..spec.model import ServerConfig, Spec

#: LM Studio 0.4's "Max Concurrent Predictions"
DEFAULT_SIZE = 4
#: the shortest lease Prefect grants: a killed run's slot is free again within a minute
LEASE_SECONDS = 60


def limit_name(url: str) -> str:
    """`http://127.0.0.1:1234/v1` -> `lmflow-server-127.0.0.1-1234`: one limit per host and port."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"lmflow-server-{parts.hostname or 'localhost'}-{port}"


def limit_size(config: ServerConfig) -> int:
    return config.parallel or DEFAULT_SIZE


def shared_servers(spec: Spec) -> list[ServerConfig]:
    """The servers the spec's models use that other runs may use at the same time."""
    used = {model.server for model in spec.models.values()}
    return [config for name, config in spec.servers.items()
            if name in used and not backend_class(config.backend).owns_server
            and config.url and config.shared_limit]


def ensure(name: str, size: int) -> int:
    """Create the limit when it is missing; returns its size as the Prefect server has it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
        except ObjectAlreadyExists:  # another run created it a moment ago
            return client.read_global_concurrency_limit_by_name(name).limit
        return size


def gate(name: str) -> Callable[[], AbstractContextManager[Any]]:
    """What `Slots.hold` enters around each model call: one slot of the named limit."""

    @contextmanager
    def hold() -> Iterator[None]:
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
        from prefect.concurrency.sync import concurrency

        with ExitStack() as stack:
            try:
                # a renewal that fails (an API blip during a long answer) must not kill the call
                stack.enter_context(concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS,
                                                raise_on_lease_renewal_failure=False))
            except ConcurrencySlotAcquisitionError as exc:
                raise PrefectServerError(
                    f"the shared limit '{name}' could not be held: {exc}; it is created at the start "
                    "of every run (was it deleted during this one?), and set inactive in Prefect's UI "
                    "it is not enforced") from None
            yield

    return hold


def install(spec: Spec) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """Ensure the limit of every shared server the spec uses; returns each server's gate by name."""
    gates = {}
    for config in shared_servers(spec):
        name = limit_name(config.url or "")
        ensure(name, limit_size(config))
        gates[config.name] = gate(name)
    return gates
