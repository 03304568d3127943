"""Enough of LM Studio's SDK websocket protocol for the real `lmstudio` client.

The client connects to `ws://HOST/llm`, authenticates, then makes RPC calls
(`{"type": "rpcCall", "endpoint", "callId", "parameter"}` answered by
`rpcResult`/`rpcError`) and opens channels (`channelCreate` with an endpoint
and a `creationParameter`, answered by `channelSend` messages and a
`channelClose`). Served here: listLoaded, getModelInfo, getLoadConfig,
unloadModel (RPC) and loadModel, predict (channels), with real inference; on
`ws://HOST/system`, version. A load's config may set the context length and the
parallel predictions (`maxParallelPredictions` in the SDKs, PARALLEL_KEY on the
wire); getLoadConfig reports both. Every client that authenticates is counted
by its `clientIdentifier` (one per SDK client, shared by its namespaces).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

if TYPE_CHECKING:
    from .server import Instance, LMStudioTestServer

CONTEXT_KEY = "llm.load.contextLength"
PARALLEL_KEY = "llm.load.numParallelSessions"
TEST_SERVER_VERSION = "0.4.0-lmflow-test"


def instance_info(instance: Instance) -> dict[str, Any]:
    model = instance.model
    return {
        "type": "llm", "modelKey": model.key, "format": "gguf", "displayName": model.key,
        "path": str(model.path), "sizeBytes": model.path.stat().st_size,
        "identifier": instance.id, "instanceReference": instance.id, "vision": False,
        "trainedForToolUse": False, "maxContextLength": model.max_context_length,
        "contextLength": instance.context_length,
    }


def _load_config(instance: Instance) -> dict[str, Any]:
    return {"fields": [{"key": CONTEXT_KEY, "value": instance.context_length},
                       {"key": PARALLEL_KEY, "value": instance.parallel}]}


class RpcError(Exception):
    def __init__(self, title: str):
        super().__init__(title)
        self.title = title


class SdkSession:
    """One websocket client of the test server."""

    def __init__(self, server: LMStudioTestServer, ws: WebSocket):
        self.server = server
        self.ws = ws

    async def run(self) -> None:
        await self.ws.accept()
        try:
            auth = await self.ws.receive_json()
            token = self.server.behaviour.api_token
            if token and auth.get("clientPasskey") != token and auth.get("apiToken") != token:
                await self.ws.send_json({"success": False, "error": {"title": "Invalid API token"}})
                await self.ws.close()
                return
            await self.ws.send_json({"success": True})
            self.server.stats.sdk_clients.add(str(auth.get("clientIdentifier") or id(self)))
            while True:
                message = await self.ws.receive_json()
                if message.get("type") == "rpcCall":
                    await self._rpc(message)
                elif message.get("type") == "channelCreate":
                    await self._channel(message)
        except WebSocketDisconnect:
            return

    def _find(self, specifier: dict[str, Any] | None) -> Instance:
        instances = self.server.instances
        specifier = specifier or {}
        if specifier.get("type") == "instanceReference":
            found = instances.get(specifier.get("instanceReference", ""))
        else:
            query = specifier.get("query") or {}
            wanted = query.get("identifier") or query.get("modelKey")
            found = instances.get(wanted) if wanted else next(iter(instances.values()), None)
            if found is None and wanted:
                found = next((i for i in instances.values() if i.model.key == wanted), None)
        if found is None:
            raise RpcError(f"No loaded model matches {specifier}")
        return found

    async def _rpc(self, message: dict[str, Any]) -> None:
        endpoint, call_id = message.get("endpoint"), message.get("callId")
        parameter = message.get("parameter") or {}
        try:
            if endpoint == "listLoaded":
                result: Any = [instance_info(i) for i in self.server.instances.values()]
            elif endpoint == "getModelInfo":
                result = instance_info(self._find(parameter.get("specifier")))
            elif endpoint == "getLoadConfig":
                result = _load_config(self._find(parameter.get("specifier")))
            elif endpoint == "version":  # the system namespace
                result = {"version": TEST_SERVER_VERSION, "build": 1}
            elif endpoint == "unloadModel":
                instance = self.server.instances.get(parameter.get("identifier", ""))
                if instance is None:
                    raise RpcError(f"No loaded model with identifier {parameter.get('identifier')!r}")
                await self.server.unload(instance.id)
                result = None
            else:
                raise RpcError(f"Unsupported RPC endpoint {endpoint!r} (lmflow test server)")
        except RpcError as exc:
            await self.ws.send_json({"type": "rpcError", "callId": call_id,
                                     "error": {"title": exc.title}})
            return
        reply: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            reply["result"] = result
        await self.ws.send_json(reply)

    async def _send(self, channel_id: int, message: dict[str, Any]) -> None:
        await self.ws.send_json({"type": "channelSend", "channelId": channel_id, "message": message})

    async def _fail(self, channel_id: int, title: str) -> None:
        await self.ws.send_json({"type": "channelError", "channelId": channel_id,
                                 "error": {"title": title}})

    async def _channel(self, message: dict[str, Any]) -> None:
        endpoint, channel_id = message.get("endpoint"), message.get("channelId")
        parameter = message.get("creationParameter") or {}
        if endpoint == "loadModel":
            await self._load(channel_id, parameter)
        elif endpoint == "predict":
            await self._predict(channel_id, parameter)
        else:
            await self._fail(channel_id, f"Unsupported channel endpoint {endpoint!r} (lmflow test server)")

    async def _load(self, channel_id: int, parameter: dict[str, Any]) -> None:
        from starlette.responses import Response

        context_length = parallel = None
        for layer in (parameter.get("loadConfigStack") or {}).get("layers", []):
            for kv in (layer.get("config") or {}).get("fields", []):
                if kv.get("key") == CONTEXT_KEY:
                    context_length = kv.get("value")
                elif kv.get("key") == PARALLEL_KEY:
                    parallel = kv.get("value")
        await self._send(channel_id, {"type": "resolved", "info": {"modelKey": parameter.get("modelKey")}})
        await self._send(channel_id, {"type": "startLoading"})
        result = await self.server.load_instance(parameter.get("modelKey", ""), context_length,
                                                 identifier=parameter.get("identifier"),
                                                 ttl_ms=parameter.get("ttlMs"), parallel=parallel)
        if isinstance(result, Response):
            import json

            error = json.loads(bytes(result.body)).get("error", {}).get("message", "load failed")
            await self._fail(channel_id, error)
            return
        await self._send(channel_id, {"type": "progress", "progress": 1.0})
        await self._send(channel_id, {"type": "success", "info": instance_info(result)})
        await self.ws.send_json({"type": "channelClose", "channelId": channel_id})

    async def _predict(self, channel_id: int, parameter: dict[str, Any]) -> None:
        try:
            instance = self._find(parameter.get("modelSpecifier"))
        except RpcError as exc:
            await self._fail(channel_id, exc.title)
            return
        messages = []
        for item in (parameter.get("history") or {}).get("messages", []):
            parts = item.get("content") or []
            text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
            messages.append({"role": item.get("role", "user"), "content": text})
        body: dict[str, Any] = {"messages": messages, "stream": False}
        for layer in (parameter.get("predictionConfigStack") or {}).get("layers", []):
            for kv in (layer.get("config") or {}).get("fields", []):
                if kv.get("key") == "llm.prediction.maxPredictedTokens":
                    value = kv.get("value") or {}
                    if value.get("checked"):
                        body["max_tokens"] = value.get("value")
                elif kv.get("key") == "llm.prediction.temperature":
                    body["temperature"] = kv.get("value")
        started = time.monotonic()
        self.server.stats.chat_requests += 1
        with self.server.stats.answering(instance.id):
            status, payload = await self.server.complete(instance, body)
        if status != 200:
            await self._fail(channel_id, str((payload.get("error") or {}).get("message", payload)))
            return
        text = payload["choices"][0]["message"].get("content") or ""
        usage = payload.get("usage") or {}
        await self._send(channel_id, {"type": "fragment", "fragment": {
            "content": text, "tokensCount": usage.get("completion_tokens", 0),
            "containsDrafted": False, "reasoningType": "none"}})
        seconds = time.monotonic() - started
        finish = payload["choices"][0].get("finish_reason")
        await self._send(channel_id, {
            "type": "success",
            "stats": {"stopReason": "maxPredictedTokensReached" if finish == "length" else "eosFound",
                      "promptTokensCount": usage.get("prompt_tokens"),
                      "predictedTokensCount": usage.get("completion_tokens"),
                      "totalTokensCount": usage.get("total_tokens"),
                      "timeToFirstTokenSec": seconds},
            "modelInfo": {k: v for k, v in instance_info(instance).items()
                          if k not in ("identifier", "instanceReference", "contextLength")},
            "loadModelConfig": _load_config(instance),
            "predictionConfig": {"fields": []},
        })
        await self.ws.send_json({"type": "channelClose", "channelId": channel_id})
