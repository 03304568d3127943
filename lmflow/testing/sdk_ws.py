"""LM Studio's SDK websocket protocol: everything the `lmstudio` 1.5 SDK does with LLMs.

Read from the SDK and lmstudio-js. A client opens one websocket per namespace
(`ws://HOST/llm`, `/embedding`, `/system`, ...) and sends an auth packet `{"authVersion": 1,
"clientIdentifier", "clientPasskey"}`, answered `{"success": true}` or `{"success": false,
"error": "..."}` (a string). Then:

- RPC: `{"type": "rpcCall", "endpoint", "callId", "parameter"?}` answered `{"type": "rpcResult",
  "callId", "result"?}` or `{"type": "rpcError", "callId", "error"}`;
- channels: `{"type": "channelCreate", "endpoint", "channelId", "creationParameter"}`, then
  `{"type": "channelSend", "channelId", "message"}` either way (the client's is `{"type":
  "cancel"}`), ended by the server's `channelClose` or `channelError`.

An error is LM Studio's serialized error: a `title` and, for model look-ups, `displayData` with a
`code` (`generic.noModelMatchingQuery` is what the SDK raises as LMStudioModelNotFoundError).
Configs, chat histories and prompt templates are read by sdk_requests.py.

Served, by namespace (RPCs; channels):
- llm: listLoaded, getModelInfo, getLoadConfig, unloadModel, tokenize, countTokens,
  applyPromptTemplate; loadModel, getOrLoad, predict (a chat, or with the SDK's completion
  template a raw completion, relayed token by token from the instance's llama-server; with tools,
  their calls too: sdk_tools.py);
- embedding: the same model calls for embedding models, and embedString (by the instance's
  llama-server, started with `--embeddings`: pool.py);
- system: version, listDownloadedModels (all the SDK 1.5 calls there);
- files: uploadFileBase64, getLocalFileAbsolutePath (sdk_files.py);
- repository: searchModels, getModelDownloadOptions; downloadModel (sdk_repository.py: the models
  the test server has, downloaded already).
An endpoint LM Studio has and the test server does not serve (LMSTUDIO_ENDPOINTS) is answered
with an error naming it, so a client fails at once rather than at its timeout. An endpoint LM
Studio does not know either gets what LM Studio sends: a `communicationWarning` (at most 5 per
connection), and no answer.

Authentication is LM Studio's: a server with an API token `sk-lm-ID:PASSKEY` accepts the auth
packets whose clientIdentifier and clientPasskey are its two halves; any packet otherwise.
Every client that authenticates is counted by its `clientIdentifier` (one per SDK client,
shared by its namespaces).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from .refusals import Refusal
from .sdk_files import FileRefused
from .sdk_models import PARALLEL_KEY, asked_config, context_key, instance_info, load_config, model_info, named
from .sdk_repository import RepositoryRefused
from .sdk_requests import SdkError, chat_messages, collapse, render_template, sampling
from .sdk_tools import check_tool_support, relay_with_tools, requested_tools

if TYPE_CHECKING:
    from .config import TestModel
    from .inference import Inference
    from .pool import Instance, InstancePool
    from .sdk_files import UserFiles
    from .sdk_repository import Repository

TEST_SERVER_VERSION = "0.4.0-lmflow-test"
TEST_SERVER_BUILD = 1
STOP_REASONS = {"eos": "eosFound", "limit": "maxPredictedTokensReached", "word": "stopStringFound"}

_MODEL_ENDPOINTS = ("loadModel getOrLoad unloadModel listLoaded getModelInfo getLoadConfig "
                    "getBasePredictionConfig getInstanceProcessingState estimateModelUsage ")
#: the RPC and channel endpoints of LM Studio's websocket namespaces (read from lmstudio-js's backend
#: interfaces, and the `lmstudio` 1.5 SDK for uploadFileBase64 and downloadModel)
LMSTUDIO_ENDPOINTS: dict[str, frozenset[str]] = {namespace: frozenset(names.split()) for namespace, names in {
    "llm": _MODEL_ENDPOINTS + "predict completeRawText applyPromptTemplate tokenize countTokens "
                              "preloadDraftModel",
    "embedding": _MODEL_ENDPOINTS + "embedString tokenize countTokens",
    "system": "listDownloadedModels listDownloadedModelVariants alive notify version setExperimentFlag "
              "getExperimentFlags startHttpServer stopHttpServer info requestShutdown",
    "files": "uploadFileBase64 getLocalFileAbsolutePath retrieve parseDocument getDocumentParsingLibrary",
    "repository": "searchModels getModelDownloadOptions downloadModel downloadArtifact "
                  "installPluginDependencies getLocalArtifactFiles getWritableArtifactOwners pushArtifact "
                  "isAuthenticated ensureAuthenticated getAuthenticationStatus deauthenticate "
                  "loginAsComputeDevice loginWithPreAuthenticatedKeys createDownloadPlan "
                  "createArtifactDownloadPlan installLocalPlugin getModelCatalog fuzzyFindStaffPicks",
    "diagnostics": "streamLogs",
    "runtime": "listEngines getEngineSelections selectEngine removeEngine surveyHardware "
               "searchRuntimeExtensions downloadRuntimeExtension",
    "plugins": "startToolUseSession generateWithGenerator registerDevelopmentPlugin reindexPlugins "
               "setPromptPreprocessor setPredictionLoopHandler setToolsProvider setGenerator "
               "processingHandleUpdate processingHandleRequest processingPullHistory "
               "processingGetOrLoadTokenSource processingHasStatus processingNeedsNaming "
               "processingSuggestName processingSetSenderName setConfigSchematics "
               "setGlobalConfigSchematics pluginInitCompleted reportError",
}.items()}
MAX_WARNINGS = 5  # LM Studio stops sending communication warnings to a connection after 5
#: the type of the models each namespace serves
MODEL_TYPES = {"llm": "llm", "embedding": "embedding"}


def _fragment(text: str, tokens: int) -> dict[str, Any]:
    return {"type": "fragment", "fragment": {"content": text, "tokensCount": tokens,
                                             "containsDrafted": False, "reasoningType": "none"}}


def _stats(final: dict[str, Any], started: float, first_token: float | None, cancelled: bool
           ) -> dict[str, Any]:
    """LM Studio's prediction stats from llama-server's last /completion chunk."""
    prompt, predicted = final.get("tokens_evaluated") or 0, final.get("tokens_predicted") or 0
    stats: dict[str, Any] = {
        "stopReason": "userStopped" if cancelled else STOP_REASONS.get(final.get("stop_type"), "eosFound"),
        "promptTokensCount": prompt, "predictedTokensCount": predicted,
        "totalTokensCount": prompt + predicted, "numGpuLayers": 0,
    }
    per_second = (final.get("timings") or {}).get("predicted_per_second")
    if per_second:
        stats["tokensPerSecond"] = per_second
    if first_token is not None:
        stats["timeToFirstTokenSec"] = round(first_token - started, 3)
    return stats


def _engine_error(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message", error) if isinstance(error, dict) else error or payload)


# -- one client -------------------------------------------------------------------------


@dataclass
class Channel:
    """An open channel: where its messages go, and whether the client cancelled it."""

    id: int
    session: SdkSession
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, message: dict[str, Any]) -> None:
        await self.session.send({"type": "channelSend", "channelId": self.id, "message": message})


RpcHandler = Callable[[dict[str, Any]], Awaitable[Any]]
ChannelHandler = Callable[[Channel, dict[str, Any]], Awaitable[None]]


class SdkSession:
    """One websocket client of the test server, in one namespace."""

    def __init__(self, ws: WebSocket, pool: InstancePool, inference: Inference, *,
                 files: UserFiles, repository: Repository, api_token: str | None = None):
        self.ws = ws
        self.pool = pool
        self.inference = inference
        self.files = files
        self.repository = repository
        self.api_token = api_token
        self.namespace = ws.url.path.strip("/")
        self.channels: dict[int, Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._warnings = 0
        model_rpcs: dict[str, RpcHandler] = {
            "listLoaded": self.list_loaded, "getModelInfo": self.get_model_info,
            "getLoadConfig": self.get_load_config, "unloadModel": self.unload_model,
            "tokenize": self.tokenize, "countTokens": self.count_tokens,
        }
        model_channels: dict[str, ChannelHandler] = {"loadModel": self.load_model,
                                                     "getOrLoad": self.get_or_load}
        self.rpcs: dict[str, RpcHandler] = {
            "llm": {**model_rpcs, "applyPromptTemplate": self.apply_prompt_template},
            "embedding": {**model_rpcs, "embedString": self.embed_string},
            "system": {"version": self.version, "listDownloadedModels": self.list_downloaded},
            "files": {"uploadFileBase64": self.upload_file, "getLocalFileAbsolutePath": self.file_path},
            "repository": {"searchModels": self.search_models,
                           "getModelDownloadOptions": self.download_options},
        }.get(self.namespace, {})
        self.channel_handlers: dict[str, ChannelHandler] = {
            "llm": {**model_channels, "predict": self.predict},
            "embedding": model_channels,
            "repository": {"downloadModel": self.download_model},
        }.get(self.namespace, {})

    async def run(self) -> None:
        await self.ws.accept()
        try:
            if not await self._authenticate():
                return
            while True:
                message = await self.ws.receive_json()
                kind = message.get("type")
                if kind == "rpcCall":
                    self._spawn(self._rpc(message))
                elif kind == "channelCreate":
                    self._spawn(self._channel(message))
                elif kind == "channelSend" and (message.get("message") or {}).get("type") == "cancel":
                    channel = self.channels.get(message.get("channelId"))
                    if channel is not None:
                        channel.cancelled.set()
        except WebSocketDisconnect:
            pass
        finally:
            # a client that goes away cancels its predictions; its loads finish (a load cut short
            # would leave a llama-server running that no instance owns)
            self._closed = True
            for channel in self.channels.values():
                channel.cancelled.set()
            self.files.forget(id(self))  # as LM Studio, a client's prepared files go with it

    async def _authenticate(self) -> bool:
        auth = await self.ws.receive_json()
        token = self.api_token
        presented = f"sk-lm-{auth.get('clientIdentifier')}:{auth.get('clientPasskey')}"
        if token and presented != token:
            await self.send({"success": False, "error": (
                "Invalid API token: this server requires an API token, whose two halves "
                "(sk-lm-IDENTIFIER:PASSKEY) are the auth packet's clientIdentifier and clientPasskey")})
            await self.ws.close()
            return False
        await self.send({"success": True})
        self.inference.stats.sdk_clients.add(str(auth.get("clientIdentifier") or id(self)))
        return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Answer a call concurrently with the others (a long prediction must not hold up a cancel)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_json(message)
            except (WebSocketDisconnect, RuntimeError):  # the client went away mid-answer
                self._closed = True

    async def _rpc(self, message: dict[str, Any]) -> None:
        endpoint, call_id = message.get("endpoint"), message.get("callId")
        handler = self.rpcs.get(str(endpoint))
        if handler is None and not await self._known(endpoint, "rpcCall", "rpcEndpointUnknown"):
            return
        try:
            if handler is None:
                raise SdkError(f"Unsupported RPC endpoint {endpoint!r} on /{self.namespace} "
                               "(lmflow test server)")
            await self.pool.expire()
            result = await handler(message.get("parameter") or {})
        except Exception as exc:  # noqa: BLE001 - as in LM Studio, a failed call is answered, never dropped
            await self.send({"type": "rpcError", "callId": call_id, "error": _error_json(exc)})
            return
        reply: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            reply["result"] = result
        await self.send(reply)

    async def _channel(self, message: dict[str, Any]) -> None:
        endpoint = message.get("endpoint")
        handler = self.channel_handlers.get(str(endpoint))
        if handler is None and not await self._known(endpoint, "channelCreate", "channelEndpointUnknown"):
            return
        channel = self.channels[message.get("channelId")] = Channel(message.get("channelId"), self)
        try:
            if handler is None:
                raise SdkError(f"Unsupported channel endpoint {endpoint!r} on /{self.namespace} "
                               "(lmflow test server)")
            await self.pool.expire()
            await handler(channel, message.get("creationParameter") or {})
        except Exception as exc:  # noqa: BLE001 - as in LM Studio, a failed channel is answered, never dropped
            await self.send({"type": "channelError", "channelId": channel.id, "error": _error_json(exc)})
        else:
            await self.send({"type": "channelClose", "channelId": channel.id})
        finally:
            self.channels.pop(channel.id, None)

    async def _known(self, endpoint: Any, message: str, kind: str) -> bool:
        """Whether LM Studio has this endpoint; if not, the communication warning it sends instead."""
        if endpoint in LMSTUDIO_ENDPOINTS.get(self.namespace, ()):
            return True
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            await self.send({"type": "communicationWarning", "kind": kind,
                             "warning": f"Received {message} for unknown endpoint, endpoint = {endpoint}"})
        return False

    # -- finding models ---------------------------------------------------------------

    @property
    def model_type(self) -> str | None:
        """The type of the models this namespace serves (None: a namespace of no models)."""
        return MODEL_TYPES.get(self.namespace)

    def _instances(self) -> list[Instance]:
        """The loaded instances this namespace sees: those of its type of model."""
        return [i for i in self.pool.instances.values() if i.model.type == self.model_type]

    def _none_served(self) -> bool:
        """Whether the test server has no model of this namespace's type."""
        return not any(m.type == self.model_type for m in self.pool.models.values())

    def _not_found(self, query: dict[str, Any]) -> SdkError:
        instances = self._instances()
        if self.namespace == "embedding" and self._none_served():
            title = ("No embedding model is loaded: this lmflow test server has no embedding model "
                     "(a model of its config with `type: embedding` is one)")
        else:
            title = f"No loaded model satisfies all requirements specified in the query {query}"
        return SdkError(title, {"code": "generic.noModelMatchingQuery", "query": query,
                                "loadedModelsSample": [i.id for i in instances[:10]],
                                "totalLoadedModels": len(instances)})

    def _find(self, specifier: dict[str, Any] | None) -> Instance:
        """The loaded instance a model specifier names (an identifier, a key, a path, or any)."""
        specifier = specifier or {}
        instances = self._instances()
        if specifier.get("type") == "instanceReference":
            found = [i for i in instances if i.id == specifier.get("instanceReference")]
            if not found:
                raise SdkError("The model instance was unloaded", {"code": "generic.specificModelUnloaded"})
            return found[0]
        query = specifier.get("query") or {}
        found = named(instances, query.get("identifier") or query.get("path"))
        if not found:
            raise self._not_found(query)
        return found[0]

    def _model(self, key: str) -> TestModel:
        """The model a load asks for, by key or path: one of this namespace's type."""
        models = self.pool.models
        model = models.get(key) or next((m for m in models.values() if m.matches(key)), None)
        if model is not None and model.type == self.model_type:
            return model
        names = {"llm": "an LLM", "embedding": "an embedding model"}
        if model is not None:
            raise SdkError(f"'{key}' is {names[model.type]}, not {names[str(self.model_type)]}", {
                "code": "generic.domainMismatch", "path": key, "actualDomain": model.type,
                "expectedDomain": self.model_type})
        title = f"Model not found: {key}"
        if self.namespace == "embedding" and self._none_served():
            title = (f"Embedding model not found: {key} (this lmflow test server has no embedding model: "
                     "a model of its config with `type: embedding` is one)")
        raise SdkError(title, {"code": "generic.pathNotFound", "path": key, "totalModels": len(models),
                               "availablePathsSample": [m.lmstudio_path for m in models.values()][:10]})

    # -- model RPCs -------------------------------------------------------------------

    async def list_loaded(self, parameter: dict[str, Any]) -> Any:
        return [instance_info(i) for i in self._instances()]

    async def get_model_info(self, parameter: dict[str, Any]) -> Any:
        return instance_info(self._find(parameter.get("specifier")))

    async def get_load_config(self, parameter: dict[str, Any]) -> Any:
        return load_config(self._find(parameter.get("specifier")))

    async def unload_model(self, parameter: dict[str, Any]) -> Any:
        """Unload an instance by identifier; an unknown one is a model not found (as LM Studio answers,
        which the SDK raises as LMStudioModelNotFoundError)."""
        identifier = parameter.get("identifier", "")
        if not any(i.id == identifier for i in self._instances()) or not await self.pool.unload(identifier):
            raise self._not_found({"identifier": identifier})
        return None

    async def tokenize(self, parameter: dict[str, Any]) -> Any:
        """An input's tokens; an embedding model's with the special tokens it embeds the input with,
        a BERT's [CLS] and [SEP] (inferred: the SDK's suite expects two tokens more than countTokens
        gives for nomic-embed-text's)."""
        instance = self._find(parameter.get("specifier"))
        special = self.model_type == "embedding"
        return {"tokens": await self._tokens(instance, parameter.get("inputString", ""), special=special)}

    async def count_tokens(self, parameter: dict[str, Any]) -> Any:
        instance = self._find(parameter.get("specifier"))
        return {"tokenCount": len(await self._tokens(instance, parameter.get("inputString", "")))}

    async def apply_prompt_template(self, parameter: dict[str, Any]) -> Any:
        instance = self._find(parameter.get("specifier"))
        config = collapse(parameter.get("predictionConfigStack"))
        messages = chat_messages(parameter.get("history"), instance.id)
        return {"formatted": await self._prompt(instance, messages, config)}

    async def embed_string(self, parameter: dict[str, Any]) -> Any:
        """An input's embedding, by the instance's llama-server (its OpenAI route, which normalizes
        the vector as LM Studio's embeddings are)."""
        instance = self._find(parameter.get("modelSpecifier"))
        instance.last_used = time.monotonic()
        answer = await self._engine(instance, "/v1/embeddings", {"input": parameter.get("inputString", "")})
        return {"embedding": answer["data"][0]["embedding"]}

    async def _engine(self, instance: Instance, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call to the instance's llama-server."""
        answer = await self.inference.http.post(f"{instance.engine.url}{path}", json=body)
        if answer.status_code != 200:
            raise SdkError(f"{instance.id}: {_engine_error(answer.json())}")
        return answer.json()

    async def _tokens(self, instance: Instance, text: str, special: bool = False) -> list[int]:
        answer = await self._engine(instance, "/tokenize", {"content": text, "add_special": special})
        return answer["tokens"]

    async def _prompt(self, instance: Instance, messages: list[dict[str, Any]], config: dict[str, Any]
                      ) -> str:
        """The prompt for a chat: the client's template if it sent one, else the model's own."""
        template = config.get("llm.prediction.promptTemplate")
        if template:
            return render_template(template, messages)
        return (await self._engine(instance, "/apply-template", {"messages": messages}))["prompt"]

    # -- system RPCs ------------------------------------------------------------------

    async def version(self, parameter: dict[str, Any]) -> Any:
        return {"version": TEST_SERVER_VERSION, "build": TEST_SERVER_BUILD}

    async def list_downloaded(self, parameter: dict[str, Any]) -> Any:
        return [model_info(m) for m in self.pool.models.values()]

    # -- files and the repository -----------------------------------------------------

    async def upload_file(self, parameter: dict[str, Any]) -> Any:
        # decoding and writing a large image must not hold up the other clients' streams
        return await run_in_threadpool(self.files.upload, id(self), parameter)

    async def file_path(self, parameter: dict[str, Any]) -> Any:
        return self.files.path(parameter)

    async def search_models(self, parameter: dict[str, Any]) -> Any:
        return self.repository.search(parameter)

    async def download_options(self, parameter: dict[str, Any]) -> Any:
        return self.repository.options(parameter)

    async def download_model(self, channel: Channel, parameter: dict[str, Any]) -> None:
        """A model of the repository is here already: its download ends at once (sdk_repository.py)."""
        model = self.repository.find(str(parameter.get("downloadIdentifier", "")))
        for message in self.repository.download_messages(model):
            await channel.send(message)

    # -- loading ----------------------------------------------------------------------

    async def load_model(self, channel: Channel, parameter: dict[str, Any]) -> None:
        """A new instance, always (the SDK's load_new_instance)."""
        model = self._model(parameter.get("modelKey", ""))
        await channel.send({"type": "resolved", "info": model_info(model)})
        instance = await self._load(model, parameter.get("loadConfigStack"),
                                    identifier=parameter.get("identifier"), ttl_ms=parameter.get("ttlMs"))
        await channel.send({"type": "progress", "progress": 1.0})
        await channel.send({"type": "success", "info": instance_info(instance)})

    async def get_or_load(self, channel: Channel, parameter: dict[str, Any]) -> None:
        """The loaded instance of an identifier or key, else a new one (the SDK's `model(key)`).

        As in LM Studio, the load config applies only to a new instance.
        """
        wanted = parameter.get("identifier", "")

        def find() -> Instance | None:
            return next(iter(named(self._instances(), wanted)), None)

        async def load() -> Instance:
            model = self._model(wanted)
            await channel.send({"type": "startLoading", "identifier": model.key, "info": model_info(model)})
            return await self._load(model, parameter.get("loadConfigStack"),
                                    ttl_ms=parameter.get("loadTtlMs"))

        async def evicting(other: Instance) -> None:  # LM Studio's "JIT models auto-evict"
            await channel.send({"type": "unloadingOtherJITModel", "info": instance_info(other)})

        instance, loaded_now = await self.pool.get_or_load(find, load, evicting)
        if not loaded_now:
            await channel.send({"type": "alreadyLoaded", "info": instance_info(instance)})
            return
        await channel.send({"type": "loadProgress", "progress": 1.0})
        await channel.send({"type": "loadSuccess", "info": instance_info(instance)})

    async def _load(self, model: TestModel, stack: dict[str, Any] | None, *,
                    identifier: str | None = None, ttl_ms: int | None = None) -> Instance:
        config = collapse(stack)
        try:
            instance = await self.pool.load(model.key, config.get(context_key(model.type)),
                                            identifier=identifier, ttl_ms=ttl_ms,
                                            parallel=config.get(PARALLEL_KEY))
        except Refusal as refusal:
            raise SdkError(refusal.message) from None
        asked_config[instance.engine] = {k: v for k, v in config.items()
                                         if k.startswith(("load.", f"{model.type}.load."))}
        return instance

    # -- predicting -------------------------------------------------------------------

    async def predict(self, channel: Channel, parameter: dict[str, Any]) -> None:
        """A chat answer or a raw completion, streamed as the model writes it."""
        instance = self._find(parameter.get("modelSpecifier"))
        preset = parameter.get("fuzzyPresetIdentifier")
        if preset:  # the test server has no presets: every name is unknown, as in a fresh LM Studio
            raise SdkError(f"No preset matching {preset!r} (the lmflow test server has no presets)", {
                "code": "generic.presetNotFound", "specifiedFuzzyPresetIdentifier": preset,
                "availablePresetsSample": [], "totalAvailablePresets": 0})
        config = collapse(parameter.get("predictionConfigStack"))
        tools = requested_tools(config)
        messages = chat_messages(parameter.get("history"), instance.id)
        params = sampling(config)
        http = self.inference.http
        if tools is not None:
            await check_tool_support(http, instance.engine.url, instance.id)
        started = time.monotonic()
        instance.last_used = started
        self.inference.stats.chat_requests += 1
        with self.inference.stats.answering(instance.id):
            model = instance.model
            if tools is not None:  # sdk_tools.py
                final, first_token = await relay_with_tools(channel.send, channel.cancelled.is_set, http,
                                                            instance.engine.url,
                                                            {"messages": messages, **tools, **params})
            elif model.working_context_length is not None or model.answers == "retriever":
                final, first_token = await self._answer_whole(channel, instance, messages, params)
            else:
                prompt = await self._prompt(instance, messages, config)
                final, first_token = await self._relay(channel, instance, {"prompt": prompt, **params})
        instance.last_used = time.monotonic()
        await channel.send({
            "type": "success", "stats": _stats(final, started, first_token, channel.cancelled.is_set()),
            "modelInfo": instance_info(instance), "loadModelConfig": load_config(instance),
            "predictionConfig": {"fields": [{"key": k, "value": v} for k, v in config.items()]},
        })

    async def _relay(self, channel: Channel, instance: Instance, body: dict[str, Any]
                     ) -> tuple[dict[str, Any], float | None]:
        """llama-server's /completion stream as fragments; its last chunk and the first token's time."""
        http = self.inference.http
        upstream = await http.send(http.build_request(
            "POST", f"{instance.engine.url}/completion", json={**body, "stream": True, "cache_prompt": True}),
            stream=True)
        last: dict[str, Any] = {}
        first_token = None
        try:
            if upstream.status_code != 200:
                await upstream.aread()
                raise SdkError(f"{instance.id}: {_engine_error(upstream.json())}")
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                chunk = json.loads(line[len("data:"):])
                if "error" in chunk:
                    raise SdkError(f"{instance.id}: {_engine_error(chunk)}")
                if chunk.get("content"):
                    first_token = first_token or time.monotonic()
                    await channel.send(_fragment(chunk["content"], len(chunk.get("tokens") or []) or 1))
                last = chunk
                if chunk.get("stop") or channel.cancelled.is_set():
                    break  # closing the stream stops llama-server's generation
        finally:
            await upstream.aclose()
        return last, first_token

    async def _answer_whole(self, channel: Channel, instance: Instance, messages: list[dict[str, Any]],
                            params: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
        """The answer of a model with a configured flaw (a working limit, the retriever): one fragment."""
        status, payload = await self.inference.complete(instance, {"messages": messages, "stream": False,
                                                                   **params})
        if status != 200:
            raise SdkError(f"{instance.id}: {_engine_error(payload)}")
        choice = payload["choices"][0]
        usage = payload.get("usage") or {}
        text = choice["message"].get("content") or ""
        await channel.send(_fragment(text, usage.get("completion_tokens", 0)))
        return {"stop_type": "limit" if choice.get("finish_reason") == "length" else "eos",
                "tokens_evaluated": usage.get("prompt_tokens"),
                "tokens_predicted": usage.get("completion_tokens")}, time.monotonic()


def _error_json(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, SdkError):
        return exc.as_json()
    if isinstance(exc, (FileRefused, RepositoryRefused)):
        return {"title": str(exc)}
    return {"title": f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__}
