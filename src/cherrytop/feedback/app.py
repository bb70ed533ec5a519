"""The web app: server-rendered pages (Jinja templates in templates/) and a little JavaScript
(static/rank.js: ranking by drag and by keyboard, ties; static/demo.js: adding conversation turns).

Pages: /login; / (what to do next); /demo (write a demonstration: the reply to a prompt, or a whole
conversation playing both sides); /rank (order K answers best to worst, ties, "all bad", report,
1-7 ratings); /review (accept / reject someone else's demonstration with a reason); /arena (two
models' answers side by side, their names hidden: A, B, tie or both bad); /mine (your
own work, nobody else's); /admin (per-labeler statistics and agreement), /admin/items, /admin/users.

Every POST needs the session's CSRF token (the login form: a double-submit cookie); bodies larger
than `max_body_bytes` get 413; bad input a 4xx page with a one-line reason. A ranking or review is
accepted only for the item / demonstration / battle the server gave that labeler (409 otherwise).

Every response carries a Content-Security-Policy allowing only this site's own script files (no
inline script, no inline event handlers), so text that slipped through escaping still cannot run.
Cookies are Secure when the request came over HTTPS (behind a reverse proxy: uvicorn's
`--forwarded-allow-ips` makes the proxy's X-Forwarded-Proto count), or always / never by config.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi import Path as URLPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from cherrytop.feedback import auth, stats
from cherrytop.feedback.store import AXES, FLAGS, VOTES, NotOffered, Store

HERE = Path(__file__).parent
SESSION_COOKIE, LOGIN_COOKIE = "ct_session", "ct_login"
MAX_ID = 2 ** 31 - 1
"""The largest row id (PostgreSQL's integer); a larger number is no row, and the databases refuse to look it up."""
RowId = Annotated[int, URLPath(ge=0, le=MAX_ID)]
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class AppConfig:
    auth: auth.AuthConfig = field(default_factory=auth.AuthConfig)
    """Password, session and login rate-limit settings."""
    max_body_bytes: int = 256 * 1024
    """Largest request body accepted; larger ones get 413."""
    max_message_chars: int = 20_000
    """Longest message of a demonstration."""
    secure_cookies: bool | None = None
    """Mark cookies Secure: None (default) when the request came over HTTPS, True always, False never."""
    alpha_level: str = "ordinal"
    """Krippendorff's α level of measurement for the 1-7 ratings (ordinal or interval)."""


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoginRequired(Exception):
    pass


def create_app(store: Store, cfg: AppConfig = AppConfig()) -> FastAPI:
    app = FastAPI(title="cherrytop feedback", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ranking_text"] = ranking_text
    templates.env.globals["ranks"] = ranks
    templates.env.filters["provenance"] = provenance
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        response = None
        if request.method in ("POST", "PUT", "PATCH"):
            n = request.headers.get("content-length")
            if n is None or not n.isdigit():
                response = _error_page(request, 411, "a Content-Length header is required")
            elif int(n) > cfg.max_body_bytes:
                response = _error_page(request, 413, f"the request is {int(n)} bytes; at most {cfg.max_body_bytes} allowed")
        response = response or await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        return response

    def secure(request: Request) -> bool:
        return request.url.scheme == "https" if cfg.secure_cookies is None else cfg.secure_cookies

    def _error_page(request: Request, status: int, message: str) -> Response:
        who = auth.session_user(store, request.cookies.get(SESSION_COOKIE))
        return templates.TemplateResponse(request, "error.html", {"user": who[0] if who else None, "csrf": "",
                                                                   "status": status, "message": message},
                                          status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return _error_page(request, e.status, e.message)

    @app.exception_handler(NotOffered)  # a ranking / review of work not given to this labeler
    async def _not_offered(request: Request, e: NotOffered):
        return _error_page(request, 409, str(e))

    @app.exception_handler(ValueError)  # DataError and the store's one-line refusals
    async def _value_error(request: Request, e: ValueError):
        return _error_page(request, 422, str(e))

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, e: LoginRequired):
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return _error_page(request, 404, "no such page")

    @app.exception_handler(RequestValidationError)  # the only parameters FastAPI checks: ids in URLs
    async def _bad_id(request: Request, e):
        return _error_page(request, 404, "no such page")

    def current(request: Request, admin: bool = False):
        who = auth.session_user(store, request.cookies.get(SESSION_COOKIE))
        if who is None:
            raise LoginRequired()
        if admin and who[0].role != "admin":
            raise HTTPError(403, "this page is for admins only")
        return who

    async def posted(request: Request, admin: bool = False):
        """(user, form) of a POST whose CSRF token matches the session's."""
        user, csrf = current(request, admin)
        form = await request.form()
        if not auth.csrf_ok(csrf, form.get("csrf")):
            raise HTTPError(403, "the form's CSRF token is missing or wrong; reload the page and submit again")
        return user, form

    def page(request: Request, name: str, who, **ctx) -> HTMLResponse:
        user, csrf = who
        return templates.TemplateResponse(request, name, {"user": user, "csrf": csrf, **ctx})

    def form_meta() -> dict:
        return {"token": secrets.token_hex(16), "started": f"{time.time():.3f}"}

    def seconds(form) -> float:
        try:
            return min(max(time.time() - float(form.get("started", "")), 0.0), 3600.0)
        except ValueError:
            raise HTTPError(400, "the form's 'started' field is not a number") from None

    def token(form) -> str:
        t = str(form.get("token", ""))
        if not (8 <= len(t) <= 64) or not t.isalnum():
            raise HTTPError(400, "the form's submission token is missing or malformed; reload the page")
        return t

    def integer(form, key: str) -> int:
        v = str(form.get(key, ""))
        if not (v.isascii() and v.isdigit()) or int(v) > MAX_ID:
            raise HTTPError(400, f"field '{key}' is {v[:20]!r}; expected a whole number up to {MAX_ID}")
        return int(v)

    def text(form, key: str, limit: int) -> str:
        v = form.get(key, "")
        if not isinstance(v, str):
            raise HTTPError(400, f"field '{key}' must be text")
        if len(v) > limit:
            raise HTTPError(413, f"field '{key}' has {len(v)} characters; at most {limit} allowed")
        return v

    # ------------------------------------------------------------ login

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/", error: str = ""):
        csrf = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        resp = templates.TemplateResponse(request, "login.html", {"user": None, "csrf": csrf, "next": _safe_next(next),
                                                                  "error": error})
        resp.set_cookie(LOGIN_COOKIE, csrf, httponly=True, samesite="strict", secure=secure(request))
        return resp

    @app.post("/login")
    async def login_post(request: Request):
        form = await request.form()
        if not auth.csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
            raise HTTPError(403, "the login form's CSRF token is missing or wrong; reload the login page")
        name, password = text(form, "name", 64).strip(), text(form, "password", auth.MAX_PASSWORD)
        nxt = _safe_next(str(form.get("next", "/")))
        problem = auth.name_problem(name)  # before any query: a NUL would make PostgreSQL fail
        if problem:
            return templates.TemplateResponse(request, "login.html", {"user": None, "csrf": form.get("csrf"), "next": nxt,
                                                                      "error": problem}, status_code=400)
        try:
            user, tok, _ = auth.login(store, name, password, request.client.host if request.client else "?", cfg.auth)
        except auth.RateLimited as e:
            return templates.TemplateResponse(request, "login.html", {"user": None, "csrf": form.get("csrf"), "next": nxt,
                                                                      "error": str(e)}, status_code=429,
                                              headers={"Retry-After": str(e.seconds)})
        except ValueError as e:
            return templates.TemplateResponse(request, "login.html", {"user": None, "csrf": form.get("csrf"), "next": nxt,
                                                                      "error": str(e)}, status_code=401)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(SESSION_COOKIE, tok, httponly=True, samesite="lax", secure=secure(request),
                        max_age=int(cfg.auth.session_hours * 3600))
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        await posted(request)
        auth.logout(store, request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # ------------------------------------------------------------ labeler pages

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, done: str = ""):
        who = current(request)
        return page(request, "home.html", who, counts=store.queue_counts(who[0].id), done=done)

    @app.get("/healthz")
    def healthz():
        return JSONResponse({"ok": True})

    @app.get("/demo", response_class=HTMLResponse)
    def demo_page(request: Request, mode: str = ""):
        who = current(request)
        item = None if mode == "free" else store.next_demo_item(who[0].id)
        return page(request, "demo.html", who, item=item, **form_meta(), max_chars=cfg.max_message_chars)

    @app.post("/demo")
    async def demo_post(request: Request):
        user, form = await posted(request)
        item_id = integer(form, "item_id") if form.get("item_id") else None
        if item_id is not None:
            item = store.item(item_id)
            if item is None:
                raise HTTPError(404, f"item {item_id} does not exist")
            reply = text(form, "reply", cfg.max_message_chars).strip()
            if not reply:
                raise HTTPError(422, "the reply is empty; write the assistant's answer")
            messages = item.prompt + [{"role": "assistant", "content": reply}]
        else:
            roles, contents = form.getlist("role"), form.getlist("content")
            if len(roles) != len(contents) or not roles or len(roles) > 64:
                raise HTTPError(400, "the conversation's roles and contents do not pair up (1 to 64 turns)")
            if any(not isinstance(c, str) or len(c) > cfg.max_message_chars for c in contents):
                raise HTTPError(413, f"a message is longer than {cfg.max_message_chars} characters")
            messages = [{"role": r, "content": c.strip()} for r, c in zip(roles, contents) if c.strip()]
            if not messages:
                raise HTTPError(422, "the conversation is empty")
        r = store.submit_demonstration(user.id, messages, token(form), seconds(form), item_id=item_id)
        return RedirectResponse(f"/?done={'demo' if r.created else 'again'}", status_code=303)

    @app.get("/rank", response_class=HTMLResponse)
    def rank_page(request: Request):
        who = current(request)
        item = store.next_ranking_item(who[0].id)
        order = []
        if item is not None:  # each labeler sees the answers in their own random order [IG: presentation order]
            order = list(range(len(item.responses)))
            random.Random(f"{item.id}:{who[0].id}").shuffle(order)
        return page(request, "rank.html", who, item=item, order=order, axes=AXES, flags=FLAGS, **form_meta())

    @app.post("/rank")
    async def rank_post(request: Request):
        user, form = await posted(request)
        item_id = integer(form, "item_id")
        item = store.item(item_id)
        if item is None:
            raise HTTPError(404, f"item {item_id} does not exist")
        k = len(item.responses)
        ranking = _int_list(str(form.get("order", "")), "order")
        ties = [_int_list(t, "ties") for t in str(form.get("ties", "")).split(";") if t.strip()]
        ratings: dict[str, list[Any]] = {}
        for axis in AXES:
            vals = []
            for i in range(k):
                v = str(form.get(f"{axis}_{i}", "")).strip()
                if v and (not v.isdigit() or not 1 <= int(v) <= 7):
                    raise HTTPError(422, f"rating {axis} of answer {i} is {v!r}; expected 1..7 or empty")
                vals.append(int(v) if v else None)
            if any(v is not None for v in vals):
                ratings[axis] = vals
        r = store.submit_ranking(user.id, item_id, ranking, ties, token(form), seconds(form),
                                 all_bad=form.get("all_bad") == "on", flags=[str(f) for f in form.getlist("flag")],
                                 ratings=ratings, offered=True)
        return RedirectResponse(f"/?done={'rank' if r.created else 'again'}", status_code=303)

    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request):
        who = current(request)
        demo = store.next_review(who[0].id)
        return page(request, "review.html", who, demo=demo, **form_meta())

    @app.post("/review")
    async def review_post(request: Request):
        user, form = await posted(request)
        verdict = form.get("verdict")
        if verdict not in ("accept", "reject"):
            raise HTTPError(422, f"verdict is {verdict!r}; expected accept or reject")
        r = store.submit_review(user.id, integer(form, "demonstration_id"), verdict == "accept",
                                text(form, "reason", 2000), token(form), offered=True)
        return RedirectResponse(f"/?done={'review' if r.created else 'again'}", status_code=303)

    @app.get("/mine", response_class=HTMLResponse)
    def mine(request: Request):
        who = current(request)
        uid = who[0].id
        items = {i.id: i for i in store.items()}
        demos = store.demonstrations(user_id=uid)
        verdicts: dict[int, list] = {}
        for rv in store.reviews():  # reviews of my demonstrations (a reviewer's name is not shown)
            verdicts.setdefault(rv.demonstration_id, []).append(rv)
        return page(request, "mine.html", who, rankings=store.rankings(user_id=uid), items=items, demos=demos,
                    verdicts=verdicts, reviews=store.reviews(user_id=uid))

    @app.get("/mine/rankings/{ranking_id}", response_class=HTMLResponse)
    def my_ranking(request: Request, ranking_id: RowId):
        who = current(request)
        r = store.ranking(ranking_id)
        if r is None or (r.user_id != who[0].id and who[0].role != "admin"):
            raise HTTPError(404, f"ranking {ranking_id} is not one of yours")  # 404: do not reveal that it exists
        return page(request, "ranking.html", who, r=r, item=store.item(r.item_id), axes=AXES)

    # ------------------------------------------------------------ arena: vote between two answers

    @app.get("/arena", response_class=HTMLResponse)
    def arena_page(request: Request, done: str = ""):
        who = current(request)
        b = store.next_battle(who[0].id)
        # only what the page shows: the model names never reach the template
        battle = None if b is None else {"id": b.id, "prompt": b.prompt, "answer_a": b.answer_a, "answer_b": b.answer_b}
        return page(request, "arena.html", who, battle=battle, done=done, **form_meta())

    @app.post("/arena")
    async def arena_post(request: Request):
        user, form = await posted(request)
        battle_id = integer(form, "battle_id")
        choice = form.get("choice")
        if choice not in VOTES:
            raise HTTPError(422, f"choice is {str(choice)[:20]!r}; expected one of {', '.join(VOTES)}")
        if store.battle(battle_id) is None:
            raise HTTPError(404, f"battle {battle_id} does not exist")
        r = store.submit_vote(user.id, battle_id, str(choice), token(form), seconds(form), offered=True)
        return RedirectResponse(f"/arena?done={'vote' if r.created else 'again'}", status_code=303)

    # ------------------------------------------------------------ admin pages

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request):
        who = current(request, admin=True)
        return page(request, "admin.html", who, report=stats.report(store, cfg.alpha_level), axes=AXES)

    @app.get("/admin/items", response_class=HTMLResponse)
    def admin_items(request: Request):
        who = current(request, admin=True)
        counts: dict[int, int] = {}
        for r in store.rankings():
            counts[r.item_id] = counts.get(r.item_id, 0) + 1
        demos: dict[int, int] = {}
        for d in store.demonstrations():
            if d.item_id is not None:
                demos[d.item_id] = demos.get(d.item_id, 0) + 1
        return page(request, "items.html", who, items=store.items(), counts=counts, demos=demos)

    @app.get("/admin/items/{item_id}", response_class=HTMLResponse)
    def admin_item(request: Request, item_id: RowId):
        who = current(request, admin=True)
        item = store.item(item_id)
        if item is None:
            raise HTTPError(404, f"item {item_id} does not exist")
        names = {u.id: u.name for u in store.users()}
        return page(request, "item.html", who, item=item, rankings=store.rankings(item_id=item_id), names=names,
                    axes=AXES)

    @app.get("/admin/users", response_class=HTMLResponse)
    def admin_users(request: Request, done: str = ""):
        who = current(request, admin=True)
        return page(request, "users.html", who, users=store.users(), done=USER_ACTIONS.get(done, ""))

    @app.post("/admin/users")
    async def admin_users_post(request: Request):
        _, form = await posted(request, admin=True)
        try:
            auth.create_user(store, text(form, "name", 64), text(form, "password", auth.MAX_PASSWORD),
                             str(form.get("role", "labeler")))
        except ValueError as e:
            raise HTTPError(422, str(e)) from None
        return RedirectResponse("/admin/users?done=created", status_code=303)

    @app.post("/admin/users/{user_id}")
    async def admin_user_action(request: Request, user_id: RowId):
        """disable / enable an account, end its sessions, or set a new password (which ends them too)."""
        admin, form = await posted(request, admin=True)
        user = store.user(user_id)
        if user is None:
            raise HTTPError(404, f"user {user_id} does not exist")
        action = form.get("action")
        if action not in USER_ACTIONS or action == "created":
            raise HTTPError(422, f"action {str(action)[:20]!r} is not one of disable, enable, revoke, password")
        if user.id == admin.id and action != "password":
            raise HTTPError(422, "you cannot disable or log out your own account here; use another admin account")
        if action in ("disable", "enable"):
            store.set_disabled(user.id, action == "disable")
        elif action == "revoke":
            store.revoke_sessions(user.id)
        else:
            try:
                auth.reset_password(store, user.name, text(form, "password", auth.MAX_PASSWORD))
            except ValueError as e:
                raise HTTPError(422, str(e)) from None
        return RedirectResponse(f"/admin/users?done={action}", status_code=303)

    return app


