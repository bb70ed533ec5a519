"""`cherrytop serve`: an OpenAI-compatible chat API, a web chat page and feedback capture, in one
FastAPI app over one dynamic-batching engine.

Routes:
  POST /v1/chat/completions   OpenAI chat completions (plain and streamed as server-sent events)
  GET  /v1/models             the one served model
  POST /v1/feedback           thumbs up / down / report on an answer -> the feedback app's database
  GET  /                      the web chat page (multi-turn, streaming, feedback on every answer)
  GET  /health                queue, batch and moderation counters
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cherrytop.config import Config, ServeConfig
from cherrytop.data.tokenizer import encode_prompt
from cherrytop.feedback.store import MODERATION
from cherrytop.serve import protocol as P
from cherrytop.serve.engine import Delta, Done, Engine, Finish, Job, Params, QueueFull
from cherrytop.serve.moderation import Moderator

log = logging.getLogger("cherrytop.serve")


class _Stream(StreamingResponse):
    """A streamed answer that cancels its job however the response ends (client gone included)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class FeedbackSink:
    """The feedback app's store (cherrytop.feedback.store), opened on first use."""

    def __init__(self, url: str | None):
        self.url = url
        self._store = None
        self._lock = threading.Lock()

    def add(self, **kwargs) -> int:
        with self._lock:
            if self._store is None:
                if not self.url:
                    raise P.APIError(503, "Feedback is not enabled on this server.", type="server_error")
                try:
                    from cherrytop.feedback.store import open_store
                    self._store = open_store(self.url)
                except (ImportError, ValueError) as e:  # no driver, server down, not a database URL, ...
                    raise P.APIError(503, f"The feedback store is not available: {e}", type="server_error") from None
        try:
            return self._store.add_chat_feedback(**kwargs)
        except ValueError as e:  # the store's checks: the conversation must end with a user message, no NUL, ...
            text = str(e).lstrip("'")
            param = next((k for k in ("messages", "response", "rating", "model", "settings", "conversation_id",
                                      "comment", "user") if text.startswith(k)), None)
            raise P.APIError(400, f"Invalid feedback: {e}", param=param) from None


def api_keys(cfg: ServeConfig) -> set[str]:
    keys = set(cfg.api_keys)
    keys |= {k.strip() for k in os.environ.get("CHERRYTOP_API_KEYS", "").split(",") if k.strip()}
    return keys


