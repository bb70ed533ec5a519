"""`cherrytop serve`: an OpenAI-compatible chat API, a web chat page and feedback capture, in one
FastAPI app over one dynamic-batching engine.

Routes:
  POST /v1/chat/completions   OpenAI chat completions (plain and streamed as server-sent events)
  GET  /v1/models             the one served model
  POST /v1/feedback           thumbs up / down / report on an answer this server served, named by its
                              completion id and choice index -> the feedback app's database
  GET  /                      the web chat page (multi-turn, streaming, feedback on every answer)
  GET  /static/chat.js, .css  its script and style (the Content-Security-Policy allows no inline script)
  GET  /health                queue, batch and moderation counters

Limits: a request body over serve.max_body_bytes is a 413 before it is read; a prompt with more
characters than could fit in the context window is a 400 before it is tokenized; tokenizing and
moderating a prompt run in a worker thread, never on the event loop; one client (its API key, else
its address) holds at most serve.client_share of the slots and sends at most serve.feedback_per_minute
ratings (429 with Retry-After beyond either).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cherrytop.config import Config, ServeConfig
from cherrytop.data.tokenizer import encode_prompt
from cherrytop.feedback.store import MODERATION
from cherrytop.serve import protocol as P
from cherrytop.serve.engine import Delta, Done, Engine, Finish, Job, Params, QueueFull
from cherrytop.serve.feedback import FeedbackSink, RateLimit, Served, ServedAnswers
from cherrytop.serve.moderation import Moderator, Policy

log = logging.getLogger("cherrytop.serve")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
"""No inline script, no inline event handler, no inline style; only this server's own files."""
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]


def limit_body(app, limit: int):
    """ASGI middleware: a body over `limit` bytes is a 413, at once when its Content-Length says so
    (nothing of it is read), else as soon as the bytes read pass the limit; a body within it is read
    here (at most `limit` bytes held) and handed on. Every answer gets SECURITY_HEADERS."""
    async def too_large(scope, receive, send, size: str):
        await P.APIError(413, f"The request body is {size} bytes; this server accepts at most {limit} bytes.",
                         code="request_too_large").response()(scope, receive, send)

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send_secured, length.decode("latin-1")[:20])
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_large(scope, receive, send_secured, f"more than {limit}")
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():  # the body once, then the connection's own messages (http.disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send_secured)
    return middleware


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


def api_keys(cfg: ServeConfig) -> set[str]:
    keys = set(cfg.api_keys)
    keys |= {k.strip() for k in os.environ.get("CHERRYTOP_API_KEYS", "").split(",") if k.strip()}
    return keys


def exposure_warning(host: str, keys: set[str]) -> str | None:
    """The start-up warning for a server that anyone on the network can use: it listens beyond the
    loopback interface and takes no API key."""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local or keys:
        return None
    return (f"warning: listening on {host} with no API keys: anyone who can reach this port can use the model "
            "and send ratings into the feedback database; set --serve.api_keys or $CHERRYTOP_API_KEYS "
            "(and put HTTPS in front), or listen on 127.0.0.1")


def longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters of the vocabulary's longest token: no token covers more of a prompt's text."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def _check(cfg: ServeConfig) -> None:
    for key, ok, expected in (("client_share", 0 < cfg.client_share <= 1, "in (0, 1]"),
                              ("max_body_bytes", cfg.max_body_bytes >= 1024, ">= 1024"),
                              ("feedback_per_minute", cfg.feedback_per_minute >= 1, ">= 1"),
                              ("served_records", cfg.served_records >= 1, ">= 1"),
                              ("served_max_age_s", cfg.served_max_age_s >= 1, ">= 1"),
                              ("served_max_chars", cfg.served_max_chars >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"serve.{key} must be {expected}, got {getattr(cfg, key)}")


def create_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, model_name: str,
               cfg: ServeConfig = ServeConfig(), moderator: Moderator | None = None,
               feedback_url: str | None = None, checkpoint: str | None = None, labels_needed: int = 2) -> FastAPI:
    """The app; the engine thread starts and stops with it (FastAPI lifespan).

    `checkpoint`: the served model's folder, recorded as the `model` of each chat rating (as `cherrytop
    label generate` and `cherrytop eval --pairs` record theirs), so ratings of two runs' `ppo` stay apart.
    `labels_needed`: rankings a prompt queued by a 👎 / report gets (`cherrytop loop`: one, as its fresh prompts).
    """
    _check(cfg)
    slots = cfg.max_batch + cfg.max_queue
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    max_per_client=max(1, int(cfg.client_share * slots)))
    moderator = moderator or Moderator(None)
    feedback = FeedbackSink(feedback_url, labels_needed)
    served = ServedAnswers(cfg.served_records, cfg.served_max_age_s, cfg.served_max_chars)
    ratings = RateLimit(cfg.feedback_per_minute)
    keys = api_keys(cfg)
    max_chars = engine.context * longest_token(tokenizer)  # more prompt text than this cannot fit the window
    rated_model = checkpoint or model_name

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="cherrytop", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.moderator, app.state.model_name = engine, moderator, model_name
    app.state.served = served
    app.add_middleware(limit_body, limit=cfg.max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")

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

    def client_of(request: Request) -> str:
        """Who asks, for the per-client limits: the API key (hashed) when keys are on, else the address
        (behind a reverse proxy, uvicorn takes it from X-Forwarded-For of $FORWARDED_ALLOW_IPS)."""
        if keys:
            return "key:" + hashlib.sha256(request.headers["authorization"][7:].strip().encode()).hexdigest()[:16]
        return "addr:" + (request.client.host if request.client else "unknown")

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
    async def add_feedback(body: P.FeedbackRequest, request: Request):
        client = client_of(request)
        wait = ratings.hit(client)  # every try counts, so ids cannot be guessed at speed either
        if wait is not None:
            raise P.APIError(429, f"Too many ratings: at most {cfg.feedback_per_minute} a minute; retry after "
                                  f"{math.ceil(wait)} s.", type="rate_limit_error", code="rate_limit_exceeded",
                             headers={"Retry-After": str(math.ceil(wait))})
        rec = served.get(body.id)
        if rec is None or body.index >= len(rec.answers) or (keys and rec.client != client):
            raise P.APIError(404, f"No answer '{body.id}' (choice {body.index}) to rate: this server did not serve "
                                  f"it, or no longer remembers it (it keeps its last {cfg.served_records} answers "
                                  f"for {cfg.served_max_age_s} s).", param="id", code="answer_not_found")
        nul = lambda t: t.replace("\x00", "\ufffd")  # noqa: E731 - a model may emit NUL; no database stores it
        fid = await run_in_threadpool(
            feedback.add, messages=[{**m, "content": nul(m["content"])} for m in rec.messages],
            response=nul(rec.answers[body.index]), rating=body.rating,
            # a blocked answer: the rated text is the policy's safe message, not the model's
            model=MODERATION if rec.blocked[body.index] else rated_model, settings=rec.settings,
            conversation_id=body.conversation_id, comment=body.comment, user=rec.user,
            served_id=f"{body.id}:{body.index}")
        return {"id": fid, "object": "feedback"}

    def prepare(messages: list[dict], policy: Policy) -> tuple[list[int], tuple[str, str] | None]:
        """(prompt ids, (blocked category, the turn it is in) or None); CPU work for a worker thread."""
        try:
            prompt_ids = encode_prompt(tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - the chat template rejected the conversation
            raise P.APIError(400, f"The messages do not fit the model's chat template: {e}", param="messages") from None
        if len(prompt_ids) >= engine.context:
            raise P.APIError(400, f"This model's maximum context length is {engine.context} tokens. However, your "
                                  f"messages resulted in {len(prompt_ids)} tokens. Please reduce the length of the "
                                  "messages.", param="messages", code="context_length_exceeded")
        return prompt_ids, policy.match_turns(messages)  # every turn: the client wrote the assistant's too

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
        chars = sum(len(m["content"]) for m in messages)
        if chars > max_chars:  # refused before tokenizing: no token is longer than longest_token characters
            raise P.APIError(400, f"This model's maximum context length is {engine.context} tokens. However, your "
                                  f"messages have {chars} characters, more than that many tokens can hold "
                                  f"({max_chars}). Please reduce the length of the messages.",
                             param="messages", code="context_length_exceeded")
        cid = P.completion_id()
        client = client_of(request)
        policy = moderator.current()
        prompt_ids, hit = await run_in_threadpool(prepare, messages, policy)
        if hit:
            moderator.record("input", hit[0], hit[1], request_id=cid, model=model_name, user=body.user)
            remember(cid, messages, [policy.safe_message] * n, [True] * n, {"n": n}, body.user, client)
            return blocked(cid, n, policy.safe_message, len(prompt_ids), body)
        limit = engine.context - len(prompt_ids)
        params = Params(max_tokens=min(body.max_completion_tokens or body.max_tokens or cfg.max_tokens, limit),
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, n=n, stop=tuple(body.stop or ()),
                        seed=body.seed)
        settings = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                    "n": n, **({"seed": params.seed} if params.seed is not None else {}),
                    **({"stop": list(params.stop)} if params.stop else {})}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        checks_output = policy.classifier is not None or any("output" in c.check for c in policy.categories)
        job = Job(prompt_ids, params, sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                  moderate=(lambda text, final: moderator.check_output(policy, messages, text, final))
                  if checks_output else None, withhold=policy.unsettled if checks_output else None, client=client)
        try:
            engine.submit(job)
        except QueueFull as e:
            if e.mine:
                msg = (f"You already have {engine.max_per_client} requests running or waiting, your share of this "
                       f"server's {slots}; retry after {cfg.retry_after} s.")
            else:
                msg = (f"The server is at capacity ({cfg.max_batch} running + {cfg.max_queue} waiting requests); "
                       f"retry after {cfg.retry_after} s.")
            raise P.APIError(429, msg, type="rate_limit_error", code="rate_limit_exceeded",
                             headers={"Retry-After": str(cfg.retry_after)}) from None

        def blocked_output(ev: Finish, text: str) -> None:
            moderator.record("output", ev.category, text, request_id=cid, model=model_name, user=body.user)

        def done(texts: list[str], reasons: list[str]) -> None:
            remember(cid, messages, texts, [r == "content_filter" for r in reasons], settings, body.user, client)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _Stream(stream(cid, n, queue, policy.safe_message, blocked_output, include_usage, done),
                           on_close=lambda: engine.cancel(job))
        gone = object()

        async def watch():  # the client hanging up frees the slot at once, however fast tokens come
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(job)
            queue.put_nowait(gone)

        watcher = asyncio.create_task(watch())
        try:
            contents, reasons = [""] * n, ["stop"] * n
            while True:
                ev = await queue.get()
                if ev is gone:
                    return JSONResponse({}, status_code=499)
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
                    done(contents, reasons)
                    return P.completion(cid, model_name, contents, reasons,
                                        P.usage(ev.prompt_tokens, ev.completion_tokens))
        finally:
            watcher.cancel()

    def remember(cid, messages, texts, blocked_choices, settings, user, client) -> None:
        """Keep what was served, for the ratings of it (serve/feedback.py)."""
        served.add(cid, Served(tuple(messages), tuple(texts), tuple(blocked_choices), settings, user, client))

    async def stream(cid, n, queue, safe_message, blocked_output, include_usage, done):
        created = P.now()
        texts, reasons = [""] * n, ["stop"] * n
        for i in range(n):
            yield P.chunk(cid, model_name, created, i, {"role": "assistant", "content": ""})
        while True:
            ev = await queue.get()
            if isinstance(ev, Delta):
                texts[ev.index] += ev.text
                yield P.chunk(cid, model_name, created, ev.index, {"content": ev.text})
            elif isinstance(ev, Finish):
                reasons[ev.index] = ev.reason
                if ev.reason == "content_filter":
                    blocked_output(ev, texts[ev.index])
                    texts[ev.index] = safe_message  # what the chat page shows (the text before it is dropped)
                    yield P.chunk(cid, model_name, created, ev.index, {"content": safe_message})
                yield P.chunk(cid, model_name, created, ev.index, {}, ev.reason)
            elif isinstance(ev, Done):
                if ev.error:
                    yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                else:
                    done(texts, reasons)
                    if include_usage:
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
        raise ValueError(f"cannot listen on {s.host}:{s.port}: {e.strerror}; choose another --port") from None
    warning = exposure_warning(s.host, api_keys(s))
    if warning:  # before the model loads, so it is the first thing the operator sees
        print(warning, file=sys.stderr)
    app = build(checkpoint, cfg, feedback_db)
    auth = "Bearer keys required" if api_keys(s) else "no API keys"
    print(f"serving '{app.state.model_name}' on http://{s.host}:{s.port}/ (chat page) and /v1 (OpenAI API); {auth}; "
          f"batch {s.max_batch}, queue {s.max_queue}")
    uvicorn.Server(uvicorn.Config(app, log_level="warning", **proxy_settings(s))).run(sockets=[sock])


def proxy_settings(s: ServeConfig) -> dict:
    """uvicorn's proxy settings: forwarded headers only from the trusted proxies (serve.forwarded_allow_ips, else
    $FORWARDED_ALLOW_IPS); with none, no header is read (uvicorn would otherwise trust 127.0.0.1's)."""
    trusted = s.forwarded_allow_ips or os.environ.get("FORWARDED_ALLOW_IPS", "")
    return {"proxy_headers": True, "forwarded_allow_ips": trusted} if trusted.strip() else {"proxy_headers": False}