USER_ACTIONS = {"created": "User added.", "disable": "Account disabled; its sessions ended.",
                "enable": "Account enabled.", "revoke": "Its sessions ended: logged out everywhere.",
                "password": "Password changed; its sessions ended."}
"""What an admin can do to an account (POST /admin/users/{id}, field `action`), and the flash shown after."""
SETTINGS_SHOWN = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
"""The sampling settings an item page shows (provenance `settings` is free-form JSON: nothing else is shown)."""

LETTERS = "ABCDEFGHI"


def provenance(entry: Any) -> dict[str, str]:
    """What the item page shows of one response's provenance: its model name (cut to 200 characters)
    and known numeric settings only, as plain text."""
    entry = entry if isinstance(entry, dict) else {}
    model = entry.get("model")
    settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    shown = [f"{k} {settings[k]:g}" for k in SETTINGS_SHOWN
             if type(settings.get(k)) in (int, float) and abs(settings[k]) < 1e12]
    return {"model": model[:200] if isinstance(model, str) else "", "settings": " · ".join(shown)}


def ranks(ranking: list[int], ties: list[list[int]]) -> dict[int, str]:
    """{response: its place} with shared places for ties ("2=")."""
    tied = {frozenset(t) for t in ties}
    out = {}
    for p, i in enumerate(ranking):
        better = sum(1 for j in ranking[:p] if frozenset((i, j)) not in tied)
        share = any(frozenset((i, j)) in tied for j in ranking if j != i)
        out[i] = f"{better + 1}{'=' if share else ''}"
    return out


def ranking_text(ranking: list[int], ties: list[list[int]]) -> str:
    """Answers by letter, best first: "B › A = C › D"."""
    tied = {frozenset(t) for t in ties}
    out = LETTERS[ranking[0]]
    for prev, i in zip(ranking, ranking[1:]):
        out += (" = " if frozenset((prev, i)) in tied else " › ") + LETTERS[i]
    return out


def _safe_next(nxt: str) -> str:
    """Only local paths: no open redirect to another site."""
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


def _int_list(s: str, what: str) -> list[int]:
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 9:
        raise HTTPError(422, f"field '{what}' is {s[:40]!r}; expected comma-separated answer numbers")
    return [int(p) for p in parts]
