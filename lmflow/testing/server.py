"""An LM Studio-compatible server for tests and CI, with real inference.

It speaks what LM Studio 0.4 documents (its REST pages, read for the shapes):

- REST v1: `GET /api/v1/models`, `POST /api/v1/models/load|unload|download`,
  `GET /api/v1/models/download/status/{job_id}`, `POST /api/v1/chat` (native, stateful:
  stateful_chat.py);
- REST v0: `GET /api/v0/models[/{model}]`, `POST /api/v0/chat/completions|completions|embeddings`;
- OpenAI-compatible: `GET /v1/models`, `POST /v1/chat/completions|completions|embeddings|responses`;
- the SDK's websocket protocol (sdk_ws.py).

Every load starts a llama-server child at the context length the load ends up with, so answers
are real. A model of its config with `type: embedding` is an embedding model (any GGUF file can be
one: pool.py says how), which answers embeddings and nothing else; an LLM answers everything but
embeddings. It downloads nothing: a download of a model it serves is "already downloaded", anything
else is refused naming the model. Errors take the shape of
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

This module is the app and its REST router. It wires together the modules that do the work, each
used by the others only through its public methods: pool.py (the models and the instances loaded
from them: load, unload, TTL, JIT), inference.py (a chat's admission and its answer by an instance's
llama-server; the stats), stateful_chat.py and sdk_ws.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ..backends.catalog import BUNDLED
from .config import CONFIG_SCHEMA as CONFIG_SCHEMA  # re-exported: the module users know
from .config import Behaviour, TestModel
from .config import installed_models as installed_models
from .config import load_behaviour as load_behaviour
from .config import quantization as quantization
from .inference import CHAT, Inference
from .pool import DEFAULT_OPTIONS, Instance, InstancePool, gguf_general
from .refusals import Refusal, checked, json_body, refused
from .sdk_files import UserFiles
from .sdk_repository import Repository
from .sdk_ws import LMSTUDIO_ENDPOINTS, SdkSession
from .stateful_chat import StatefulChats

_COUNT = {"type": "integer", "minimum": 1}

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
    """The ASGI app: the REST routes and the SDK's websockets, over one instance pool."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.pool = InstancePool(behaviour)
        self.inference = Inference(behaviour, self.pool)
        self.chats = StatefulChats(self.pool, self.inference)
        self.files = UserFiles()
        self.repository = Repository(self.pool.models)
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
            *(WebSocketRoute(f"/{namespace}", self.sdk) for namespace in LMSTUDIO_ENDPOINTS),
        ], lifespan=self._lifespan, exception_handlers={Refusal: refused})
        self.app.add_middleware(_TokenMiddleware, token=behaviour.api_token)
        if behaviour.rest_api == "v0":
            self.app.add_middleware(_WithoutRestV1)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> Any:
        yield
        await self.shutdown()

    async def shutdown(self) -> None:
        await self.pool.shutdown()
        await self.inference.close()
        self.files.close()

    # -- models -----------------------------------------------------------

    async def v1_models(self, request: Request) -> Response:
        await self.pool.expire()
        return JSONResponse({"models": [self._v1_entry(m) for m in self.pool.models.values()]})

    def _v1_entry(self, model: TestModel) -> dict[str, Any]:
        """A model as REST v1 lists it (every field its docs list; `num_experts` is for MoE models)."""
        general = gguf_general(model.path)
        quant = quantization(model.path.name)
        entry = {
            "type": model.type, "publisher": publisher(model.key), "key": model.key,
            "display_name": model.key,
            "architecture": general.get("general.architecture"),
            "quantization": {"name": quant, "bits_per_weight": bits_per_weight(quant)},
            "size_bytes": model.path.stat().st_size, "params_string": general.get("general.size_label"),
            "loaded_instances": [{"id": i.id, "config": {"context_length": i.context_length,
                                                         "parallel": i.parallel, **i.options}}
                                 for i in self.pool.loaded(model.key)],
            "max_context_length": model.max_context_length, "format": "gguf", "description": None,
        }
        if model.type == "llm":  # (inferred: LM Studio's docs show capabilities for LLMs only)
            entry["capabilities"] = {"vision": False, "trained_for_tool_use": False}
        return entry

    def _v0_entry(self, model: TestModel) -> dict[str, Any]:
        loaded = self.pool.loaded(model.key)
        entry: dict[str, Any] = {
            "id": model.key, "object": "model", "type": "embeddings" if model.type == "embedding" else "llm",
            "publisher": publisher(model.key),
            "arch": gguf_general(model.path).get("general.architecture"), "compatibility_type": "gguf",
            "quantization": quantization(model.path.name), "state": "loaded" if loaded else "not-loaded",
            "max_context_length": model.max_context_length}
        if loaded:
            entry["loaded_context_length"] = loaded[0].context_length
        return entry

    async def v0_models(self, request: Request) -> Response:
        await self.pool.expire()
        return JSONResponse({"object": "list",
                             "data": [self._v0_entry(m) for m in self.pool.models.values()]})

    async def v0_model(self, request: Request) -> Response:
        await self.pool.expire()
        model = self.pool.models.get(request.path_params["model"])
        if model is None:
            raise Refusal(404, f"Model not found: {request.path_params['model']}", kind="model_not_found",
                          param="model")
        return JSONResponse(self._v0_entry(model))

    async def openai_models(self, request: Request) -> Response:
        keys = list(self.pool.models) if self.behaviour.jit else [i.id for i in self.pool.instances.values()]
        return JSONResponse({"object": "list", "data": [
            {"id": k, "object": "model", "owned_by": "organization_owner"} for k in keys]})

    async def v1_load(self, request: Request) -> Response:
        body = checked(await json_body(request), LOAD_SCHEMA)
        instance = await self.pool.load(body["model"], body.get("context_length"),
                                        options={k: body[k] for k in DEFAULT_OPTIONS if k in body})
        if self.behaviour.load_answer_delay_seconds:
            await asyncio.sleep(self.behaviour.load_answer_delay_seconds)
        answer: dict[str, Any] = {"type": instance.model.type, "instance_id": instance.id,
                                  "load_time_seconds": round(instance.load_seconds, 3),
                                  "status": "loaded"}
        if body.get("echo_load_config"):  # num_experts is not echoed: it applies to MoE models only
            answer["load_config"] = {"context_length": instance.context_length, **instance.options}
        return JSONResponse(answer)

    async def v1_unload(self, request: Request) -> Response:
        body = checked(await json_body(request), UNLOAD_SCHEMA)
        if not await self.pool.unload(body["instance_id"]):
            raise Refusal(404, f"No loaded model instance with id {body['instance_id']!r}",
                          kind="model_not_found", param="instance_id")
        return JSONResponse({"instance_id": body["instance_id"]})

    async def v1_download(self, request: Request) -> Response:
        """A model it serves is already downloaded; it downloads nothing else."""
        key = checked(await json_body(request), DOWNLOAD_SCHEMA)["model"]
        if key in self.pool.models:
            return JSONResponse({"status": "already_downloaded"})
        how = (f"; install it (`{BUNDLED[key].install}`) and list it in the server's config"
               if key in BUNDLED else "")
        raise Refusal(404, f"Cannot download {key!r}: the lmflow test server downloads no models, it "
                           f"serves {', '.join(self.pool.models) or 'none'}{how}",
                      kind="model_not_found", param="model")

    async def v1_download_status(self, request: Request) -> Response:
        raise Refusal(404, f"No download job with id {request.path_params['job_id']!r} (the lmflow test "
                           "server starts no downloads)", kind="job_not_found", param="job_id")

    # -- inference --------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        """OpenAI-compatible (and REST v0) chat completions, answered by llama-server."""
        return await self._relay(request, CHAT)

    async def completions(self, request: Request) -> Response:
        """Text completions (no prompt template), answered by llama-server."""
        return await self._relay(request, "/v1/completions")

    async def _relay(self, request: Request, path: str) -> Response:
        inference = self.inference
        await inference.admit()
        body = await json_body(request)
        instance, _ = await self.pool.instance_for(body.get("model"))
        inference.stats.started(instance.id)
        handed_over = False
        try:
            await inference.delay()
            if body.get("stream"):
                chunks = await inference.open_stream(instance, body, path)
                handed_over = True
                return StreamingResponse(inference.counted(_as_sse(chunks), instance.id),
                                         media_type="text/event-stream")
            status, payload = await inference.complete(instance, body, path)
            if status == 200 and request.url.path.startswith("/api/v0/"):
                payload.update(v0_details(instance, payload))
            return JSONResponse(payload, status_code=status)
        finally:
            if not handed_over:
                inference.stats.finished(instance.id)

    async def embeddings(self, request: Request) -> Response:
        """Embeddings (OpenAI's shape, REST v0 alike) by an embedding model's llama-server, loaded just
        in time if need be; an LLM is refused."""
        body = checked(await json_body(request), EMBEDDINGS_SCHEMA)
        await self.pool.expire()
        instance, _ = await self.pool.instance_for(body["model"], model_type="embedding")
        status, payload = await self.inference.complete(instance, {"input": body["input"]}, "/v1/embeddings")
        return JSONResponse(payload, status_code=status)

    async def greeting(self, request: Request) -> Response:
        return JSONResponse({"lmstudio": True})

    async def stats_get(self, request: Request) -> Response:
        return JSONResponse(self.inference.stats.as_json())

    async def stats_reset(self, request: Request) -> Response:
        self.inference.stats.reset()
        return JSONResponse(self.inference.stats.as_json())

    async def sdk(self, websocket: WebSocket) -> None:
        await SdkSession(websocket, self.pool, self.inference, files=self.files, repository=self.repository,
                         api_token=self.behaviour.api_token).run()


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


