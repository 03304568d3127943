"""An LM Studio-compatible server for tests and CI, with real inference.

It speaks what LM Studio 0.4 documents (its REST pages, read for the shapes):

- REST v1: `GET /api/v1/models`, `POST /api/v1/models/load|unload|download`,
  `GET /api/v1/models/download/status/{job_id}`, `POST /api/v1/chat` (native, stateful:
  stateful_chat.py);
- REST v0: `GET /api/v0/models[/{model}]`, `POST /api/v0/chat/completions|completions|embeddings`;
- OpenAI-compatible: `GET /v1/models`, `POST /v1/chat/completions|completions|embeddings|responses`;
- the SDK's websocket protocol (sdk_ws.py).

Every load starts a llama-server child at the context length the load ends up with, so answers
are real. It has no embedding model (none small enough ships as a GGUF package), so embeddings are
refused the way LM Studio refuses them for an LLM, and it downloads nothing: a download of a model it
serves is "already downloaded", anything else is refused naming the model. Errors take the shape of
the API that was called (refusals.py). It can behave like a troublesome LM Studio: a declared maximum
context larger than what loads, silent clamping, JIT loading, slow answers, ignoring the request's
model field, crashing mid-request, requiring a token, being older than 0.4 (no REST v1).

Each instance's llama-server has as many slots as the instance's parallel
predictions: what an SDK load asks for (`maxParallelPredictions`), else 4, LM
Studio 0.4's default (REST and JIT loads), reported as
`loaded_instances[].config.parallel`. For tests of lmflow's concurrency:

- `GET /lmflow/stats` -> `{"chat_requests", "in_flight", "max_in_flight",
  "max_in_flight_by_instance": {id: N}, "sdk_clients"}`: chat requests received
  (every chat and completion route, and SDK predictions), those being answered now and the most
  ever at once, overall and per instance, and the distinct SDK clients that
  connected (by the `clientIdentifier` they authenticate with);
- `POST /lmflow/stats/reset` zeroes them (maxima restart from what is in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ..backends.catalog import BUNDLED, llama_server_binary
from ..backends.local import LlamaServer
from ..errors import LmflowError
from .config import CONFIG_SCHEMA as CONFIG_SCHEMA  # re-exported: the module users know
from .config import Behaviour, TestModel
from .config import installed_models as installed_models
from .config import load_behaviour as load_behaviour
from .refusals import Refusal, UpstreamError, checked, json_body, refused
from .sdk_ws import gguf_general

DEFAULT_CONTEXT = 4096
DEFAULT_PARALLEL = 4  # LM Studio 0.4's "Max Concurrent Predictions"
#: the llama.cpp load options of REST v1 a load gets unless it asks otherwise (LM Studio's defaults)
DEFAULT_OPTIONS: dict[str, Any] = {"eval_batch_size": 512, "flash_attention": True,
                                   "offload_kv_cache_to_gpu": True}


@dataclass
class Instance:
    id: str
    model: TestModel
    context_length: int
    engine: LlamaServer
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    ttl_seconds: float | None = None  # set per load by the SDK (ttl)
    parallel: int = DEFAULT_PARALLEL  # llama-server slots (-np)
    #: the REST load options it got (what GET /api/v1/models reports in loaded_instances[].config)
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))


@dataclass
class Stats:
    """What the server has been asked, for tests of concurrency (all touched in the event loop only)."""

    chat_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by_instance: dict[str, int] = field(default_factory=dict)
    max_in_flight_by_instance: dict[str, int] = field(default_factory=dict)
    sdk_clients: set[str] = field(default_factory=set)

    def started(self, instance_id: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        now = self.in_flight_by_instance[instance_id] = self.in_flight_by_instance.get(instance_id, 0) + 1
        self.max_in_flight_by_instance[instance_id] = max(
            self.max_in_flight_by_instance.get(instance_id, 0), now)

    def finished(self, instance_id: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_instance[instance_id] -= 1

    @contextlib.contextmanager
    def answering(self, instance_id: str) -> Any:
        self.started(instance_id)
        try:
            yield
        finally:
            self.finished(instance_id)

    def reset(self) -> None:
        self.chat_requests = 0
        self.max_in_flight = self.in_flight
        self.max_in_flight_by_instance = {i: n for i, n in self.in_flight_by_instance.items() if n}
        self.sdk_clients.clear()

    def as_json(self) -> dict[str, Any]:
        return {"chat_requests": self.chat_requests, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_in_flight_by_instance": dict(self.max_in_flight_by_instance),
                "sdk_clients": len(self.sdk_clients)}


_COUNT = {"type": "integer", "minimum": 1}
CHAT = "/v1/chat/completions"  # llama-server's path (the one that applies the prompt template)

#: request bodies of REST v1's model management, as its docs list them (unknown keys are refused)
LOAD_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model"], "additionalProperties": False,
    "properties": {"model": {"type": "string", "minLength": 1}, "context_length": _COUNT,
                   "eval_batch_size": _COUNT, "flash_attention": {"type": "boolean"},
                   "num_experts": _COUNT, "offload_kv_cache_to_gpu": {"type": "boolean"},
                   "echo_load_config": {"type": "boolean"}}}
UNLOAD_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["instance_id"], "additionalProperties": False,
    "properties": {"instance_id": {"type": "string"}}}
DOWNLOAD_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model"], "additionalProperties": False,
    "properties": {"model": {"type": "string", "minLength": 1}, "quantization": {"type": "string"}}}
EMBEDDINGS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {"model": {"type": "string"}, "input": {"type": ["string", "array"]}}}


def engine_args(asked: dict[str, Any]) -> tuple[str, ...]:
    """llama-server's flags for the REST v1 load options a load asked for; options it did not ask for
    keep llama-server's own defaults (so a plain load starts the engine as it always did), while the
    listing reports LM Studio's defaults for them."""
    args: list[str] = []
    if "eval_batch_size" in asked:
        args += ["-b", str(asked["eval_batch_size"])]
    if "flash_attention" in asked:
        args += ["-fa", "on" if asked["flash_attention"] else "off"]
    if asked.get("offload_kv_cache_to_gpu") is False:  # the KV cache stays in RAM on a CPU anyway
        args.append("-nkvo")
    return tuple(args)


