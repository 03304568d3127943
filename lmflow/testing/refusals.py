"""The test server's refusals, answered in the shape of the API that was called.

LM Studio has two error vocabularies (read from its docs and from its servers' answers):

- REST v1 (`/api/v1/...`): `{"error": {"type", "message", "code"?, "param"?}}` with `type` one of
  `invalid_request`, `model_not_found`, `job_not_found`, `not_implemented`, `internal_error`,
  `unknown` (its streaming-events page lists them; a missing token is `invalid_request` with code
  `invalid_api_key`);
- OpenAI-compatible and REST v0 (`/v1/...`, `/api/v0/...`): OpenAI's `{"error": {"message", "type":
  "invalid_request_error", "param", "code"}}`, e.g. code `model_not_found`, param `model`.

A handler raises `Refusal(status, message, kind=..., code=..., param=...)`; the app's exception
handler renders it for the path that was asked. Request bodies are checked against a JSON Schema
with `checked()`, which refuses the first problem naming its parameter.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

#: LM Studio REST v1's error types (`error.type`)
KINDS = ("invalid_request", "model_not_found", "job_not_found", "not_implemented", "internal_error",
         "unknown")


class Refusal(Exception):
    """A request the server answers with an error (rendered by `response_for`)."""

    def __init__(self, status: int, message: str, *, kind: str | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ("internal_error" if status >= 500 else "invalid_request")
        assert self.kind in KINDS, self.kind
        self.code = code
        self.param = param

    def body(self, path: str) -> dict[str, Any]:
        if path.startswith("/api/v1/"):
            error = {"type": self.kind, "message": self.message}
            error.update({k: v for k, v in (("code", self.code), ("param", self.param)) if v})
            return {"error": error}
        code = self.code or (self.kind if self.kind == "model_not_found" else None)
        return {"error": {"message": self.message,
                          "type": "server_error" if self.status >= 500 else "invalid_request_error",
                          "param": self.param, "code": code}}

    def response_for(self, path: str) -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status)


async def refused(request: Request, exc: Exception) -> JSONResponse:
    """The app's handler for Refusal."""
    assert isinstance(exc, Refusal)
    return exc.response_for(request.url.path)


class UpstreamError(Refusal):
    """llama-server refused: relayed as it is by the OpenAI-compatible routes (lmflow and other
    clients read llama-server's own fields, such as `n_prompt_tokens` of a context overflow)."""

    def __init__(self, status: int, payload: Any):
        error = payload.get("error") if isinstance(payload, dict) else None
        message = error.get("message", error) if isinstance(error, dict) else error or payload
        super().__init__(status, str(message))
        self.payload = payload

    def body(self, path: str) -> dict[str, Any]:
        return super().body(path) if path.startswith("/api/v1/") else self.payload


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 as LM Studio answers a body it cannot parse."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise Refusal(400, f"Received request with invalid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Refusal(400, "The request body must be a JSON object", code="invalid_type")
    return body


_CODES = {"required": "missing_required_parameter", "type": "invalid_type",
          "additionalProperties": "unrecognized_keys", "enum": "invalid_value"}


def checked(body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """`body` if it fits `schema`; else a 400 naming the first parameter that does not."""
    from jsonschema import Draft202012Validator

    problems = Draft202012Validator(schema).iter_errors(body)
    for error in sorted(problems, key=lambda e: (len(e.path), [str(p) for p in e.path])):
        path = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            missing = next(name for name in error.validator_value if name not in error.instance)
            name, message = (f"{path}.{missing}" if path else missing), f"'{missing}' is required"
            if path:
                message = f"{path}: {message}"
        elif error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            name = extra[0]
            message = f"Unrecognized key(s) in object: {', '.join(repr(k) for k in extra)}"
        else:
            name, message = path, f"{path or 'body'}: {error.message}"
        raise Refusal(400, message, code=_CODES.get(str(error.validator), "invalid_value"), param=name)
    return body
