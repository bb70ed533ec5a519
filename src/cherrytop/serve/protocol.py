"""The OpenAI chat-completions wire format: request validation, responses, stream chunks, errors.

Follows https://platform.openai.com/docs/api-reference/chat so the official `openai` client works
unmodified. Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's statuses:
400 invalid request (bad parameters too, where FastAPI would say 422), 401 bad key, 404 unknown
model (or an unknown answer to rate), 413 a request body over the limit, 429 over capacity or too
many ratings (with Retry-After), 500 generation failure.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cherrytop.feedback.store import ChatFeedback


class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


UNION_BRANCHES = {"str", "list[str]", "list[TextPart]"}
"""Names pydantic puts in an error's location for the branch of a union (`stop: str | list[str]`)."""


def _path(loc) -> list[str]:
    return [str(x) for x in loc if x != "body" and x not in UNION_BRANCHES]


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad parameter."""
    errors = exc.errors()
    err = errors[0]
    if UNION_BRANCHES & set(map(str, err["loc"])):  # all of a union's branches failed: the furthest says most
        where = _path(err["loc"])
        err = max((e for e in errors if _path(e["loc"])[:len(where)] == where), key=lambda e: len(e["loc"]))
    loc = _path(err["loc"])
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if err.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request; expected a JSON object.")
    if param is None:  # no body, or one that is not a JSON object (or not sent as application/json)
        return APIError(400, "The request body must be a JSON object, sent with Content-Type: application/json.")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions; parameters OpenAI has and cherrytop does not use are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=ChatFeedback.MAX_ID)
    logprobs: bool | None = None
    """Refused when true: the answers carry no log-probabilities (a client asking for them would get none)."""
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("expected up to 4 non-empty stop strings of at most 256 characters")
        return stops


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: one rating of one answer this server served, named by its completion id
    and choice index; what was asked and answered comes from the server's record, so a request
    naming the text itself (messages, response, model, settings, user) is refused."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^chatcmpl-[0-9a-f]{24}$")
    """The `id` of the chat completion (every chunk of a streamed one carries it)."""
    index: int = Field(0, ge=0, le=127)
    """The choice's index."""
    rating: Literal["up", "down", "report"]
    conversation_id: str | None = Field(None, max_length=ChatFeedback.MAX_ID)
    comment: str | None = Field(None, max_length=ChatFeedback.MAX_COMMENT)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, contents: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": now(), "model": model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c, "refusal": None},
                         "logprobs": None, "finish_reason": r} for i, (c, r) in enumerate(zip(contents, reasons))],
            "usage": use}


def chunk(cid: str, model: str, created: int, index: int | None, delta: dict | None = None,
          finish_reason: str | None = None, use: dict | None = None) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": []}
    if index is not None:
        body["choices"] = [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