def quantization(file_name: str) -> str | None:
    """The quantization a GGUF file name states (`...-Q4_1.gguf`), as LM Studio lists it."""
    found = re.search(r"(I?Q\d\w*?|BF16|F16|F32)(?:\.gguf)?$", Path(file_name).stem, re.IGNORECASE)
    return found.group(1).upper() if found else None


def bits_per_weight(quant: str | None) -> int | None:
    """The bits a quantization's name states (Q4_1: 4, F16: 16)."""
    found = re.search(r"(\d+)", quant or "")
    return int(found.group(1)) if found else None


def publisher(key: str) -> str:
    """Who publishes a model, as LM Studio reads it from `publisher/name` keys."""
    return key.split("/", 1)[0] if "/" in key else "local"


def v0_details(instance: Instance, payload: dict[str, Any]) -> dict[str, Any]:
    """What REST v0 adds to an OpenAI-shaped answer: stats, model_info, runtime."""
    timings = payload.get("timings") or {}
    finish = (payload.get("choices") or [{}])[0].get("finish_reason")
    return {
        "stats": {"tokens_per_second": timings.get("predicted_per_second"),
                  "time_to_first_token": round(timings.get("prompt_ms", 0) / 1000, 3),
                  "generation_time": round(timings.get("predicted_ms", 0) / 1000, 3),
                  "stop_reason": "maxPredictedTokensReached" if finish == "length" else "eosFound"},
        "model_info": {"arch": gguf_general(instance.model.path).get("general.architecture"),
                       "quant": quantization(instance.model.path.name), "format": "gguf",
                       "context_length": instance.context_length},
        "runtime": {"name": "llama.cpp (lmflow test server)", "version": "0", "supported_formats": ["gguf"]},
    }


