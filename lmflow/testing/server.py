"""An LM Studio-compatible server for tests and CI, with real inference.

It speaks LM Studio's REST API v1 (`/api/v1/models`, `/models/load`,
`/models/unload`), REST v0 (`/api/v0/models`) and the OpenAI-compatible
endpoints (`/v1/models`, `/v1/chat/completions`). Every load starts a
llama-server child at the context length the load ends up with, so answers
are real. It can behave like a troublesome LM Studio: a declared maximum
context larger than what loads, silent clamping, JIT loading, slow answers,
ignoring the request's model field, crashing mid-request, requiring a token.

Each instance's llama-server has as many slots as the instance's parallel
predictions: what an SDK load asks for (`maxParallelPredictions`), else 4, LM
Studio 0.4's default (REST and JIT loads), reported as
`loaded_instances[].config.parallel`. For tests of lmflow's concurrency:

- `GET /lmflow/stats` -> `{"chat_requests", "in_flight", "max_in_flight",
  "max_in_flight_by_instance": {id: N}, "sdk_clients"}`: chat requests received
  (OpenAI-compatible and SDK predictions), those being answered now and the most
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

from ..backends.catalog import BUNDLED, llama_server_binary, locate
from ..backends.local import LlamaServer
from ..errors import LmflowError, SpecError
from ..home import subdir
from ..spec.loader import load_yaml

DEFAULT_CONTEXT = 4096
DEFAULT_PARALLEL = 4  # LM Studio 0.4's "Max Concurrent Predictions"


@dataclass
class TestModel:
    """A model the server offers, with the limits it pretends to have."""

    key: str
    path: Path
    max_context_length: int = 8192  # what GET /models declares
    loadable_context_length: int | None = None  # larger loads fail, or clamp (below)
    clamp: bool = False  # True: load silently at loadable_context_length instead of failing
    #: beyond this many prompt tokens the model silently loses the start of its prompt
    working_context_length: int | None = None
    #: "model": llama-server answers; "retriever": answers "pass key" questions from the
    #: text it kept, perfectly (a stand-in for a model that can retrieve, which the
    #: bundled 135M model cannot), so probes have a known ground truth
    answers: str = "model"


@dataclass
class Behaviour:
    models: list[TestModel]
    jit: bool = True
    api_token: str | None = None
    delay_seconds: float = 0.0  # before every chat answer
    #: a REST load is answered this long after its instance is listed (a client killed in
    #: between was killed mid-load: the instance is there, the client never heard of it)
    load_answer_delay_seconds: float = 0.0
    #: "v0": an LM Studio before 0.4, with no REST v1 (every /api/v1/ path answers 404)
    rest_api: str = "v1"
    ignore_model_field: bool = False  # answer with the loaded model, whatever was asked
    crash_on_request: int | None = None  # exit the process during the Nth chat request
    ttl_seconds: float | None = None  # unload instances idle for that long
    #: answer this share of chat requests with `error_status` instead (seeded: the same requests
    #: fail in every run), e.g. 0.3 for a server that fails 30% of the time
    error_rate: float = 0.0
    error_status: int = 503
    error_seed: int = 0


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


def installed_models() -> list[TestModel]:
    """The bundled models that are installed here (what `lmflow testing serve` offers by default)."""
    models = []
    for key in BUNDLED:
        try:
            models.append(TestModel(key=key, path=locate(key, subdir("models"))))
        except LmflowError:
            continue
    return models


_COUNT = {"type": "integer", "minimum": 1}
_SECONDS = {"type": "number", "minimum": 0}
#: the config file `lmflow testing serve --config` reads (README: "Testing your specs without LM Studio")
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "models": {"type": "array", "items": {
            "type": "object", "required": ["key"], "additionalProperties": False,
            "properties": {
                "key": {"type": "string", "minLength": 1}, "file": {"type": "string"},
                "path": {"type": "string"}, "max_context_length": _COUNT,
                "loadable_context_length": {"anyOf": [_COUNT, {"type": "null"}]},
                "clamp": {"type": "boolean"},
                "working_context_length": {"anyOf": [_COUNT, {"type": "null"}]},
                "answers": {"enum": ["model", "retriever"]}}}},
        "jit": {"type": "boolean"},
        "api_token": {"type": ["string", "null"]},
        "delay_seconds": _SECONDS,
        "load_answer_delay_seconds": _SECONDS,
        "ignore_model_field": {"type": "boolean"},
        "crash_on_request": {"anyOf": [_COUNT, {"type": "null"}]},
        "ttl_seconds": {"anyOf": [_SECONDS, {"type": "null"}]},
        "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "error_status": {"type": "integer", "minimum": 400, "maximum": 599},
        "error_seed": {"type": "integer"},
        "rest_api": {"enum": ["v0", "v1"]},
    },
}


def load_behaviour(path: str | Path | None) -> Behaviour:
    """Read a config file (YAML, checked against CONFIG_SCHEMA); with no file, serve the installed
    bundled models."""
    from jsonschema import Draft202012Validator

    if path is None:
        return Behaviour(models=installed_models())
    doc = load_yaml(path)
    data = doc.data if doc.data is not None else {}
    problems = [doc.problem(tuple(error.absolute_path), error.message)
                for error in Draft202012Validator(CONFIG_SCHEMA).iter_errors(data)]
    if problems:
        raise SpecError(problems)
    models = []
    for i, item in enumerate(data.get("models") or []):
        model_path = item.get("path")
        bundled = item.get("file", item["key"])
        if model_path:
            resolved = Path(doc.file).parent / model_path
        elif bundled in BUNDLED:
            resolved = locate(bundled, subdir("models"))
        else:
            raise SpecError([doc.problem(("models", i, "key"), f"'{bundled}' is not a bundled model",
                                         f"add file: one of {', '.join(BUNDLED)}, or path: model.gguf")])
        models.append(TestModel(
            key=item["key"], path=resolved,
            max_context_length=int(item.get("max_context_length", 8192)),
            loadable_context_length=item.get("loadable_context_length"),
            clamp=bool(item.get("clamp", False)),
            working_context_length=item.get("working_context_length"),
            answers=item.get("answers", "model")))
    return Behaviour(models=models, **{k: v for k, v in data.items() if k != "models"})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def quantization(file_name: str) -> str | None:
    """The quantization a GGUF file name states (`...-Q4_1.gguf`), as LM Studio lists it."""
    found = re.search(r"(I?Q\d\w*?|BF16|F16|F32)(?:\.gguf)?$", Path(file_name).stem, re.IGNORECASE)
    return found.group(1).upper() if found else None


class LMStudioTestServer:
    """The ASGI app and the instances it has loaded."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.models = {m.key: m for m in behaviour.models}
        self._faults = random.Random(behaviour.error_seed)
        self.instances: dict[str, Instance] = {}
        self.stats = Stats()
        self._load_lock = asyncio.Lock()
        self._jit_lock = asyncio.Lock()  # concurrent first requests load a model once
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
        self.app = Starlette(routes=[
            Route("/api/v1/models", self.v1_models),
            Route("/api/v1/models/load", self.v1_load, methods=["POST"]),
            Route("/api/v1/models/unload", self.v1_unload, methods=["POST"]),
            Route("/api/v0/models", self.v0_models),
            Route("/v1/models", self.openai_models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/lmstudio-greeting", self.greeting),
            Route("/lmflow/stats", self.stats_get),
            Route("/lmflow/stats/reset", self.stats_reset, methods=["POST"]),
            WebSocketRoute("/llm", self.sdk),
            WebSocketRoute("/system", self.sdk),
            WebSocketRoute("/embedding", self.sdk),
            WebSocketRoute("/files", self.sdk),
            WebSocketRoute("/repository", self.sdk),
        ], lifespan=self._lifespan)
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
        return JSONResponse({"models": [{
            "type": "llm", "key": m.key, "display_name": m.key, "format": "gguf",
            "max_context_length": m.max_context_length, "size_bytes": m.path.stat().st_size,
            "quantization": {"name": quantization(m.path.name)},
            "loaded_instances": [{"id": i.id, "config": {"context_length": i.context_length,
                                                         "parallel": i.parallel}}
                                 for i in self._loaded(m.key)],
        } for m in self.models.values()]})

    async def v0_models(self, request: Request) -> Response:
        await self._expire()
        data = []
        for m in self.models.values():
            loaded = self._loaded(m.key)
            entry = {"id": m.key, "object": "model", "type": "llm",
                     "state": "loaded" if loaded else "not-loaded",
                     "max_context_length": m.max_context_length}
            if loaded:
                entry["loaded_context_length"] = loaded[0].context_length
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def openai_models(self, request: Request) -> Response:
        keys = list(self.models) if self.behaviour.jit else [i.id for i in self.instances.values()]
        return JSONResponse({"object": "list", "data": [
            {"id": k, "object": "model", "owned_by": "organization_owner"} for k in keys]})

    async def load_instance(self, key: str, context_length: int | None, *,
                            identifier: str | None = None, ttl_ms: int | None = None,
                            parallel: int | None = None) -> Instance | Response:
        model = self.models.get(key)
        if model is None:
            return _error(404, f"Model not found: {key}")
        asked = context_length or min(DEFAULT_CONTEXT, model.max_context_length)
        if asked > model.max_context_length:
            return _error(400, f"context_length {asked} exceeds the model's maximum "
                               f"{model.max_context_length}")
        actual = asked
        limit = model.loadable_context_length
        if limit is not None and asked > limit:
            if not model.clamp:
                return _error(500, f"Failed to load model {key}: not enough memory for a context of "
                                   f"{asked} tokens")
            actual = limit  # silently, as LM Studio's auto-fit does
        async with self._load_lock:
            count = len(self._loaded(key))
            instance_id = identifier or (key if count == 0 else f"{key}:{count + 1}")
            if identifier and identifier in self.instances:
                return _error(409, f"an instance with identifier {identifier!r} is already loaded")
            while instance_id in self.instances:
                count += 1
                instance_id = f"{key}:{count + 1}"
            parallel = parallel or DEFAULT_PARALLEL
            engine = LlamaServer(llama_server_binary(), model.path, key=key, context_length=actual,
                                 alias=instance_id.replace(":", "-"), parallel=parallel)
            started = time.monotonic()
            engine.launch()  # in the event loop's thread, which lives as long as the server
            try:
                await run_in_threadpool(engine.wait_ready)
            except LmflowError as exc:
                return _error(500, f"Failed to load model {key}: {exc}")
            instance = Instance(instance_id, model, actual, engine, time.monotonic() - started,
                                ttl_seconds=ttl_ms / 1000 if ttl_ms else self.behaviour.ttl_seconds,
                                parallel=parallel)
            self.instances[instance_id] = instance
            return instance

    async def v1_load(self, request: Request) -> Response:
        body = await request.json()
        if not isinstance(body.get("model"), str):
            return _error(400, "'model' is required")
        result = await self.load_instance(body["model"], body.get("context_length"))
        if isinstance(result, Response):
            return result
        if self.behaviour.load_answer_delay_seconds:
            await asyncio.sleep(self.behaviour.load_answer_delay_seconds)
        answer: dict[str, Any] = {"type": "llm", "instance_id": result.id,
                                  "load_time_seconds": round(result.load_seconds, 3),
                                  "status": "loaded"}
        if body.get("echo_load_config"):
            answer["load_config"] = {"context_length": result.context_length}
        return JSONResponse(answer)

    async def v1_unload(self, request: Request) -> Response:
        body = await request.json()
        if not await self.unload(body.get("instance_id", "")):
            return _error(404, f"No loaded model instance with id {body.get('instance_id')!r}")
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

    # -- inference --------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        await self._expire()
        self.stats.chat_requests += 1
        if self.behaviour.crash_on_request == self.stats.chat_requests:
            os._exit(70)  # a crash in the middle of a request, like a real one
        if self.behaviour.error_rate and self._faults.random() < self.behaviour.error_rate:
            return _error(self.behaviour.error_status, "injected fault (error_rate)")
        body = await request.json()
        asked = body.get("model")
        instance = self._answering(asked)
        if instance is None:
            if not self.behaviour.jit:
                return _error(404, f"Model {asked!r} is not loaded and JIT loading is off")
            async with self._jit_lock:
                instance = self._answering(asked)
                if instance is None:
                    result = await self.load_instance(asked, None)
                    if isinstance(result, Response):
                        return result
                    instance = result
        instance.last_used = time.monotonic()
        self.stats.started(instance.id)
        handed_over = False
        try:
            if self.behaviour.delay_seconds:
                await asyncio.sleep(self.behaviour.delay_seconds)  # concurrent requests wait together
            if body.get("stream"):
                response = await self._stream(instance, body)
                if isinstance(response, StreamingResponse):  # in flight until its last event
                    response.body_iterator = self._counted(response.body_iterator, instance.id)
                    handed_over = True
                return response
            status, payload = await self.complete(instance, body)
            return JSONResponse(payload, status_code=status)
        finally:
            if not handed_over:
                self.stats.finished(instance.id)

    def _answering(self, asked: Any) -> Instance | None:
        """The instance that answers a request for `asked` (an instance id or a model key)."""
        if self.behaviour.ignore_model_field and self.instances:
            return next(iter(self.instances.values()))
        return self.instances.get(asked) or next(iter(self._loaded(asked)), None)

    async def _counted(self, events: Any, instance_id: str) -> Any:
        try:
            async for event in events:
                yield event
        finally:
            self.stats.finished(instance_id)

    async def _stream(self, instance: Instance, body: dict[str, Any]) -> Response:
        """A streamed answer (server-sent events): relayed from llama-server, model relabelled."""
        model = instance.model
        if model.working_context_length is not None or model.answers == "retriever":
            status, payload, body = await self._degrade(instance, {**body, "stream": False})
            if payload is not None:
                if status != 200:
                    return JSONResponse(payload, status_code=status)
                return StreamingResponse(_as_events(payload), media_type="text/event-stream")
            body = {**body, "stream": True}
        upstream = await self.http.send(self.http.build_request(
            "POST", f"{instance.engine.url}/v1/chat/completions", json=body), stream=True)
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            return JSONResponse(upstream.json(), status_code=upstream.status_code)

        async def relay() -> Any:
            try:
                async for line in upstream.aiter_lines():
                    data = line[len("data:"):].strip() if line.startswith("data:") else ""
                    if data and data != "[DONE]":
                        line = "data: " + json.dumps({**json.loads(data), "model": instance.id})
                    yield line + "\n"
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    async def complete(self, instance: Instance, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A chat completion by the instance's llama-server (answer labelled with the instance id)."""
        instance.last_used = time.monotonic()
        model = instance.model
        if model.working_context_length is not None or model.answers == "retriever":
            status, payload, body = await self._degrade(instance, body)
            if payload is not None:
                return status, payload
        try:
            upstream = await self.http.post(f"{instance.engine.url}/v1/chat/completions", json=body)
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


async def _as_events(payload: dict[str, Any]) -> Any:
    """A finished answer as the server-sent events of a streamed one."""
    text = payload["choices"][0]["message"]["content"]
    first = {"model": payload["model"], "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    last = {"model": payload["model"], "usage": payload.get("usage"), "choices": [
        {"index": 0, "delta": {}, "finish_reason": payload["choices"][0].get("finish_reason")}]}
    for event in (first, last):
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


class _TokenMiddleware:
    """`Authorization: Bearer TOKEN` on every request when a token is configured."""

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.token and scope["type"] == "http":  # the SDK sends its token in its auth message
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"").decode() != f"Bearer {self.token}":
                response = _error(401, "Invalid or missing API token (Authorization: Bearer ...)")
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
