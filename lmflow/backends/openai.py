"""Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, Ollama, LM Studio's /v1)."""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from ..errors import (
    BackendError,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    ConnectionRefused,
    ContextOverflow,
    MalformedAnswer,
    ModelNotFound,
)
from ..spec.model import ModelConfig, ServerConfig
from .base import REMOTE_SERVER_OPTIONS, Backend, ChatRequest, ChatResponse, ModelInfo, checked
from .supervisor import Supervisor

# "maximum context length is 4096 tokens. However, your messages resulted in 5000 tokens"
#: httpx clients (connection pools) an OpenAI-compatible server's requests are spread over
_POOLS = 8
_CTX_OPENAI = re.compile(r"maximum context length is (\d+).*?(?:resulted in|requested) (\d+)", re.S)
# LM Studio: "...the model is loaded with context length of only 4096 tokens"
_CTX_LMSTUDIO = re.compile(r"context length of only (\d+)", re.S)


def base_url(url: str) -> str:
    """Accept `http://host:port`, `.../` and `.../v1` alike."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class OpenAIClient:
    """The OpenAI-compatible HTTP protocol, with errors classified into lmflow's."""

    def __init__(self, url: str, *, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None, start_hint: str | None = None):
        self.url = base_url(url)
        self.start_hint = start_hint or "start the server or fix server.url"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # plain-http servers need no CA bundle (loading it costs ~50 ms per client)
        # lmflow bounds the requests in flight itself (a server's `parallel`, a map's window):
        # connections are kept for as many, not closed and reopened beyond httpx's default of 20
        # kept (at 256 in flight that churn made a request fail with EBADF once in 4,000)
        def client() -> httpx.Client:
            return httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                timeout=httpx.Timeout(30.0, connect=5.0),
                                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                verify=self.url.startswith("https://"))

        # httpx's pool does its bookkeeping (a poll of each idle connection) under one lock: at
        # dozens of requests in flight from threads, threads queue on it (64 in flight reached
        # 62% of a plain client's rate). Threads are spread over a few clients, each its own pool.
        # (A given transport is a test's seam: one client, so that it sees every request.)
        self._clients = [client() for _ in range(1 if transport is not None else _POOLS)]
        self._turn = itertools.count()
        self._local = threading.local()

    @property
    def http(self) -> httpx.Client:
        """This thread's client (threads take the clients in turn)."""
        try:
            return self._local.client
        except AttributeError:
            self._local.client = self._clients[next(self._turn) % len(self._clients)]
            return self._local.client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    @contextmanager
    def _transport_errors(self, path: str, timeout: float) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise BackendTimeout(
                f"no answer from {self.url}{path} within {timeout:g}s: raise the step's timeout "
                "or use a smaller max_tokens", url=self.url) from None
        except httpx.ConnectError as exc:
            raise ConnectionRefused(
                f"cannot reach {self.url} ({type(exc).__name__}: {exc}): {self.start_hint}",
                url=self.url) from None
        except httpx.TransportError as exc:
            raise BackendUnreachable(
                f"cannot reach {self.url} ({type(exc).__name__}: {exc}): {self.start_hint}",
                url=self.url) from None

    def request(self, method: str, path: str, *, timeout: float = 30.0,
                json_body: Any = None) -> httpx.Response:
        with self._transport_errors(path, timeout):
            response = self.http.request(
                method, path, json=json_body,
                timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)),
            )
        if response.status_code >= 400:
            raise self._http_error(path, response)
        return response

    def request_json(self, method: str, path: str, *, timeout: float = 30.0,
                     json_body: Any = None) -> dict[str, Any]:
        """`request`, with the answer's JSON object (MalformedAnswer when it is not one)."""
        return self.decode(path, self.request(method, path, timeout=timeout, json_body=json_body))

    def decode(self, path: str, response: httpx.Response) -> dict[str, Any]:
        try:
            payload = response.json()
        except ValueError:
            raise MalformedAnswer(
                f"{self.url}{path} answered HTTP {response.status_code} with a body that is not JSON "
                f"({response.text[:120]!r}): is server.url a model server?", url=self.url) from None
        if not isinstance(payload, dict):
            raise MalformedAnswer(f"{self.url}{path} answered {json.dumps(payload)[:120]}, not a JSON "
                                  "object", url=self.url)
        return payload

    def _chat_stream(self, body: dict[str, Any], timeout: float) -> ChatResponse:
        path = "/v1/chat/completions"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish = model = None
        with self._transport_errors(path, timeout), self.http.stream(
            "POST", path, json=body, timeout=httpx.Timeout(timeout, connect=min(5.0, timeout))
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise self._http_error(path, response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError("not an object")
                except ValueError:
                    raise MalformedAnswer(f"{self.url}{path} streamed a chunk that is not a JSON object: "
                                          f"{data[:120]!r}", url=self.url) from None
                model = chunk.get("model") or model
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        first = first if first is not None else time.perf_counter() - started
                        parts.append(delta)
                    finish = choice.get("finish_reason") or finish
        return ChatResponse(
            text="".join(parts), model=model, finish_reason=finish,
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
            seconds=time.perf_counter() - started, first_token_seconds=first)

    def _http_error(self, path: str, response: httpx.Response) -> BackendError:
        status = response.status_code
        text = response.text[:2000]
        try:
            error = response.json().get("error", {})
        except (ValueError, AttributeError):
            error = {}
        if isinstance(error, str):
            error = {"message": error}
        message = str(error.get("message") or text or response.reason_phrase)
        if error.get("type") == "exceed_context_size_error" or error.get("code") == (
            "context_length_exceeded"
        ) or _CTX_OPENAI.search(message) or _CTX_LMSTUDIO.search(message):
            n_prompt, n_ctx = error.get("n_prompt_tokens"), error.get("n_ctx")
            if n_ctx is None and (m := _CTX_OPENAI.search(message)):
                n_ctx, n_prompt = int(m.group(1)), int(m.group(2))
            elif n_ctx is None and (m := _CTX_LMSTUDIO.search(message)):
                n_ctx = int(m.group(1))
            sent = f"{n_prompt} tokens" if n_prompt else "the prompt"
            holds = f"holds {n_ctx}" if n_ctx else "holds less"
            return ContextOverflow(
                f"context overflow at {self.url}: {sent} sent, the loaded context {holds}: "
                "shorten the prompt or load the model with a larger context_length",
                url=self.url, n_prompt=n_prompt, n_ctx=n_ctx)
        if status == 404 and "model" in message.lower():
            return ModelNotFound(
                f"{self.url} does not know the model: {message} (list models with "
                "`lmflow models --server URL`, fix models.<alias>.key)",
                url=self.url, status=status, body=text)
        if status == 401 or status == 403:
            return BackendHTTPError(
                f"{self.url}{path} refused the request (HTTP {status}): {message}; "
                "set the API token (server.api_key_env)", url=self.url, status=status, body=text)
        if status == 503:  # llama-server says "Loading model" while it loads; other servers other things
            loading = "loading" in message.lower()
            return BackendHTTPError(
                f"{self.url} is not ready (HTTP 503: {message})"
                + ("; it is still loading the model: wait, or raise the step's retries" if loading
                   else "; the server is overloaded or going down: check its log"),
                url=self.url, status=status, body=text)
        return BackendHTTPError(f"{self.url}{path} answered HTTP {status}: {message}",
                                url=self.url, status=status, body=text)

    def health(self) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                response = self.http.get(path, timeout=httpx.Timeout(2.0, connect=1.0))
            except httpx.HTTPError:
                return False
            if response.status_code == 200:
                return True
            if response.status_code != 404:
                return False
        return False

    def build_info(self) -> str | None:
        """llama-server's build (`/props`); None from servers that do not say."""
        try:
            response = self.http.get("/props", timeout=httpx.Timeout(5.0, connect=2.0))
            return str(response.json().get("build_info")) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def list_models(self) -> list[ModelInfo]:
        return checked(self.url, lambda: self._list_models())

    def _list_models(self) -> list[ModelInfo]:
        data = self.request_json("GET", "/v1/models").get("data", [])
        models = []
        for item in data:
            meta = item.get("meta") or {}
            status = (item.get("status") or {}).get("value")
            models.append(ModelInfo(
                key=item.get("id", "?"),
                loaded=None if status is None else status == "loaded",
                max_context_length=meta.get("n_ctx_train"),
            ))
        return models

    def chat(self, request: ChatRequest) -> ChatResponse:
        body: dict[str, Any] = {"model": request.model.key, "messages": request.messages,
                                "stream": False}
        body.update({k: v for k, v in request.sampling.items() if v is not None})
        if request.response_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "strict": True,
                                "schema": request.response_schema},
            }
        if request.stream:
            return self._chat_stream(body, request.timeout)
        started = time.perf_counter()
        payload = self.request_json("POST", "/v1/chat/completions", timeout=request.timeout,
                                    json_body=body)
        seconds = time.perf_counter() - started
        try:
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise MalformedAnswer(
                f"{self.url} answered without a message: {json.dumps(payload)[:300]}",
                url=self.url) from None
        usage = payload.get("usage") or {}
        return ChatResponse(
            text=text, model=payload.get("model"), finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
            seconds=seconds, raw=payload,
        )