#: the ports where the `lmstudio` SDK (1.5) looks for LM Studio when its `Client()` is given no host,
#: in its order (lmstudio-js's `apiServerPorts`; LM Studio listens on one of them)
SDK_PROBE_PORTS = (41343, 52993, 16141, 39414, 22931)


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.bind((host, port))
    return sock


def probe_port_socket(host: str) -> socket.socket | None:
    """A socket on the first free port of SDK_PROBE_PORTS (None if all are taken)."""
    for port in SDK_PROBE_PORTS:
        try:
            return _listening(host, port)
        except OSError:
            continue
    return None


def serve(behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0, on_ready: Any = None,
          discoverable: bool = False) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM; `on_ready(url, sdk_url)` once it
    listens. `discoverable`: it listens also on the first free port where the `lmstudio` SDK looks
    (`sdk_url`; None if all five are taken), so that `lmstudio.Client()` without a host finds it."""
    import uvicorn

    sockets = [_listening(host, port)]
    url = f"http://{host}:{sockets[0].getsockname()[1]}"
    sdk_url = None
    if discoverable and (probe := probe_port_socket(host)) is not None:
        sockets.append(probe)
        sdk_url = f"http://{host}:{probe.getsockname()[1]}"
    server = LMStudioTestServer(behaviour)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(uv.serve(sockets=sockets))
        while not uv.started:
            if task.done():
                return
            await asyncio.sleep(0.02)
        if on_ready:
            on_ready(url, sdk_url)
        await task

    asyncio.run(main())
