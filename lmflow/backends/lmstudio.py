"""LM Studio through its REST API v1 (models, load, unload) and its OpenAI-compatible chat.

One client per server for the life of the backend, kept across unload and
reload (one HTTP client, and one SDK client for what REST cannot do: ttl, gpu,
identifier, parallel predictions). After every load the context length the
server actually applied is read back; answers are checked to come from the
requested model. Safe to call from several threads.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx

from ..errors import (
    BackendError,
    BackendHTTPError,
    ContextOverflow,
    WrongModel,  # noqa: F401 - raised here, defined with the tree
)
from ..spec.model import ModelConfig, ServerConfig
from .base import REMOTE_SERVER_OPTIONS, Backend, ChatRequest, ChatResponse, ModelInfo, checked
from .openai import OpenAIClient
from .supervisor import Supervisor

LOAD_TIMEOUT = 600.0
#: the load-config field behind the SDK's `maxParallelPredictions` (LM Studio's "Max Concurrent
#: Predictions"); the Python SDK 1.5 does not know that name and drops it without a word
PARALLEL_FIELD = "llm.load.numParallelSessions"


#: chat template tokens per message, estimated (SmolLM2's template adds 5; others up to ~10)
TEMPLATE_TOKENS = 8

#: LM Studio's API tokens: the SDK's websocket authenticates with their two halves
API_TOKEN = re.compile(r"^sk-lm-(?P<clientIdentifier>[A-Za-z0-9]{8}):(?P<clientPasskey>[A-Za-z0-9]{20})$")


def sdk_client(host: str, token: str | None, url: str) -> Any:
    """An explicit `lmstudio.Client` for `host`, authenticated with the API token if there is one.

    The SDK takes `api_token` from 1.6 on; 1.5 has no way to pass one, so its auth message is
    set to what 1.6 sends: the token's identifier and passkey halves.
    """
    import inspect

    import lmstudio as lms

    if not token:
        return lms.Client(host)
    match = API_TOKEN.match(token.strip())
    if match is None:
        raise BackendError(f"the API token for {url} is not an LM Studio API token "
                           "(sk-lm-XXXXXXXX:YYYYYYYYYYYYYYYYYYYY), so the lmstudio SDK cannot "
                           "authenticate (loads with ttl, gpu, identifier or parallel use the SDK): "
                           "set LM_API_TOKEN (or server.api_key_env) to a token made in LM Studio",
                           url=url)
    if "api_token" in inspect.signature(lms.Client).parameters:
        return lms.Client(host, api_token=token)
    client = lms.Client(host)
    client._auth_details = {"authVersion": 1, **match.groupdict()}
    return client


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text of a chat's messages (the text parts of multi-part ones), one per line."""
    texts = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "\n".join(texts)


