"""LM Studio through its REST API v1 (models, load, unload) and its OpenAI-compatible chat.

One client per server for the life of the backend, kept across unload and
reload (one HTTP client, and one SDK client for what REST cannot do: ttl, gpu,
identifier, parallel predictions). After every load the context length the
server actually applied is read back; answers are checked to come from the
requested model. Safe to call from several threads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx

from ..errors import BackendError, BackendHTTPError
from ..spec.model import ModelConfig, ServerConfig
from .base import Backend, ChatRequest, ChatResponse, ModelInfo
from .openai import OpenAIClient
from .supervisor import Supervisor

LOAD_TIMEOUT = 600.0
#: the load-config field behind the SDK's `maxParallelPredictions` (LM Studio's "Max Concurrent
#: Predictions"); the Python SDK 1.5 does not know that name and drops it without a word
PARALLEL_FIELD = "llm.load.numParallelSessions"


class WrongModel(BackendError):
    """The server answered with another model than the one asked for."""


class LMStudioBackend(Backend):
    kind = "lmstudio"
    manages_models = True

    def __init__(self, config: ServerConfig, *, transport: httpx.BaseTransport | None = None):
        super().__init__(config)
        token = os.environ.get(config.api_key_env or "LM_API_TOKEN") or None
        hint = (f"start it with `{config.start}`" if config.start
                else "start LM Studio's server (`lms server start`) or fix server.url")
        self.client = OpenAIClient(config.url or "http://127.0.0.1:1234", api_key=token,
                                   transport=transport, start_hint=hint)
        #: instance ids chats go to, by model alias: loaded by this backend, or found loaded
        #: (`find_loaded`: another client's, never unloaded unless asked for every instance)
        self.instances: dict[str, str] = {}
        self.found: set[str] = set()
        self.loaded_models: dict[str, ModelConfig] = {}
        #: parallel predictions the server applied, by model alias (None: it does not say)
        self.loaded_parallel: dict[str, int | None] = {}
        self.supervisor = Supervisor(config, self.health, after_restart=self._reload_after_restart)
        self._sdk_client: Any = None
        self._sdk_sessions: set[str] = set()  # SDK namespaces connected (the SDK connects lazily, racily)
        self._version: str | None = None
        self._lock = threading.Lock()  # the dicts above, briefly
        self._sdk_lock = threading.Lock()  # creating the SDK client and connecting its sessions
        self._model_locks: dict[str, threading.Lock] = {}  # one load/unload of a model at a time

    def ensure(self) -> dict[str, Any]:
        return self.supervisor.ensure()

    def set_listener(self, listener: Any) -> None:
        self.supervisor.listener = listener

    def _reload_after_restart(self) -> None:
        # a restarted LM Studio has nothing loaded: bring back what the run had loaded
        with self._lock:
            self.instances.clear()
            self.found.clear()
            models = list(self.loaded_models.values())
        with self._sdk_lock:
            if self._sdk_client is not None:  # its websockets died with the server
                self._sdk_client.close()
                self._sdk_client = None
                self._sdk_sessions.clear()
        for model in models:  # no model locks here: the thread that saw the crash may hold one
            self._load(model)

    def _model_lock(self, alias: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(alias, threading.Lock())

    @property
    def url(self) -> str:
        return self.client.url

    def health(self) -> bool:
        try:
            # 401/403: it is up, the token is wrong (the next call says so); not a reason to start it
            return self.client.http.get("/api/v1/models", timeout=2.0).status_code in (200, 401, 403)
        except httpx.HTTPError:
            return False

    def _models_v1(self) -> list[dict[str, Any]]:
        return self.client.request("GET", "/api/v1/models").json().get("models", [])

    def list_models(self) -> list[ModelInfo]:
        try:
            entries = self._models_v1()
        except BackendHTTPError as exc:
            if exc.status != 404:
                raise
            return self._list_v0()  # LM Studio before 0.4
        models = []
        for entry in entries:
            loaded = entry.get("loaded_instances") or []
            models.append(ModelInfo(
                key=entry.get("key", "?"), loaded=bool(loaded),
                max_context_length=entry.get("max_context_length"),
                loaded_context_length=(loaded[0].get("config") or {}).get("context_length")
                if loaded else None))
        return models

    def _list_v0(self) -> list[ModelInfo]:
        data = self.client.request("GET", "/api/v0/models").json().get("data", [])
        return [ModelInfo(key=d.get("id", "?"), loaded=d.get("state") == "loaded",
                          max_context_length=d.get("max_context_length"),
                          loaded_context_length=d.get("loaded_context_length")) for d in data]

    def fingerprint(self, model: ModelConfig) -> dict[str, Any]:
        try:
            entry = next((e for e in self._models_v1() if e.get("key") == model.key), {})
        except BackendError:
            entry = {}  # LM Studio before 0.4 lists no variant
        quant = entry.get("quantization")
        quant = quant.get("name") if isinstance(quant, dict) else quant
        parts = [entry.get("selected_variant"), entry.get("format"), quant, entry.get("size_bytes")]
        return {"version": self.version(), "variant": " ".join(str(p) for p in parts if p) or None}

    def version(self) -> str | None:
        """LM Studio's version (the SDK's `system` namespace); None when it does not say."""
        if self._version is None:
            try:
                found = self._sdk("system").system.remote_call("version")
                self._version = f"{found['version']} build {found.get('build')}"
            except Exception:  # noqa: BLE001 - an old or token-protected server: no version, no key part
                self._version = ""
        return self._version or None

    def loaded_context(self, instance_id: str) -> int | None:
        """The context length the server reports for a loaded instance."""
        return self.loaded_config(instance_id).get("context_length")

    def loaded_config(self, instance_id: str) -> dict[str, Any]:
        """The load config the server reports for a loaded instance (`context_length`, `parallel`...)."""
        for entry in self._models_v1():
            for instance in entry.get("loaded_instances") or []:
                if instance.get("id") == instance_id:
                    return instance.get("config") or {}
        return {}

    def load(self, model: ModelConfig) -> ModelInfo:
        with self._model_lock(model.alias):
            info = self.supervisor.call(lambda: self._load(model))
            with self._lock:
                self.loaded_models[model.alias] = model
        return info

    def _sdk(self, namespace: str = "llm") -> Any:
        """One explicit SDK client per server, kept for the backend's life (never the default one),
        with the namespace's websocket connected (the SDK's lazy connect is not thread-safe)."""
        with self._sdk_lock:
            if self._sdk_client is None:
                import lmstudio as lms

                self._sdk_client = lms.Client(urlparse(self.url).netloc)
            if namespace not in self._sdk_sessions:
                getattr(self._sdk_client, namespace).connect()
                self._sdk_sessions.add(namespace)
            return self._sdk_client

    def _load(self, model: ModelConfig) -> ModelInfo:
        if model.ttl is not None or model.gpu is not None or model.identifier or model.parallel:
            return self._load_sdk(model)  # REST v1 has no ttl, gpu, identifier or parallel
        return self._load_rest(model)

    def _load_sdk(self, model: ModelConfig) -> ModelInfo:
        import lmstudio as lms

        config: dict[str, Any] = {}
        if model.context_length:
            config["contextLength"] = model.context_length
        if model.gpu is not None:
            ratio = {"max": 1.0, "off": 0.0}.get(str(model.gpu), model.gpu)
            config["gpu"] = {"ratio": float(ratio)}
        started = time.monotonic()
        try:
            handle = self._load_new_instance(model, config)
            actual = handle.get_context_length()
        except lms.LMStudioModelNotFoundError:
            raise self._not_found(model) from None
        except lms.LMStudioError as exc:
            if "not found" in str(exc).lower():
                raise self._not_found(model) from None
            raise BackendError(f"LM Studio at {self.url} could not load '{model.key}': {exc}",
                               url=self.url) from None
        seconds = round(time.monotonic() - started, 3)
        parallel = self._applied_parallel(model, handle.identifier) if model.parallel else None
        with self._lock:
            self.instances[model.alias] = handle.identifier
            self.found.discard(model.alias)
            self.loaded_parallel[model.alias] = parallel
        return ModelInfo(key=model.key, loaded=True, loaded_context_length=actual,
                         instance_id=handle.identifier, load_seconds=seconds)

    def _load_new_instance(self, model: ModelConfig, config: dict[str, Any]) -> Any:
        """`llm.load_new_instance`, with `maxParallelPredictions` even where the SDK drops it."""
        import lmstudio as lms

        llm = self._sdk().llm
        ttl = int(model.ttl) if model.ttl else None
        if not model.parallel or "max_parallel_predictions" in lms.LlmLoadModelConfig.__struct_fields__:
            if model.parallel:
                config = {**config, "maxParallelPredictions": model.parallel}
            return llm.load_new_instance(model.key, model.identifier, ttl=ttl, config=config)
        # SDK 1.5 predates the field: open the same loadModel channel load_new_instance opens,
        # with the server's field added to the load config it sends
        from lmstudio.json_api import LoadModelEndpoint

        types = llm._API_TYPES
        endpoint = LoadModelEndpoint(model.key, model.identifier, ttl, types.REQUEST_NEW_INSTANCE,
                                     types.MODEL_LOAD_CONFIG, config, None)
        layer = endpoint.creation_params["loadConfigStack"]["layers"][0]
        layer["config"]["fields"].append({"key": PARALLEL_FIELD, "value": model.parallel})
        with llm._create_channel(endpoint) as channel:
            result = channel.wait_for_result()
        return llm._create_handle(result.identifier)

    def _applied_parallel(self, model: ModelConfig, instance_id: str) -> int | None:
        """Read back the parallel predictions the server applied; warn when it is not what was asked."""
        try:
            applied = self.loaded_config(instance_id).get("parallel")
        except BackendHTTPError:
            return None  # LM Studio before 0.4 does not report it
        if applied is not None and applied != model.parallel:
            self.supervisor.listener("warning", {"message": (
                f"{self.url} loaded '{model.key}' for {applied} parallel predictions, not the "
                f"{model.parallel} asked for (models.{model.alias}.parallel)")})
        return applied

    def _load_rest(self, model: ModelConfig) -> ModelInfo:
        body: dict[str, Any] = {"model": model.key, "echo_load_config": True}
        if model.context_length:
            body["context_length"] = model.context_length
        if "flash_attention" in model.options:
            body["flash_attention"] = bool(model.options["flash_attention"])
        try:
            answer = self.client.request("POST", "/api/v1/models/load", timeout=LOAD_TIMEOUT,
                                         json_body=body).json()
        except BackendHTTPError as exc:
            if exc.status == 404:
                raise self._not_found(model) from None
            raise
        instance_id = answer.get("instance_id") or model.key
        with self._lock:
            self.instances[model.alias] = instance_id
            self.found.discard(model.alias)
        # never trust the request: LM Studio may auto-fit or ignore the context length
        actual = (answer.get("load_config") or {}).get("context_length")
        if actual is None:
            actual = self.loaded_context(instance_id)
        return ModelInfo(key=model.key, loaded=True, loaded_context_length=actual,
                         instance_id=instance_id, load_seconds=answer.get("load_time_seconds"))

    def _not_found(self, model: ModelConfig) -> BackendError:
        try:
            keys = ", ".join(m.key for m in self.list_models()) or "none"
        except BackendError:
            keys = "unknown"
        return BackendHTTPError(
            f"LM Studio at {self.url} has no model '{model.key}' (models.{model.alias}.key); "
            f"it has: {keys}", url=self.url, status=404)

    def find_loaded(self, model: ModelConfig) -> ModelInfo | None:
        """An instance of the model already loaded with what the spec declares (its context length,
        and its parallel predictions when declared): chats go to it, and the run does not own it."""
        for entry in self._models_v1():
            if entry.get("key") != model.key:
                continue
            for instance in entry.get("loaded_instances") or []:
                config = instance.get("config") or {}
                if config.get("context_length") != model.context_length or (
                        model.parallel and config.get("parallel") not in (None, model.parallel)):
                    continue
                with self._lock:
                    self.instances[model.alias] = instance["id"]
                    self.found.add(model.alias)
                return ModelInfo(key=model.key, loaded=True, instance_id=instance["id"],
                                 loaded_context_length=config.get("context_length"))
        return None

    def loaded_instances(self) -> list[tuple[str, str]]:
        """Every loaded instance on the server: (model key, instance id)."""
        return [(entry.get("key", "?"), instance["id"]) for entry in self._models_v1()
                for instance in entry.get("loaded_instances") or [] if instance.get("id")]

    def unload_instance(self, instance_id: str) -> bool:
        """Unload one instance by id; False when the server no longer has it."""
        try:
            self.client.request("POST", "/api/v1/models/unload", json_body={"instance_id": instance_id})
        except BackendHTTPError as exc:
            if exc.status != 404:
                raise
            return False
        return True

    def unload(self, model: ModelConfig, *, every: bool = False) -> list[str]:
        with self._model_lock(model.alias):
            return self._unload(model, every=every)

    def _unload(self, model: ModelConfig, *, every: bool = False) -> list[str]:
        """The instance this backend loaded (or found loaded) for the model; with `every`, every
        instance of its key. Never another client's instance otherwise."""
        with self._lock:
            self.loaded_models.pop(model.alias, None)
            self.loaded_parallel.pop(model.alias, None)
            instance_id = self.instances.pop(model.alias, None)
            if model.alias in self.found:
                self.found.discard(model.alias)
                instance_id = None  # another client's
        targets = [k_i[1] for k_i in self.loaded_instances() if k_i[0] == model.key] if every else []
        if instance_id and instance_id not in targets:
            targets.append(instance_id)
        # one already gone (TTL, someone else) is fine
        return [target for target in targets if self.unload_instance(target)]

    def chat(self, request: ChatRequest) -> ChatResponse:
        with self.slots.hold(request.model):
            return self.supervisor.call(lambda: self._chat(request))

    def _chat(self, request: ChatRequest) -> ChatResponse:
        with self._lock:
            instance_id = self.instances.get(request.model.alias)
        target = request.model if instance_id is None else ModelConfig(
            alias=request.model.alias, key=instance_id)
        response = self.client.chat(ChatRequest(
            model=target, messages=request.messages, sampling=request.sampling,
            response_schema=request.response_schema, timeout=request.timeout, stream=request.stream))
        expected = {request.model.key, instance_id}
        if response.model and response.model not in expected and not any(
            response.model.startswith(f"{key}:") for key in expected if key
        ):
            raise WrongModel(
                f"asked {self.url} for '{target.key}' but '{response.model}' answered: LM Studio "
                "answers with the loaded model when only one is loaded; load it with a load_model "
                "step first", url=self.url)
        return response

    def close(self) -> None:
        self.client.close()
        with self._sdk_lock:
            if self._sdk_client is not None:
                self._sdk_client.close()
                self._sdk_client = None
                self._sdk_sessions.clear()
        self.supervisor.close()
