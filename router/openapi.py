"""The OpenAPI 3 document of the router's HTTP API, served at ``GET /openapi.json``.

Hand-written to match router/openai_protocol.py (what it accepts) and
router/openai_http.py (what it answers); tests/fuzz runs schemathesis against it.
Request schemas list the fields the server reads, with their documented ranges;
any other field is allowed (OpenAI clients send many) and ignored.
"""

from __future__ import annotations

from typing import Any

from pdserve.sampling_params import INT32_MAX, MAX_STOP_CHARS, MAX_STOP_STRINGS
from router.openai_protocol import MAX_N, MAX_PROMPTS, MAX_TOP_LOGPROBS

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True},
                       "code": {"type": "string", "nullable": True}}}},
}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_STOP = {"oneOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
    {"type": "array", "maxItems": MAX_STOP_STRINGS,
     "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}]}
_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "nullable": True, "minimum": 1, "maximum": INT32_MAX},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": INT32_MAX},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "stop": _STOP,
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object",
                       "properties": {"include_usage": {"type": "boolean"}}},
    "presence_penalty": {"type": "number", "enum": [0]},
    "frequency_penalty": {"type": "number", "enum": [0]},
}
_COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"],
    "properties": {
        **_SAMPLING,
        "prompt": {"oneOf": [
            {"type": "string"}, _TOKEN_IDS,
            {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
             "items": {"oneOf": [{"type": "string"}, _TOKEN_IDS]}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
        "echo": {"type": "boolean", "enum": [False]},
    },
}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
        "content": {"oneOf": [
            {"type": "string", "nullable": True},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"type": "string", "enum": ["text"]},
                               "text": {"type": "string"}}}}]},
    },
}
_CHAT_REQUEST = {
    "type": "object", "required": ["messages"],
    "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": {"type": "integer", "nullable": True, "minimum": 1,
                                  "maximum": INT32_MAX},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    },
}
_ANSWER = {"type": "object", "required": ["id", "object", "choices"],
           "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                          "choices": {"type": "array"}, "usage": {"type": "object"}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    what = {400: "Bad request (the envelope's param names the field)",
            401: "Missing or wrong API key", 404: "Unknown model",
            413: "Request body too large", 503: "No decode worker can take it now",
            504: "Deadline exceeded"}
    return {str(s): _json(_ERROR, what[s]) for s in statuses}


def _generation(summary: str, request: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {"description": "The answer (JSON), or server-sent events when stream",
                    "content": {"application/json": {"schema": _ANSWER},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 404, 413, 503, 504)}}}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "pdserve OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": _generation("Text completion", _COMPLETION_REQUEST),
            "/v1/chat/completions": _generation("Chat completion", _CHAT_REQUEST),
            "/v1/models": {"get": {"summary": "The served model", "responses": {
                "200": _json({"type": "object", "required": ["object", "data"],
                              "properties": {"object": {"type": "string"},
                                             "data": {"type": "array"}}}, "The model list"),
                **_errors(401)}}},
            "/health": {"get": {"summary": "Liveness and readiness", "responses": {
                "200": _json({"type": "object"}, "Serving"),
                "503": _json({"type": "object"}, "No decode worker reachable, or draining")}}},
        },
    }