def create_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, model_name: str,
               cfg: ServeConfig = ServeConfig(), moderator: Moderator | None = None,
               feedback_url: str | None = None, checkpoint: str | None = None) -> FastAPI:
    """The app; the engine thread starts and stops with it (FastAPI lifespan).

    `checkpoint`: the served model's folder, recorded as the `model` of each chat rating (as `cherrytop
    label generate` and `cherrytop eval --pairs` record theirs), so ratings of two runs' `ppo` stay apart.
    """
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    moderator = moderator or Moderator(None)
    feedback = FeedbackSink(feedback_url)
    keys = api_keys(cfg)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="cherrytop", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.moderator, app.state.model_name = engine, moderator, model_name

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        return P.validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return P.APIError(exc.status_code, msg, code="unknown_url" if exc.status_code == 404 else None).response()

    def auth(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise P.APIError(401, "You didn't provide an API key. Provide it in an Authorization header "
                                  "(Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        key = header[7:].strip()
        if key not in keys:
            shown = key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 7 else "****"
            raise P.APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "cherrytop"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(auth)])
    async def get_model(name: str):
        if name != model_name:
            raise P.APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.load(), "moderation_blocks": moderator.blocks}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("cherrytop.serve").joinpath("chat.html").read_text()

    @app.post("/v1/feedback", dependencies=[Depends(auth)])
    async def add_feedback(body: P.FeedbackRequest):
        model = body.model or model_name
        if model == model_name and checkpoint:  # the served model: name it by its folder, as generate does
            model = checkpoint
        policy = moderator.current()
        if moderator.path is not None and body.response == policy.safe_message:
            model = MODERATION  # a blocked answer: the rated text is the policy's, not the model's
        fid = await run_in_threadpool(
            feedback.add, messages=[m.as_dict() for m in body.messages], response=body.response, rating=body.rating,
            model=model, settings=body.settings, conversation_id=body.conversation_id,
            comment=body.comment, user=body.user)
        return {"id": fid, "object": "feedback"}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: P.ChatRequest, request: Request):
        if body.model != model_name:
            raise P.APIError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                             param="model", code="model_not_found")
        n = body.n or 1
        max_n = min(cfg.max_n, cfg.max_batch)  # a request's choices are generated together, in one batch
        if n > max_n:
            raise P.APIError(400, f"Invalid value for 'n': at most {max_n} choices per request, got {n}.",
                             param="n", code="invalid_value")
        for param in ("logprobs", "top_logprobs"):
            if getattr(body, param):
                raise P.APIError(400, f"Unsupported parameter: '{param}' is not supported by this server.",
                                 param=param, code="unsupported_parameter")
        messages = [m.as_dict() for m in body.messages]
        cid = P.completion_id()
        policy = moderator.current()
        try:
            prompt_ids = encode_prompt(tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - the chat template rejected the conversation
            raise P.APIError(400, f"The messages do not fit the model's chat template: {e}", param="messages") from None
        if len(prompt_ids) >= engine.context:
            raise P.APIError(400, f"This model's maximum context length is {engine.context} tokens. However, your "
                                  f"messages resulted in {len(prompt_ids)} tokens. Please reduce the length of the "
                                  "messages.", param="messages", code="context_length_exceeded")
        for m in messages:  # input moderation: everything the client wrote
            hit = policy.match(m["content"], "input") if m["role"] != "assistant" else None
            if hit:
                moderator.record("input", hit, m["content"], request_id=cid, model=model_name, user=body.user)
                return blocked(cid, n, policy.safe_message, len(prompt_ids), body)
        limit = engine.context - len(prompt_ids)
        params = Params(max_tokens=min(body.max_completion_tokens or body.max_tokens or cfg.max_tokens, limit),
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, n=n, stop=tuple(body.stop or ()),
                        seed=body.seed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        checks_output = policy.classifier is not None or any("output" in c.check for c in policy.categories)
        job = Job(prompt_ids, params, sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                  moderate=(lambda text, final: moderator.check_output(policy, messages, text, final))
                  if checks_output else None, withhold=policy.unsettled if checks_output else None)
        try:
            engine.submit(job)
        except QueueFull:
            raise P.APIError(429, f"The server is at capacity ({cfg.max_batch} running + {cfg.max_queue} waiting "
                                  f"requests); retry after {cfg.retry_after} s.", type="rate_limit_error",
                             code="rate_limit_exceeded", headers={"Retry-After": str(cfg.retry_after)}) from None

        def blocked_output(ev: Finish, text: str) -> None:
            moderator.record("output", ev.category, text, request_id=cid, model=model_name, user=body.user)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _Stream(stream(cid, n, queue, policy.safe_message, blocked_output, include_usage),
                           on_close=lambda: engine.cancel(job))
        contents, reasons = [""] * n, ["stop"] * n
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(ev, Delta):
                contents[ev.index] += ev.text
            elif isinstance(ev, Finish):
                reasons[ev.index] = ev.reason
                if ev.reason == "content_filter":
                    blocked_output(ev, contents[ev.index])
                    contents[ev.index] = policy.safe_message
            elif isinstance(ev, Done):
                if ev.error:
                    raise P.APIError(500, ev.error, type="server_error")
                return P.completion(cid, model_name, contents, reasons, P.usage(ev.prompt_tokens, ev.completion_tokens))

    async def stream(cid, n, queue, safe_message, blocked_output, include_usage):
        created = P.now()
        texts = [""] * n
        for i in range(n):
            yield P.chunk(cid, model_name, created, i, {"role": "assistant", "content": ""})
        while True:
            ev = await queue.get()
            if isinstance(ev, Delta):
                texts[ev.index] += ev.text
                yield P.chunk(cid, model_name, created, ev.index, {"content": ev.text})
            elif isinstance(ev, Finish):
                if ev.reason == "content_filter":
                    blocked_output(ev, texts[ev.index])
                    yield P.chunk(cid, model_name, created, ev.index, {"content": safe_message})
                yield P.chunk(cid, model_name, created, ev.index, {}, ev.reason)
            elif isinstance(ev, Done):
                if ev.error:
                    yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                elif include_usage:
                    yield P.chunk(cid, model_name, created, None, use=P.usage(ev.prompt_tokens, ev.completion_tokens))
                break
        yield P.DONE

    def blocked(cid: str, n: int, safe_message: str, prompt_tokens: int, body: P.ChatRequest):
        """The answer to a blocked input: the safe message, finish_reason content_filter, no generation."""
        if not body.stream:
            return P.completion(cid, model_name, [safe_message] * n, ["content_filter"] * n, P.usage(prompt_tokens, 0))

        async def events():
            created = P.now()
            for i in range(n):
                yield P.chunk(cid, model_name, created, i, {"role": "assistant", "content": ""})
                yield P.chunk(cid, model_name, created, i, {"content": safe_message})
                yield P.chunk(cid, model_name, created, i, {}, "content_filter")
            if body.stream_options and body.stream_options.include_usage:
                yield P.chunk(cid, model_name, created, None, use=P.usage(prompt_tokens, 0))
            yield P.DONE
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def build(checkpoint: str, cfg: Config, feedback_db: str | None = None) -> FastAPI:
    """The app for a checkpoint (a folder or a stage name of the run) and the `serve` settings."""
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.load import load_model, resolve_checkpoint
    ckpt = resolve_checkpoint(checkpoint, cfg)
    s = cfg.serve
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    moderator = Moderator(s.policy or None, s.moderation_log or run_dir / "serve" / "moderation.jsonl")
    from cherrytop.feedback.commands import default_db
    url = feedback_db or default_db(cfg)
    return create_app(load_model(ckpt), load_tokenizer(ckpt), model_name=s.model_name or ckpt.name, cfg=s,
                      moderator=moderator, feedback_url=url, checkpoint=str(ckpt))


def run(checkpoint: str, cfg: Config, feedback_db: str | None = None) -> None:
    """`cherrytop serve`: build the app and serve it with uvicorn until interrupted."""
    import socket

    import uvicorn
    s = cfg.serve
    sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before the model loads: a port in use is one line, not "serving ..." and then uvicorn's error
        sock.bind((s.host, s.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {s.host}:{s.port}: {e.strerror}; choose another --serve.port") from None
    app = build(checkpoint, cfg, feedback_db)
    auth = "Bearer keys required" if api_keys(s) else "no API keys"
    print(f"serving '{app.state.model_name}' on http://{s.host}:{s.port}/ (chat page) and /v1 (OpenAI API); {auth}; "
          f"batch {s.max_batch}, queue {s.max_queue}")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