class LMStudioBackend(Backend):
    kind = "lmstudio"
    summary = "LM Studio (REST v1 and v0, its SDK for what REST cannot say)"
    server_options = REMOTE_SERVER_OPTIONS
    default_url = "http://127.0.0.1:1234"
    manages_models = True
    load_options = frozenset({"gpu", "ttl", "identifier"})

    def __init__(self, config: ServerConfig, *, transport: httpx.BaseTransport | None = None):
        super().__init__(config)
        token = os.environ.get(config.api_key_env or "LM_API_TOKEN") or None
        self._token = token
        hint = (f"start it with `{config.start}`" if config.start
                else "start LM Studio's server (`lms server start`) or fix server.url")
        self.client = OpenAIClient(config.url or self.default_url, api_key=token,
                                   transport=transport, start_hint=hint)
        #: instance ids chats go to, by model alias: loaded by this backend, or found loaded
        #: (`find_loaded`: another client's, never unloaded unless asked for every instance)
        self.instances: dict[str, str] = {}
        self.found: set[str] = set()
        #: the context length each of those instances was loaded with, by model alias
        self.contexts: dict[str, int | None] = {}
        self.loaded_models: dict[str, ModelConfig] = {}
        #: parallel predictions the server applied, by model alias (None: it does not say)
        self.loaded_parallel: dict[str, int | None] = {}
        self.supervisor = Supervisor(config, self.health, after_restart=self._reload_after_restart)
        self._sdk_client: Any = None
        self._sdk_sessions: set[str] = set()  # SDK namespaces connected (the SDK connects lazily, racily)
        self._version: str | None = None
        #: whether the server has REST v1 (LM Studio 0.4+); None until asked. Before 0.4 lmflow
        #: lists with REST v0 and loads, lists instances and unloads through the SDK
        self.rest_v1: bool | None = None
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
            for path in ("/api/v1/models", "/api/v0/models"):  # v0 only: LM Studio before 0.4
                status = self.client.http.get(path, timeout=2.0).status_code
                if status != 404:
                    return status in (200, 401, 403)
            return False
        except httpx.HTTPError:
            return False

    def _has_v1(self) -> bool:
        if self.rest_v1 is None:
            try:
                self.client.request("GET", "/api/v1/models")
                self.rest_v1 = True
            except BackendHTTPError as exc:
                if exc.status != 404:
                    raise
                self.rest_v1 = False
        return self.rest_v1

    def _models_v1(self) -> list[dict[str, Any]]:
        """The server's models as REST v1 lists them (built from v0 and the SDK before 0.4)."""
        if not self._has_v1():
            return self._models_before_v1()
        return self.client.request_json("GET", "/api/v1/models").get("models", [])

    def _models_before_v1(self) -> list[dict[str, Any]]:
        data = self.client.request_json("GET", "/api/v0/models").get("data", [])
        instances: dict[str, list[dict[str, Any]]] = {}
        try:
            for handle in self._sdk().llm.list_loaded():
                info = handle.get_info()
                instances.setdefault(info.model_key, []).append(
                    {"id": info.identifier, "config": {"context_length": info.context_length}})
        except Exception as exc:  # noqa: BLE001 - any SDK failure: say which server and why
            raise BackendError(f"LM Studio at {self.url} (before 0.4: REST v0 only) could not list "
                               f"its loaded instances through the lmstudio SDK: {exc}",
                               url=self.url) from None
        return [{"key": d.get("id", "?"), "type": d.get("type"), "max_context_length":
                 d.get("max_context_length"), "loaded_instances": instances.get(d.get("id"), [])}
                for d in data]

    def list_models(self) -> list[ModelInfo]:
        return checked(self.url, lambda: self._list_models())

    def _list_models(self) -> list[ModelInfo]:
        if not self._has_v1():
            return self._list_v0()  # LM Studio before 0.4
        entries = self._models_v1()
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
        data = self.client.request_json("GET", "/api/v0/models").get("data", [])
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
        return checked(self.url, lambda: self._loaded_config(instance_id))

    def _loaded_config(self, instance_id: str) -> dict[str, Any]:
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
                self._sdk_client = sdk_client(urlparse(self.url).netloc, self._token, self.url)
            if namespace not in self._sdk_sessions:
                getattr(self._sdk_client, namespace).connect()
                self._sdk_sessions.add(namespace)
            return self._sdk_client

    def _load(self, model: ModelConfig) -> ModelInfo:
        if model.ttl is not None or model.gpu is not None or model.identifier or model.parallel \
                or not self._has_v1():
            return self._load_sdk(model)  # REST v1 has no ttl, gpu, identifier or parallel (nor v0 loads)
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
        self._track(model.alias, handle.identifier, actual)
        with self._lock:
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
            answer = self.client.request_json("POST", "/api/v1/models/load", timeout=LOAD_TIMEOUT,
                                              json_body=body)
        except BackendHTTPError as exc:
            if exc.status == 404:
                raise self._not_found(model) from None
            raise
        instance_id = answer.get("instance_id") or model.key
        # never trust the request: LM Studio may auto-fit or ignore the context length
        actual = (answer.get("load_config") or {}).get("context_length")
        if actual is None:
            actual = self.loaded_context(instance_id)
        self._track(model.alias, instance_id, actual)
        return ModelInfo(key=model.key, loaded=True, loaded_context_length=actual,
                         instance_id=instance_id, load_seconds=answer.get("load_time_seconds"))

    def _track(self, alias: str, instance_id: str, context: int | None, *, found: bool = False) -> None:
        """Chats for `alias` go to this instance, loaded at `context` (found: another client's)."""
        with self._lock:
            self.instances[alias] = instance_id
            self.contexts[alias] = context
            if found:
                self.found.add(alias)
            else:
                self.found.discard(alias)

    def _not_found(self, model: ModelConfig) -> BackendError:
        try:
            keys = ", ".join(m.key for m in self.list_models()) or "none"
        except BackendError:
            keys = "unknown"
        return BackendHTTPError(
            f"LM Studio at {self.url} has no model '{model.key}' (models.{model.alias}.key); "
            f"it has: {keys}", url=self.url, status=404)

    def find_loaded(self, model: ModelConfig) -> ModelInfo | None:
        return checked(self.url, lambda: self._find_loaded(model))

    def _find_loaded(self, model: ModelConfig) -> ModelInfo | None:
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
                with self._lock:  # the instance this backend loaded for the alias stays its own
                    theirs = self.instances.get(model.alias) != instance["id"] or model.alias in self.found
                self._track(model.alias, instance["id"], config.get("context_length"), found=theirs)
                return ModelInfo(key=model.key, loaded=True, instance_id=instance["id"],
                                 loaded_context_length=config.get("context_length"))
        return None

    def loaded_instances(self) -> list[tuple[str, str]]:
        return checked(self.url, lambda: self._loaded_instances())

    def _loaded_instances(self) -> list[tuple[str, str]]:
        """Every loaded instance on the server: (model key, instance id)."""
        return [(entry.get("key", "?"), instance["id"]) for entry in self._models_v1()
                for instance in entry.get("loaded_instances") or [] if instance.get("id")]

    def unload_instance(self, instance_id: str) -> bool:
        """Unload one instance by id; False when the server no longer has it."""
        if not self._has_v1():
            if instance_id not in [i for _k, i in self.loaded_instances()]:
                return False
            try:
                self._sdk().llm.unload(instance_id)
            except Exception as exc:  # noqa: BLE001 - any SDK failure: say which server and why
                raise BackendError(f"LM Studio at {self.url} could not unload {instance_id}: {exc}",
                                   url=self.url) from None
            return True
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
            self.contexts.pop(model.alias, None)
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

    def count_tokens(self, model: ModelConfig, text: str) -> int | None:
        with self._lock:
            instance_id = self.instances.get(model.alias)
        if instance_id is None:
            return None  # not loaded by (nor found by) lmflow: no instance to ask
        import lmstudio as lms

        try:
            return int(self._sdk().llm._create_handle(instance_id).count_tokens(text))
        except (lms.LMStudioError, BackendError):
            return None  # a server (or an SDK session) that cannot count: no check, as before

    def _check_fits(self, request: ChatRequest, instance_id: str) -> None:
        """Refuse a prompt that cannot fit the instance's context, counted by the server itself.

        LM Studio may truncate an over-long prompt instead of failing (its context overflow
        policy), which gives an answer to a question nobody asked. Only a prompt whose UTF-8 size
        could reach the context (a token is at least one byte) is counted, so short prompts cost
        nothing; the chat template's own tokens are estimated at TEMPLATE_TOKENS per message.
        """
        with self._lock:
            context = self.contexts.get(request.model.alias)
        if not context:
            return
        text = prompt_text(request.messages)
        answer = int(request.sampling.get("max_tokens") or 0)
        overhead = TEMPLATE_TOKENS * len(request.messages)
        if len(text.encode()) + overhead + answer <= context:
            return
        counted = self.count_tokens(request.model, text)
        if counted is not None and counted + overhead + answer > context:
            raise ContextOverflow(
                f"the prompt is {counted} tokens (counted by {self.url}) plus about {overhead} for the "
                f"chat template{f' and max_tokens {answer}' if answer else ''}: more than the "
                f"{context} that {instance_id} was loaded with; shorten the prompt, lower max_tokens "
                f"or load models.{request.model.alias} with a larger context_length",
                url=self.url, n_prompt=counted + overhead, n_ctx=context)

    def _chat(self, request: ChatRequest) -> ChatResponse:
        with self._lock:
            instance_id = self.instances.get(request.model.alias)
        if instance_id is not None:
            self._check_fits(request, instance_id)
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
