"""The run's session: backends and models, and what its units are made from.

`Runtime` is the `Session` every step sees (backends, the models the run loaded, the
shared resilience) and what units are made from: the names templates refer to, resolved
options, cache keys. What happens to a unit with them is lmflow.engine.unit's. The run's
record and journal are in lmflow.engine.records; what a killed run left, lmflow.engine.recovery.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..backends import Backend, ModelInfo, backend_class, create_backend
from ..cache import ResponseCache
from ..errors import BackendTimeout, LmflowError, RunStopping
from ..leases import Lease
from ..plugins import by_version
from ..resilience import Resilience
from ..spec import templates
from ..spec.model import ModelConfig, ResponseCacheConfig, Spec, StepSpec
from ..steps import get_kind
from .records import RunRecorder
from .recovery import made_by_unfinished_load

#: bump when the meaning of cached results changes (2: a step's result is a StepResult)
CACHE_VERSION = 2


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _declares_load(model: ModelConfig) -> bool:
    """Whether a model says how it must be loaded (so a server's own default load will not do)."""
    return bool(model.context_length or model.parallel or model.gpu is not None or model.ttl is not None
                or model.identifier)


@by_version
def _options_validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    from ..spec.schema import spec_schema

    step = get_kind(kind)
    schema = {**step.options_schema, "$defs": spec_schema()["$defs"]}
    if step.holds is not None:  # what it holds is parsed by its check_nested, not run as options
        schema["required"] = [k for k in schema.get("required", ()) if k not in step.holds.options]
    # a kind's schema may refer to the spec's definitions (a loop's checkpoints hold steps)
    return Draft202012Validator(schema)


#: the step (or item, `step[3]`) the current thread runs: backend events and cache warnings name it
CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmflow_step", default=None)


class Runtime:
    """Backends, models and outputs of one run; resolves what its units run with.

    Shared by every worker thread of a run: backends are created once under a lock,
    a model's effective settings (a probed context length) are resolved once, and the
    models the run loaded are tracked under the same lock. Outputs are written by the
    scheduler (one thread) before any dependent starts.
    """

    def __init__(self, spec: Spec, recorder: RunRecorder,
                 gates: dict[str, Callable[[], AbstractContextManager[Any]]] | None = None):
        self.spec = spec
        self.recorder = recorder
        self.backends: dict[str, Backend] = {}
        self.outputs: dict[str, Any] = {}
        #: the `steps` of templates: id -> {"output": ...}, and a map's {"items": ...}
        self._steps: dict[str, dict[str, Any]] = {}
        #: models this run loaded and has not unloaded, by alias
        self.loaded: dict[str, ModelConfig] = {}
        self._resolved: dict[str, ModelConfig] = {}
        #: models used as already loaded on the server exactly as declared (the run does not own them)
        self._in_use: set[str] = set()
        self._load_locks: dict[str, threading.Lock] = {}
        #: journal entries of loads that timed out (the instance may appear after the run gave up)
        self._timed_out_loads: list[dict[str, Any]] = []
        #: this run's use of a model on a server other lmflow runs may use too (lmflow.leases)
        self._leases: dict[tuple[str, str], Lease] = {}
        #: instances this run loaded, by alias, and those it handed over at its end
        self._instances: dict[str, str] = {}
        self._handed_over: dict[str, tuple[str, str]] = {}  # instance -> (alias, model key)
        self._lock = threading.RLock()
        #: set when the run ends or is interrupted: user code still running is no longer waited for
        self.stopping = threading.Event()
        #: per server name, a slot of the limit shared with other runs, held around each model call
        #: (given when the run talks to a Prefect server others may use)
        self.gates = gates or {}
        config = spec.response_cache or ResponseCacheConfig()
        cache = ResponseCache(config.directory, size_limit=config.size_limit,
                              warn=lambda message: recorder.emit("cache_error", step=CURRENT_STEP.get(),
                                                                 message=message))
        self.resilience = Resilience(spec.breaker, spec.guard, cache)

    # -- the Session a step sees --------------------------------------------

    @property
    def models(self) -> dict[str, ModelConfig]:
        return self.spec.models

    @property
    def response_cache(self) -> ResponseCacheConfig | None:
        return self.spec.response_cache

    # -- backends ---------------------------------------------------------

    def backend_for(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model's server and the resolved model (see `resolved`)."""
        return self.server_backend(self.spec.models[alias].server), self.resolved(alias)

    def resolved(self, alias: str) -> ModelConfig:
        """The model as this run uses it: a `probed` context length replaced by the size the
        probe registry holds (less its margin). The one place that resolves a model: loads,
        chats, step and response cache keys and unload tracking all use what it returns.
        Resolved once per run (the registry is read and the server fingerprinted once), and
        again after a probe_context step of the model (`model_probed`)."""
        with self._lock:
            model = self._resolved.get(alias)
        if model is not None:
            return model
        model = self.spec.models[alias]
        if isinstance(model.context_length, str):  # "probed": the registry's measured size
            from ..probe import probed_size

            backend = self.server_backend(model.server)
            model = dataclasses.replace(model, context_length=probed_size(backend, model))
        with self._lock:
            return self._resolved.setdefault(alias, model)

    def model_probed(self, alias: str) -> None:
        """A probe of this model finished: every alias of its key on its server resolves again."""
        probed = self.spec.models[alias]
        with self._lock:
            for other, model in self.spec.models.items():
                if (model.key, model.server) == (probed.key, probed.server):
                    self._resolved.pop(other, None)

    def raw_model(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model as the spec declares it (a probe must not need its own result)."""
        model = self.spec.models[alias]
        return self.server_backend(model.server), model

    def server_backend(self, name: str) -> Backend:
        with self._lock:
            if name not in self.backends:
                config = self.spec.servers[name]
                self.recorder.emit("backend_starting", server=name, backend=config.backend,
                                   message=backend_class(config.backend).starting_message)
                backend = create_backend(config, self.spec.dir)
                backend.slots.gate = self.gates.get(name)
                backend.set_listener(
                    lambda event, data: self.recorder.emit(event, step=CURRENT_STEP.get(), **data))
                self.backends[name] = backend
            return self.backends[name]

    def ready(self, alias: str) -> tuple[Backend, ModelConfig]:
        """The model, loaded as the spec declares it before its first use.

        A model that declares a context length (or `probed`), parallel predictions or LM
        Studio load options is not left to the server's own just-in-time load (at the
        server's default size): the first chat of the run loads it here, once, or uses
        an instance already loaded exactly so. What this loads is unloaded at the end.
        """
        backend, model = self.backend_for(alias)
        if not backend.manages_models or not _declares_load(model):
            return backend, model
        with self._lock:
            if alias in self.loaded or alias in self._in_use:
                return backend, model
            lock = self._load_locks.setdefault(alias, threading.Lock())
        with lock:  # one load per model, while other models' chats go on
            with self._lock:
                if alias in self.loaded or alias in self._in_use:
                    return backend, model
            self._refuse_when_stopping(f"not loading '{model.key}'")
            self._lease(model)  # before looking: an instance another run is unloading is not found
            found = backend.find_loaded(model)
            if found is not None:
                with self._lock:
                    self._in_use.add(alias)
                return backend, model
            info = self.load(alias, model)
            self.recorder.emit("model_loaded", step=CURRENT_STEP.get(), alias=alias, key=model.key,
                               context_length=info.loaded_context_length)
            if model.context_length and info.loaded_context_length != model.context_length:
                self.recorder.emit("warning", step=CURRENT_STEP.get(), message=(
                    f"{backend.url or backend.kind} loaded '{model.key}' with context "
                    f"{info.loaded_context_length}, not the {model.context_length} that "
                    f"models.{alias}.context_length declares"))
        return backend, model

    def load(self, alias: str, model: ModelConfig) -> ModelInfo:
        """Load a model for this run, journaled before and after.

        The entry written before the load names the instances of the model already loaded,
        so the next run can tell which instance this one made if it is killed mid-load.
        """
        backend = self.server_backend(model.server)
        server = self.spec.servers.get(model.server)
        where = {"key": model.key, "server": model.server, "backend": server.backend if server else None,
                 "url": server.url if server else None}
        try:
            before: list[str] | None = [i for k, i in backend.loaded_instances() if k == model.key]
        except LmflowError:
            before = None  # a server that cannot list them: a kill mid-load is left to the user
        loading = {"loading": alias, **where, "context_length": model.context_length, "before": before}
        self._lease(model)
        self.recorder.journal(loading)
        try:
            info = backend.load(model)
        except BackendTimeout:
            with self._lock:  # the server may still finish it: unloaded at the end of the run
                self._timed_out_loads.append(loading)
            raise
        with self._lock:
            self.loaded[alias] = model
            self._instances[alias] = info.instance_id
            self._in_use.discard(alias)
            # journaled: the next run of this spec unloads it if this one is killed
            self.recorder.journal({"loaded": alias, **where, "instance": info.instance_id})
        if self.stopping.is_set():  # the run ended while it loaded: `close` may have run already
            self._unload_owned(alias)
            self._refuse_when_stopping(f"unloaded '{model.key}' again")
        return info

    def _refuse_when_stopping(self, what: str) -> None:
        if self.stopping.is_set():
            raise RunStopping(f"the run is stopping: {what}")

    def _lease(self, model: ModelConfig) -> Lease | None:
        """This run's lease on the model's key on its server (None for a server lmflow owns)."""
        server = self.spec.servers.get(model.server)
        if server is None or not server.url or backend_class(server.backend).owns_server:
            return None
        name = (model.server, model.key)
        with self._lock:
            lease = self._leases.get(name)
        if lease is None:
            lease = Lease(server.url, model.key)  # outside the lock: it waits while another run unloads
            with self._lock:
                kept = self._leases.setdefault(name, lease)
            if kept is not lease:
                lease.close()
            lease = kept
        return lease

    def _unload_owned(self, alias: str) -> None:
        """Unload a model this run loaded (unless kept loaded); a failure is a warning. Where
        another lmflow run may use it too, it is handed over to its lease instead (see `close`)."""
        with self._lock:
            model = self.loaded.pop(alias, None)
            backend = self.backends.get(model.server) if model is not None else None
            instance = self._instances.pop(alias, None)
            if model is None or backend is None:
                return
            if model.keep_loaded:
                return
            lease = self._leases.get((model.server, model.key))
            if lease is not None and lease.held and instance is not None:
                lease.hand_over(instance, self.recorder.result.run_id)
                self._handed_over[instance] = (alias, model.key)
                return
            try:
                backend.unload(model)
            except LmflowError as exc:
                self.recorder.emit("warning", message=f"could not unload {model.key}: {exc}")
                return
            self.recorder.journal({"unloaded": alias})

    def model_unloaded(self, alias: str) -> None:
        with self._lock:
            if self.loaded.pop(alias, None) is not None:
                self.recorder.journal({"unloaded": alias})
            self._in_use.discard(alias)

    def close(self) -> None:
        """Unload what this run loaded (unless kept) and stop its engines, also after a failure."""
        self.stopping.set()  # a unit still in flight loads nothing from now on (see `ready`)
        with self._lock:
            for alias in list(self.loaded):
                self._unload_owned(alias)
            self._release_leases()
            for entry in self._timed_out_loads:
                backend = self.backends.get(entry["server"])
                try:
                    instance = made_by_unfinished_load(backend, entry) if backend else None
                    if isinstance(instance, str) and backend.unload_instance(instance):  # type: ignore[union-attr]
                        self.recorder.emit("warning", message=(
                            f"unloaded '{entry['key']}' (instance {instance}): its load timed out, "
                            "and the server finished it later"))
                except LmflowError as exc:
                    self.recorder.emit("warning", message=f"could not unload {entry['key']}: {exc}")
            while self.backends:
                _, backend = self.backends.popitem()
                backend.close()
        cache = self.resilience.cache
        if cache is not None:
            self.recorder.result.stats.update(response_cache=cache.stats.summary(),
                                              fallback_answers=self.resilience.fallbacks)
        self.resilience.close()

    def _release_leases(self) -> None:
        """End this run's use of shared models: the last run to use one unloads what runs loaded."""
        for (server, key), lease in self._leases.items():
            backend = self.backends.get(server)

            def unload(note: dict[str, Any], backend: Backend | None = backend) -> None:
                alias = self._handed_over.pop(note["instance"], (None, None))[0]
                try:
                    done = backend is not None and backend.unload_instance(note["instance"])
                except LmflowError as exc:
                    self.recorder.emit("warning", message=f"could not unload {note['key']}: {exc}")
                    return
                if alias is not None:
                    self.recorder.journal({"unloaded": alias})
                elif done:  # (a killed run's instance may be gone already: released, or unloaded by hand)
                    self.recorder.emit("warning", message=(
                        f"unloaded '{note['key']}' (instance {note['instance']}), which the run "
                        f"{note.get('loaded_by')} loaded and left to the last run using it"))

            if not lease.release(unload):
                for instance, (alias, handed_key) in list(self._handed_over.items()):
                    if handed_key == key:
                        del self._handed_over[instance]
                        self.recorder.journal({"handed_over": alias, "instance": instance})
                        self.recorder.emit("warning", message=(
                            f"left '{key}' loaded (instance {instance}): another lmflow run on this "
                            "machine uses it, and the last of them to end unloads it"))
        self._leases.clear()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- values -----------------------------------------------------------

    def set_output(self, step: StepSpec, output: Any, inputs: Sequence[Any] | None = None) -> None:
        """A finished step's output, visible to the steps that depend on it; a map's items next to
        it (`inputs`, `steps.X.items`: null when the map was skipped)."""
        self.outputs[step.id] = output
        self._steps[step.id] = {"output": output} if step.foreach is None else {"output": output,
                                                                                "items": inputs}

    def names(self, step: StepSpec, item: Any = None, index: int | None = None) -> dict[str, Any]:
        """What templates and conditions of `step` (or one of its items) can refer to."""
        names = {"params": self.spec.params, "steps": self._steps}
        if step.foreach is not None and index is not None:
            names.update(item=item, index=index)
        return names

    def nested_names(self, extra: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        """What steps nested in a kind (a loop's checkpoints) refer to: params, the outputs of the
        top-level steps and of the nested steps that ran before, and the kind's own (`loop`)."""
        steps = {**self._steps, **{k: {"output": v} for k, v in outputs.items()}} if outputs else self._steps
        return {"params": self.spec.params, "steps": steps, **extra}

    def items(self, step: StepSpec) -> Sequence[Any]:
        """The items of a map step (its foreach resolved)."""
        from ..datasets import items

        foreach = step.foreach
        assert foreach is not None
        names = self.names(step)
        if foreach.source == "value" and isinstance(foreach.value, str):  # a map's output is streamed
            try:
                return items(foreach, self.spec.dir, templates.value_of(foreach.value, names))
            except templates.TemplateError as exc:
                raise templates.TemplateError(f"foreach: {exc}") from None
        templated = foreach.source == "value" or "${{" in foreach.value  # a path may hold references
        resolved = templates.render(foreach.value, names, ("foreach",)) if templated else None
        return items(foreach, self.spec.dir, resolved)

    def item_condition(self, step: StepSpec) -> bool:
        """True when `when` refers to the item, so it is decided per item, not for the step."""
        return step.foreach is not None and step.when is not None and not isinstance(step.when, bool) \
            and any(ref.root in ("item", "index") for ref in step.when.references)

    def resolve(self, step: StepSpec, item: Any = None, index: int | None = None,
                names: dict[str, Any] | None = None) -> dict[str, Any]:
        """The step's options with every reference replaced, checked against the kind's schema."""
        options = templates.render(step.options, names or self.names(step, item, index), (step.kind,))
        error = next(iter(_options_validator(step.kind).iter_errors(options)), None)
        if error is not None:
            where = ".".join([step.kind, *map(str, error.absolute_path)])
            raise templates.TemplateError(
                f"{where}: {error.message} (after resolving references; fix the referenced "
                "value or the step)")
        return options

    def cache_key(self, step: StepSpec, resolved: dict[str, Any]) -> str:
        """Hash of everything that changes the step's answer, never of a timestamp.

        A map item's key is its step's key with the item's resolved options: the same
        item gives the same key in the next run, wherever it stands in the list.
        """
        kind = get_kind(step.kind)
        models = {alias: self.model_identity(alias) for alias in kind.models(resolved)}
        material = {
            "v": CACHE_VERSION, "step": step.id, "kind": step.kind, "options": resolved,
            "models": models, "extra": kind.cache_material(resolved, self.spec.dir),
        }
        material.update(kind.nested_material(step, self) or {})  # steps of its own (a loop's checkpoints)
        digest = hashlib.sha256(canonical_json(material).encode()).hexdigest()
        return f"lmflow-{step.id}-{digest[:40]}"

    def model_identity(self, alias: str) -> dict[str, Any]:
        """What about a model changes its answers (step and response cache keys): the resolved
        model (a probed size as a number, so a new probe is a new key), its server, and the code
        of its python fallbacks."""
        from ..steps.python import source_hash

        model = self.resolved(alias)
        server = self.spec.servers[model.server]
        # the port of a server lmflow runs itself changes every run; what it serves does not
        url = None if backend_class(server.backend).owns_server else server.url
        identity = {**model.identity(), "backend": server.backend, "url": url}
        if model.fallback:  # (only then: keys of models without one stay as they were)
            identity["fallback"] = [[link.kind, link.target, source_hash(link.target, self.spec.dir)
                                     if link.kind == "python" else None] for link in model.fallback]
        return identity