class OpenAIBackend(Backend):
    """A server someone else runs, spoken to over the OpenAI-compatible API."""

    kind = "openai"
    summary = "any OpenAI-compatible server (llama-server, vLLM, Ollama...) at its url"
    server_options = REMOTE_SERVER_OPTIONS

    def __init__(self, config: ServerConfig, *, transport: httpx.BaseTransport | None = None):
        super().__init__(config)
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        hint = (f"start it with `{config.start}`" if config.start
                else "start the server or fix server.url")
        self.client = OpenAIClient(config.url or "", api_key=api_key, transport=transport,
                                   start_hint=hint)
        self.supervisor = Supervisor(config, self.health)

    def ensure(self) -> dict[str, Any]:
        return self.supervisor.ensure()

    def set_listener(self, listener: Any) -> None:
        self.supervisor.listener = listener

    def health(self) -> bool:
        return self.client.health()

    def list_models(self) -> list[ModelInfo]:
        return self.client.list_models()

    def fingerprint(self, model: ModelConfig) -> dict[str, Any]:
        return {"version": self.client.build_info()}

    def chat(self, request: ChatRequest) -> ChatResponse:
        with self.slots.hold(request.model):
            return self.supervisor.call(lambda: self.client.chat(request))

    def close(self) -> None:
        self.client.close()
        self.supervisor.close()