class LMStudioTestServer:
    """The ASGI app and the instances it has loaded."""

    def __init__(self, behaviour: Behaviour):
        from .stateful_chat import StatefulChats

        self.behaviour = behaviour
        self.models = {m.key: m for m in behaviour.models}
        self._faults = random.Random(behaviour.error_seed)
        self.instances: dict[str, Instance] = {}
        self.stats = Stats()
        self._load_lock = asyncio.Lock()
        self._jit_lock = asyncio.Lock()  # concurrent first requests load a model once
        # llama-server closes a connection idle for 5 s, httpx keeps one for 5 s: a request sent on
        # one in that instant fails with "Server disconnected without sending a response"
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0),
                                      limits=httpx.Limits(keepalive_expiry=2.0))
        self.chats = StatefulChats(self)
        post = ["POST"]
        self.app = Starlette(routes=[
            Route("/api/v1/models", self.v1_models),
            Route("/api/v1/models/load", self.v1_load, methods=post),
            Route("/api/v1/models/unload", self.v1_unload, methods=post),
            Route("/api/v1/models/download", self.v1_download, methods=post),
            Route("/api/v1/models/download/status/{job_id}", self.v1_download_status),
            Route("/api/v1/chat", self.chats.native, methods=post),
            Route("/api/v0/models", self.v0_models),
            Route("/api/v0/models/{model:path}", self.v0_model),
            Route("/api/v0/chat/completions", self.chat, methods=post),
            Route("/api/v0/completions", self.completions, methods=post),
            Route("/api/v0/embeddings", self.embeddings, methods=post),
            Route("/v1/models", self.openai_models),
            Route("/v1/chat/completions", self.chat, methods=post),
            Route("/v1/completions", self.completions, methods=post),
            Route("/v1/embeddings", self.embeddings, methods=post),
            Route("/v1/responses", self.chats.responses, methods=post),
            Route("/lmstudio-greeting", self.greeting),
            Route("/lmflow/stats", self.stats_get),
            Route("/lmflow/stats/reset", self.stats_reset, methods=["POST"]),
            WebSocketRoute("/llm", self.sdk),
            WebSocketRoute("/system", self.sdk),
            WebSocketRoute("/embedding", self.sdk),
            WebSocketRoute("/files", self.sdk),
            WebSocketRoute("/repository", self.sdk),
        ], lifespan=self._lifespan, exception_handlers={Refusal: refused})
        self.app.add_middleware(_TokenMiddleware, token=behaviour.api_token)
        if behaviour.rest_api == "v0":
            self.app.add_middleware(_WithoutRestV1)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> Any:
        yield
        await self.shutdown()

    async def shutdown(self) -> None:
        for instance in list(self.instances.values()):
            await run_in_threadpool(instance.engine.stop)
        self.instances.clear()
        await self.http.aclose()

    # -- models -----------------------------------------------------------

    def _loaded(self, key: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.model.key == key]

    async def v1_models(self, request: Request) -> Response:
        await self._expire()
        return JSONResponse({"models": [self._v1_entry(m) for m in self.models.values()]})

    def _v1_entry(self, model: TestModel) -> dict[str, Any]:
        """A model as REST v1 lists it (every field its docs list; `num_experts` is for MoE models)."""
        general = gguf_general(model.path)
        quant = quantization(model.path.name)
        return {
            "type": "llm", "publisher": publisher(model.key), "key": model.key, "display_name": model.key,
            "architecture": general.get("general.architecture"),
            "quantization": {"name": quant, "bits_per_weight": bits_per_weight(quant)},
            "size_bytes": model.path.stat().st_size, "params_string": general.get("general.size_label"),
            "loaded_instances": [{"id": i.id, "config": {"context_length": i.context_length,
                                                         "parallel": i.parallel, **i.options}}
                                 for i in self._loaded(model.key)],
            "max_context_length": model.max_context_length, "format": "gguf",
            "capabilities": {"vision": False, "trained_for_tool_use": False}, "description": None,
        }

    def _v0_entry(self, model: TestModel) -> dict[str, Any]:
        loaded = self._loaded(model.key)
        entry: dict[str, Any] = {
            "id": model.key, "object": "model", "type": "llm", "publisher": publisher(model.key),
            "arch": gguf_general(model.path).get("general.architecture"), "compatibility_type": "gguf",
            "quantization": quantization(model.path.name), "state": "loaded" if loaded else "not-loaded",
            "max_context_length": model.max_context_length}
        if loaded:
            entry["loaded_context_length"] = loaded[0].context_length
        return entry

    async def v0_models(self, request: Request) -> Response:
        await self._expire()
        return JSONResponse({"object": "list", "data": [self._v0_entry(m) for m in self.models.values()]})

    async def v0_model(self, request: Request) -> Response:
        await self._expire()
        model = self.models.get(request.path_params["model"])
        if model is None:
            raise Refusal(404, f"Model not found: {request.path_params['model']}", kind="model_not_found",
                          param="model")
        return JSONResponse(self._v0_entry(model))

    async def openai_models(self, request: Request) -> Response:
        keys = list(self.models) if self.behaviour.jit else [i.id for i in self.instances.values()]
        return JSONResponse({"object": "list", "data": [
            {"id": k, "object": "model", "owned_by": "organization_owner"} for k in keys]})

    async def load_instance(self, key: str, context_length: int | None, **how: Any) -> Instance | Response:
        """`load`, with a refusal as the response REST v1 would give (for callers that relay it)."""
        try:
            return await self.load(key, context_length, **how)
        except Refusal as refusal:
            return refusal.response_for("/api/v1/")

    async def load(self, key: str, context_length: int | None, *, identifier: str | None = None,
                   ttl_ms: int | None = None, parallel: int | None = None,
                   options: dict[str, Any] | None = None) -> Instance:
        """A new instance of model `key` (a llama-server started with `options`, REST v1's names)."""
        model = self.models.get(key)
        if model is None:
            raise Refusal(404, f"Model not found: {key}", kind="model_not_found", param="model")
        asked = context_length or min(DEFAULT_CONTEXT, model.max_context_length)
        if asked > model.max_context_length:
            raise Refusal(400, f"context_length {asked} exceeds the model's maximum "
                               f"{model.max_context_length}", param="context_length")
        actual = asked
        limit = model.loadable_context_length
        if limit is not None and asked > limit:
            if not model.clamp:
                raise Refusal(500, f"Failed to load model {key}: not enough memory for a context of "
                                   f"{asked} tokens")
            actual = limit  # silently, as LM Studio's auto-fit does
        asked_options = options or {}
        options = {**DEFAULT_OPTIONS, **asked_options}
        async with self._load_lock:
            count = len(self._loaded(key))
            instance_id = identifier or (key if count == 0 else f"{key}:{count + 1}")
            if identifier and identifier in self.instances:
                raise Refusal(409, f"an instance with identifier {identifier!r} is already loaded")
            while instance_id in self.instances:
                count += 1
                instance_id = f"{key}:{count + 1}"
            parallel = parallel or DEFAULT_PARALLEL
            engine = LlamaServer(llama_server_binary(), model.path, key=key, context_length=actual,
                                 alias=instance_id.replace(":", "-"), parallel=parallel,
                                 extra_args=engine_args(asked_options))
            started = time.monotonic()
            engine.launch()  # in the event loop's thread, which lives as long as the server
            try:
                await run_in_threadpool(engine.wait_ready)
            except LmflowError as exc:
                raise Refusal(500, f"Failed to load model {key}: {exc}") from None
            instance = Instance(instance_id, model, actual, engine, time.monotonic() - started,
                                ttl_seconds=ttl_ms / 1000 if ttl_ms else self.behaviour.ttl_seconds,
                                parallel=parallel, options=options)
            self.instances[instance_id] = instance
            return instance

    async def v1_load(self, request: Request) -> Response:
        body = checked(await json_body(request), LOAD_SCHEMA)
        instance = await self.load(body["model"], body.get("context_length"),
                                   options={k: body[k] for k in DEFAULT_OPTIONS if k in body})
        if self.behaviour.load_answer_delay_seconds:
            await asyncio.sleep(self.behaviour.load_answer_delay_seconds)
        answer: dict[str, Any] = {"type": "llm", "instance_id": instance.id,
                                  "load_time_seconds": round(instance.load_seconds, 3),
                                  "status": "loaded"}
        if body.get("echo_load_config"):  # num_experts is not echoed: it applies to MoE models only
            answer["load_config"] = {"context_length": instance.context_length, **instance.options}
        return JSONResponse(answer)

    async def v1_unload(self, request: Request) -> Response:
        body = checked(await json_body(request), UNLOAD_SCHEMA)
        if not await self.unload(body["instance_id"]):
            raise Refusal(404, f"No loaded model instance with id {body['instance_id']!r}",
                          kind="model_not_found", param="instance_id")
        return JSONResponse({"instance_id": body["instance_id"]})

    async def unload(self, instance_id: str) -> bool:
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            return False
        await run_in_threadpool(instance.engine.stop)
        return True

    async def _expire(self) -> None:
        now = time.monotonic()
        for instance in [i for i in self.instances.values()
                         if i.ttl_seconds is not None and now - i.last_used > i.ttl_seconds]:
            await self.unload(instance.id)

    async def v1_download(self, request: Request) -> Response:
        """A model it serves is already downloaded; it downloads nothing else."""
        key = checked(await json_body(request), DOWNLOAD_SCHEMA)["model"]
        if key in self.models:
            return JSONResponse({"status": "already_downloaded"})
        how = (f"; install it (`{BUNDLED[key].install}`) and list it in the server's config"
               if key in BUNDLED else "")
        raise Refusal(404, f"Cannot download {key!r}: the lmflow test server downloads no models, it "
                           f"serves {', '.join(self.models) or 'none'}{how}",
                      kind="model_not_found", param="model")

    async def v1_download_status(self, request: Request) -> Response:
        raise Refusal(404, f"No download job with id {request.path_params['job_id']!r} (the lmflow test "
                           "server starts no downloads)", kind="job_not_found", param="job_id")

    # -- inference --------------------------------------------------------

    async def admit(self) -> None:
        """What every chat request meets first: idle instances expire, the request is counted, and
        the configured faults strike."""
        await self._expire()
        self.stats.chat_requests += 1
        if self.behaviour.crash_on_request == self.stats.chat_requests:
            os._exit(70)  # a crash in the middle of a request, like a real one
        if self.behaviour.error_rate and self._faults.random() < self.behaviour.error_rate:
            raise Refusal(self.behaviour.error_status, "injected fault (error_rate)")

    async def instance_for(self, asked: Any, context_length: int | None = None
                           ) -> tuple[Instance, float | None]:
        """The instance that answers for `asked` and, when it was loaded just in time for it (at
        `context_length`), the seconds that took."""
        named = isinstance(asked, str) and asked
        instance, load_seconds = self._answering(asked if named else None), None
        if instance is None:
            if not named:
                raise Refusal(400, "'model' is required", code="missing_required_parameter", param="model")
            if not self.behaviour.jit:
                raise Refusal(404, f"Model {asked!r} is not loaded and JIT loading is off",
                              kind="model_not_found", param="model")
            async with self._jit_lock:
                instance = self._answering(asked)
                if instance is None:
                    instance = await self.load(asked, context_length)
                    load_seconds = instance.load_seconds
        instance.last_used = time.monotonic()
        return instance, load_seconds

    async def chat(self, request: Request) -> Response:
        """OpenAI-compatible (and REST v0) chat completions, answered by llama-server."""
        return await self._relay(request, CHAT)

    async def completions(self, request: Request) -> Response:
        """Text completions (no prompt template), answered by llama-server."""
        return await self._relay(request, "/v1/completions")

    async def _relay(self, request: Request, path: str) -> Response:
        await self.admit()
        body = await json_body(request)
        instance, _ = await self.instance_for(body.get("model"))
        self.stats.started(instance.id)
        handed_over = False
        try:
            await self.delay()
            if body.get("stream"):
                chunks = await self.open_stream(instance, body, path)
                handed_over = True
                return StreamingResponse(self.counted(_as_sse(chunks), instance.id),
                                         media_type="text/event-stream")
            status, payload = await self.complete(instance, body, path)
            if status == 200 and request.url.path.startswith("/api/v0/"):
                payload.update(v0_details(instance, payload))
            return JSONResponse(payload, status_code=status)
        finally:
            if not handed_over:
                self.stats.finished(instance.id)

    async def embeddings(self, request: Request) -> Response:
        """Refused as LM Studio refuses them without an embedding model: the test server has none."""
        asked = checked(await json_body(request), EMBEDDINGS_SCHEMA)["model"]
        if asked in self.models or asked in self.instances:
            raise Refusal(400, f"{asked!r} is an LLM, not an embedding model (the lmflow test server has "
                               "no embedding model)", code="model_not_embedding", param="model")
        raise Refusal(404, f"Embedding model {asked!r} not found (the lmflow test server has no embedding "
                           "model)", kind="model_not_found", param="model")

    def _answering(self, asked: Any) -> Instance | None:
        """The instance that answers a request for `asked` (an instance id or a model key)."""
        if self.behaviour.ignore_model_field and self.instances:
            return next(iter(self.instances.values()))
        return self.instances.get(asked) or next(iter(self._loaded(asked)), None)

    async def delay(self) -> None:
        """The configured slowness of every answer (concurrent requests wait together)."""
        if self.behaviour.delay_seconds:
            await asyncio.sleep(self.behaviour.delay_seconds)

    async def counted(self, events: Any, instance_id: str) -> Any:
        """`events`, the request counted in flight until the last one is sent."""
        try:
            async for event in events:
                yield event
        finally:
            self.stats.finished(instance_id)

    def _degraded(self, instance: Instance, path: str) -> bool:
        model = instance.model
        return path == CHAT and (model.working_context_length is not None or model.answers == "retriever")

    async def open_stream(self, instance: Instance, body: dict[str, Any], path: str = CHAT
                          ) -> AsyncIterator[dict[str, Any]]:
        """A streamed answer's chunks (model relabelled with the instance id); raises UpstreamError
        before the first one when llama-server refuses."""
        if self._degraded(instance, path):
            status, payload, body = await self._degrade(instance, {**body, "stream": False})
            if payload is not None:
                if status != 200:
                    raise UpstreamError(status, payload)
                return _as_chunks(payload)
            body = {**body, "stream": True}
        upstream = await self.http.send(self.http.build_request(
            "POST", f"{instance.engine.url}{path}", json=body), stream=True)
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            raise UpstreamError(upstream.status_code, upstream.json())
        return self._chunks(upstream, instance)

    async def _chunks(self, upstream: httpx.Response, instance: Instance) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in upstream.aiter_lines():
                field_name, _, data = line.partition(":")
                data = data.strip()
                if field_name == "error" and data:  # llama-server's way to fail a started stream
                    yield {"error": json.loads(data)}
                elif field_name == "data" and data and data != "[DONE]":
                    yield {**json.loads(data), "model": instance.id}
        finally:
            await upstream.aclose()

    async def complete(self, instance: Instance, body: dict[str, Any], path: str = CHAT
                       ) -> tuple[int, dict[str, Any]]:
        """An answer by the instance's llama-server (labelled with the instance id)."""
        instance.last_used = time.monotonic()
        if self._degraded(instance, path):
            status, payload, body = await self._degrade(instance, body)
            if payload is not None:
                return status, payload
        try:
            upstream = await self.http.post(f"{instance.engine.url}{path}", json=body)
        except httpx.HTTPError as exc:
            return 500, {"error": {"message": f"model crashed: {exc}"}}
        payload = upstream.json()
        if upstream.status_code == 200:
            payload["model"] = instance.id
        return upstream.status_code, payload

    async def _degrade(self, instance: Instance, body: dict[str, Any]
                       ) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
        """Apply the model's working limit (drop the oldest tokens) and the retriever mode."""
        model = instance.model
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        url = instance.engine.url
        tokens = (await self.http.post(f"{url}/tokenize", json={"content": text})).json()["tokens"]
        if len(tokens) > instance.context_length:
            return 400, {"error": {"message": (
                f"Trying to keep the first {len(tokens)} tokens when context the overflows. However, "
                f"the model is loaded with context length of only {instance.context_length} tokens")}}, body
        kept = text
        limit = model.working_context_length
        if limit is not None and len(tokens) > limit:
            kept = (await self.http.post(f"{url}/detokenize",
                                         json={"tokens": tokens[len(tokens) - limit:]})).json()["content"]
            body = {**body, "messages": [{"role": "user", "content": kept}]}
        if model.answers != "retriever":
            return 200, None, body
        found = re.search(r"pass key is (\d+)", kept)
        answer = found.group(1) if found else "I cannot find a pass key."
        return 200, {
            "id": "retriever", "object": "chat.completion", "model": instance.id,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 3,
                      "total_tokens": len(tokens) + 3},
        }, body

    async def greeting(self, request: Request) -> Response:
        return JSONResponse({"lmstudio": True})

    async def stats_get(self, request: Request) -> Response:
        return JSONResponse(self.stats.as_json())

    async def stats_reset(self, request: Request) -> Response:
        self.stats.reset()
        return JSONResponse(self.stats.as_json())

    async def sdk(self, websocket: WebSocket) -> None:
        from .sdk_ws import SdkSession

        await SdkSession(self, websocket).run()


async def _as_chunks(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A finished chat answer as the chunks of a streamed one."""
    text = payload["choices"][0]["message"]["content"]
    yield {"model": payload["model"], "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    yield {"model": payload["model"], "usage": payload.get("usage"), "choices": [
        {"index": 0, "delta": {}, "finish_reason": payload["choices"][0].get("finish_reason")}]}


async def _as_sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """OpenAI's server-sent events: one `data:` line per chunk, then `[DONE]`."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


NO_TOKEN = ("An LM Studio API token is required to make requests to this server, but none was provided "
            "using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer "
            "$LM_API_TOKEN'). Learn more at: https://lmstudio.ai/docs/developer/core/authentication.")
WRONG_TOKEN = ("The LM Studio API token provided in the Authorization header is not valid for this server. "
               "Learn more at: https://lmstudio.ai/docs/developer/core/authentication.")


class _TokenMiddleware:
    """`Authorization: Bearer TOKEN` on every request when a token is configured."""

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.token and scope["type"] == "http":  # the SDK sends its token in its auth message
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode()
            if given != f"Bearer {self.token}":
                response = JSONResponse({"error": {  # LM Studio's own answer (its server log shows it)
                    "type": "invalid_request", "code": "invalid_api_key",
                    "message": NO_TOKEN if not given.startswith("Bearer ") else WRONG_TOKEN}},
                    status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _WithoutRestV1:
    """LM Studio before 0.4: REST v1 does not exist (it answers as for any unknown path)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            response = JSONResponse({"error": f"Unexpected endpoint or method. ({scope['method']} "
                                              f"{scope['path']})"}, status_code=404)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def serve(behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0,
          on_ready: Any = None) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM; `on_ready(url)` once it listens."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = LMStudioTestServer(behaviour)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started:
            if task.done():
                return
            await asyncio.sleep(0.02)
        if on_ready:
            on_ready(url)
        await task

    asyncio.run(main())
