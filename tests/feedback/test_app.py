"""The web app through HTTP (FastAPI's TestClient): login, sessions, CSRF, rate limiting, who sees
what, bad input -> a 4xx with a clear message, double submission -> one row."""

import html
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from cherrytop.feedback.app import AppConfig, create_app
from cherrytop.feedback.auth import AuthConfig, create_user

PROMPT = [{"role": "user", "content": "name a colour ."}]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def field(html: str, name: str) -> str:
    return re.search(rf'name="{name}" (?:id="{name}" )?value="([^"]*)"', html).group(1)


def login(app, name, password="label-pass-7", client=("testclient", 50000)):
    c = TestClient(app, follow_redirects=False, client=client)
    page = c.get("/login")
    r = c.post("/login", data={"name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"})
    assert r.status_code == 303, r.text
    return c


@pytest.fixture
def app(store):
    for name, role in (("root", "admin"), ("ann", "labeler"), ("bob", "labeler")):
        create_user(store, name, "label-pass-7", role)
    store.add_item(PROMPT, responses=["red .", "blue .", "no idea .", "you are rude ."], gold=[0, 1, 2, 3])
    return create_app(store, AppConfig(auth=AuthConfig(max_failures=3, max_client_failures=5, window_s=60),
                                       max_body_bytes=20_000))


def rank_form(c, order="0,1,2,3", ties="", **extra):
    page = c.get("/rank").text
    return {"csrf": csrf_of(page), "token": field(page, "token"), "started": field(page, "started"),
            "item_id": field(page, "item_id"), "order": order, "ties": ties, **extra}


def rank(c, **kw):
    data = rank_form(c, **kw)
    return c.post("/rank", data=data), data


def test_pages_need_login_and_admin_pages_need_admin(app):
    anon = TestClient(app, follow_redirects=False)
    for path in ("/", "/rank", "/demo", "/review", "/mine", "/admin"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    ann = login(app, "ann")
    for path in ("/admin", "/admin/items", "/admin/items/1", "/admin/users"):
        assert ann.get(path).status_code == 403, path
    r = ann.post("/admin/users", data={"csrf": csrf_of(ann.get("/").text), "name": "eve", "password": "label-pass-7",
                                       "role": "admin"})
    assert r.status_code == 403 and "admins only" in r.text
    assert login(app, "root").get("/admin").status_code == 200


def test_csrf_is_required(app, store):
    ann = login(app, "ann")
    r, data = rank(ann)
    assert r.status_code == 303 and len(store.rankings()) == 1
    store.add_item([{"role": "user", "content": "another ?"}], responses=["a", "b"])
    page = ann.get("/rank").text
    data = {"token": field(page, "token"), "started": field(page, "started"), "item_id": field(page, "item_id"),
            "order": "0,1", "ties": ""}
    assert ann.post("/rank", data=data).status_code == 403  # no token
    r = ann.post("/rank", data={**data, "csrf": "forged"})
    assert r.status_code == 403 and "CSRF" in r.text
    assert len(store.rankings()) == 1
    anon = TestClient(app, follow_redirects=False)  # login without the double-submit cookie
    r = anon.post("/login", data={"name": "ann", "password": "label-pass-7", "csrf": "x"})
    assert r.status_code == 403


def test_failed_logins_lock_that_address_out_of_that_account_not_the_owner_elsewhere(app):
    attacker = TestClient(app, follow_redirects=False, client=("10.0.0.66", 4000))
    csrf = csrf_of(attacker.get("/login").text)
    for _ in range(3):
        r = attacker.post("/login", data={"name": "ann", "password": "wrong-one", "csrf": csrf})
        assert r.status_code == 401 and "wrong user name or password" in r.text
    r = attacker.post("/login", data={"name": "ann", "password": "label-pass-7", "csrf": csrf})  # right, but too late
    assert r.status_code == 429 and "too many failed logins" in r.text and int(r.headers["retry-after"]) > 0
    assert login(app, "ann", client=("10.0.0.7", 5000)).get("/").status_code == 200  # the owner, elsewhere
    assert login(app, "bob", client=("10.0.0.66", 4001)).get("/").status_code == 200  # another account there


def test_one_address_guessing_many_accounts_is_limited(app):
    c = TestClient(app, follow_redirects=False, client=("10.0.0.66", 4000))
    csrf = csrf_of(c.get("/login").text)
    for name in ("ann", "bob", "root", "nobody", "ann"):  # 5 = max_client_failures, never 3 for one account
        assert c.post("/login", data={"name": name, "password": "wrong-one", "csrf": csrf}).status_code == 401
    r = c.post("/login", data={"name": "bob", "password": "label-pass-7", "csrf": csrf})
    assert r.status_code == 429 and "too many failed logins" in r.text
    assert login(app, "bob", client=("10.0.0.7", 5000)).get("/").status_code == 200


def test_double_submission_over_http_saves_once(app, store):
    ann = login(app, "ann")
    r1, data = rank(ann, ties="1,2")
    r2 = ann.post("/rank", data=data)
    assert r1.headers["location"] == "/?done=rank" and r2.headers["location"] == "/?done=again"
    assert len(store.rankings()) == 1 and store.rankings()[0].ties == [[1, 2]]
    assert "already submitted" in ann.get("/?done=again").text


def test_a_labeler_sees_only_their_own_work(app, store):
    ann, bob = login(app, "ann"), login(app, "bob")
    rank(ann, order="3,2,1,0", helpful_3="7")
    ann_ranking = store.rankings()[0]
    assert ann.get(f"/mine/rankings/{ann_ranking.id}").status_code == 200
    r = bob.get(f"/mine/rankings/{ann_ranking.id}")
    assert r.status_code == 404 and "not one of yours" in r.text
    rank_page = bob.get("/rank").text  # bob ranks the same item without seeing ann's order or ratings
    assert "D › C › B › A" not in rank_page and 'selected' not in rank_page.split('id="ranklist"')[1]
    assert "D › C › B › A" in ann.get("/mine").text and "D › C › B › A" not in bob.get("/mine").text
    demo_page = ann.get("/demo").text  # no prompt waiting: the free conversation form
    data = {"csrf": csrf_of(demo_page), "token": field(demo_page, "token"), "started": field(demo_page, "started"),
            "role": ["user", "assistant"], "content": ["hi there", "hello ! how can i help ?"]}
    assert ann.post("/demo", data=data).status_code == 303
    assert "how can i help" not in bob.get("/mine").text and "how can i help" in ann.get("/mine").text
    assert "how can i help" not in ann.get("/review").text  # nobody reviews their own
    assert "how can i help" in bob.get("/review").text
    admin = login(app, "root")
    page = admin.get(f"/mine/rankings/{ann_ranking.id}").text  # an admin sees everything
    assert page.index("you are rude .") < page.index("no idea .") < page.index("blue .") < page.index("red .")


def test_bad_and_oversized_input_gets_a_clear_4xx(app, store):
    ann = login(app, "ann")
    r, _ = rank(ann, order="0,1,x")
    assert r.status_code == 422 and "expected comma-separated answer numbers" in r.text
    r, _ = rank(ann, order="0,1,2")
    assert r.status_code == 422 and "ranking has 3 of 4 responses, missing 3" in r.text
    r, _ = rank(ann, helpful_0="9")
    assert r.status_code == 422 and "expected 1..7" in r.text
    r = ann.post("/rank", data={**rank_form(ann), "item_id": "999"})
    assert r.status_code == 404 and "item 999 does not exist" in r.text
    page = ann.get("/demo").text
    r = ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                "role": ["user"], "content": ["x" * 30_000]})
    assert r.status_code == 413 and "at most 20000 allowed" in r.text
    r = ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                "role": ["user", "assitant"], "content": ["hi", "hello"]})
    assert r.status_code == 422 and "did you mean 'assistant'" in html.unescape(r.text)
    assert store.rankings() == [] and store.demonstrations() == []


def test_places_and_ranking_text_show_ties():
    from cherrytop.feedback.app import ranking_text, ranks
    assert ranks([1, 0, 2, 3], [[0, 2]]) == {1: "1", 0: "2=", 2: "2=", 3: "4"}
    assert ranking_text([1, 0, 2, 3], [[0, 2]]) == "B › A = C › D"
    assert ranks([2, 0, 1], []) == {2: "1", 0: "2", 1: "3"}


def test_a_labeler_cannot_change_anothers_work(app, store):
    ann, bob = login(app, "ann"), login(app, "bob")
    _, ann_form = rank(ann, order="3,2,1,0")
    bob_form = rank_form(bob)
    r = bob.post("/rank", data={**bob_form, "token": ann_form["token"], "order": "0,1,2,3"})  # replaying ann's form
    assert r.status_code == 422 and "already used by someone else" in r.text
    (row,) = store.rankings()
    assert row.ranking == [3, 2, 1, 0] and row.user_id == store.users()[1].id
    review = ann.get("/review").text  # nothing to review yet; bob writes, ann reviews, bob cannot review his own
    assert "No demonstrations are waiting" in review


def test_text_is_escaped_on_every_page(app, store):
    ann, bob = login(app, "ann"), login(app, "bob")
    page = ann.get("/demo").text
    evil = "<script>alert('x')</script>"
    r = ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": field(page, "started"),
                                "role": ["user", "assistant"], "content": [evil, "ok ."]})
    assert r.status_code == 303
    for c, path in ((bob, "/review"), (ann, "/mine")):
        text = c.get(path).text
        assert evil not in text and "&lt;script&gt;" in text, path


def test_ids_no_database_holds_are_not_found(app, store):
    ann, admin = login(app, "ann"), login(app, "root")
    huge = "9" * 25  # SQLite refused to look it up (OverflowError), PostgreSQL too: a 500
    for path in (f"/admin/items/{huge}", "/admin/items/2147483648", "/admin/items/abc"):
        r = admin.get(path)
        assert r.status_code == 404 and "text/html" in r.headers["content-type"], path
    assert ann.get(f"/mine/rankings/{huge}").status_code == 404
    r = ann.post("/rank", data={**rank_form(ann), "item_id": huge})
    assert r.status_code == 400 and "expected a whole number" in r.text
    page = ann.get("/demo").text
    r = ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                "item_id": huge, "reply": "red ."})
    assert r.status_code == 400
    assert store.rankings() == [] and store.demonstrations() == []


HOSTILE = ['"><img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
           "' onmouseover='window.__pwned=1"]
ATTR_BREAK = '" tabindex=0 autofocus onfocus=window.__pwned=1 x="'  # passes through tojson unescaped


def hostile_item(store):
    """An item whose every shown field holds markup: prompt, answers, model names, free-form settings."""
    return store.add_item([{"role": "user", "content": HOSTILE[0]}], responses=HOSTILE[1:] + [ATTR_BREAK],
                          provenance=[{"model": h, "settings": {"x": ATTR_BREAK, "temperature": 0.7}, "source": "chat"}
                                      for h in HOSTILE + [ATTR_BREAK]][1:]).id


class Markup(HTMLParser):
    """Every element's attributes, and script sources, of a page."""

    def __init__(self, text):
        super().__init__()
        self.attrs, self.scripts = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k) for k, _ in attrs]
        if tag == "script":
            self.scripts.append(dict(attrs).get("src"))


def test_hostile_text_is_text_on_every_page(app, store):
    """Escaping for the attribute context too: no page gets an event handler, autofocus or script of
    its own from stored text (the issue's payload broke out of `title="{{ settings|tojson }}"`)."""
    item = hostile_item(store)
    ann, admin = login(app, "ann"), login(app, "root")
    page = ann.get("/demo").text  # ann answers the hostile prompt, then ranks it
    assert ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                   "item_id": str(item), "reply": HOSTILE[2]}).status_code == 303
    assert rank(ann)[0].status_code == 303  # the gold item first
    r, _ = rank(ann, order="0,1,2")
    assert r.status_code == 303
    ranking = store.rankings(item_id=item)[0].id
    for c, path in ((admin, f"/admin/items/{item}"), (admin, "/admin/items"), (admin, "/admin"),
                    (ann, "/mine"), (admin, f"/mine/rankings/{ranking}"), (admin, "/review")):
        text = c.get(path).text
        m = Markup(text)
        assert not [a for a in m.attrs if a[1].startswith("on") or a[1] in ("autofocus", "tabindex")], (path, m.attrs)
        assert all(src and src.startswith("/static/") for src in m.scripts), path
        assert path == "/admin" or str(escape(HOSTILE[0])) in text, path  # shown, as text
    text = admin.get(f"/admin/items/{item}").text
    assert "temperature 0.7" in text and "window.__pwned" in text  # the model names, as text


def test_item_pages_show_only_known_bounded_provenance():
    from cherrytop.feedback.app import provenance
    shown = provenance({"model": "m" * 1000, "settings": {"temperature": 0.7, "top_p": 1, "seed": True, "x": "<b>",
                                                          "max_new_tokens": "64", "top_k": float("nan")}})
    assert shown == {"model": "m" * 200, "settings": "temperature 0.7 · top_p 1"}
    assert provenance(None) == provenance({"model": 3, "settings": []}) == {"model": "", "settings": ""}


def test_every_response_forbids_inline_script_and_framing(app):
    from cherrytop.feedback.app import HERE
    ann = login(app, "ann")
    responses = [ann.get("/"), ann.get("/static/rank.js"), ann.get("/no-such-page"), TestClient(app).get("/login"),
                 TestClient(app, follow_redirects=False).get("/rank"),
                 ann.post("/rank", content=b"x" * 30_000, headers={"content-type": "application/x-www-form-urlencoded"})]
    assert [r.status_code for r in responses] == [200, 200, 404, 200, 303, 413]
    for r in responses:
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self'" and "unsafe" not in r.headers["content-security-policy"]
        assert csp["frame-ancestors"] == "'none'" and csp["object-src"] == "'none'"
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
    for t in (HERE / "templates").glob("*.html"):  # the policy would block these: none may be there
        text = t.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text) and not re.search(r"\son\w+\s*=", text), t.name
        assert "tojson" not in text and "style=" not in text and "|safe" not in text, t.name


def test_a_ranking_is_accepted_only_for_the_item_the_labeler_was_given(app, store):
    from datetime import datetime, timezone

    from sqlalchemy import update

    from cherrytop.feedback.store import Claim
    other = store.add_item([{"role": "user", "content": "another ?"}], responses=["a", "b"]).id
    ann, bob = login(app, "ann"), login(app, "bob")
    data = rank_form(ann)  # ann is given the gold item first
    assert data["item_id"] != str(other)
    r = ann.post("/rank", data={**data, "item_id": str(other), "order": "0,1"})
    assert r.status_code == 409 and "not yours to rank" in r.text
    assert ann.post("/rank", data=data).status_code == 303
    page = ann.get("/rank").text  # now ann holds `other`; her claim expires
    assert field(page, "item_id") == str(other)
    with store.tx() as s:
        s.execute(update(Claim).values(expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
    r = ann.post("/rank", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                "item_id": str(other), "order": "0,1", "ties": ""})
    assert r.status_code == 409 and "expired" in r.text
    assert [x.item_id for x in store.rankings()] == [int(data["item_id"])]


def test_an_item_never_gets_more_rankings_than_it_needs(app, store):
    from cherrytop.feedback.store import NotOffered
    other = store.add_item([{"role": "user", "content": "another ?"}], responses=["a", "b"]).id  # 2 labels needed
    create_user(store, "cat", "label-pass-7")
    ann, bob, cat = login(app, "ann"), login(app, "bob"), login(app, "cat")
    for c in (ann, bob):
        rank(c)  # the gold item
        r, data = rank(c, order="0,1")
        assert r.status_code == 303 and data["item_id"] == str(other)
    rank(cat)
    assert "Nothing left for you to rank" in cat.get("/rank").text
    page = cat.get("/demo").text
    r = cat.post("/rank", data={"csrf": csrf_of(page), "token": "cattoken1", "started": "0", "item_id": str(other),
                                "order": "0,1", "ties": ""})
    assert r.status_code == 409
    with pytest.raises(NotOffered, match="already has the 2 rankings it needs"):  # not even from a script
        store.submit_ranking(store.user_by_name("cat").id, other, [0, 1], [], "cattoken2", 1.0)
    assert len(store.rankings(item_id=other)) == 2


def test_a_review_is_accepted_only_for_the_demonstration_the_labeler_was_given(app, store):
    create_user(store, "cat", "label-pass-7")
    ann, bob, cat = login(app, "ann"), login(app, "bob"), login(app, "cat")
    page = ann.get("/demo").text
    assert ann.post("/demo", data={"csrf": csrf_of(page), "token": field(page, "token"), "started": "0",
                                   "role": ["user", "assistant"], "content": ["hi", "hello ."]}).status_code == 303
    demo = store.demonstrations()[0].id

    def review(c, token, verdict, reason=""):
        return c.post("/review", data={"csrf": csrf_of(c.get("/").text), "token": token, "started": "0",
                                       "demonstration_id": str(demo), "verdict": verdict, "reason": reason})
    r = review(cat, "cattoken0", "reject", "veto")  # cat never opened Review: it was not given to cat
    assert r.status_code == 409 and "not yours to review" in r.text
    bob_page = bob.get("/review").text  # bob is given it; cat, asking now, is not
    assert f"#{demo}" in bob_page and "No demonstrations are waiting" in cat.get("/review").text
    assert store.queue_counts(store.user_by_name("cat").id)["review"] == 0
    assert review(bob, field(bob_page, "token"), "accept").status_code == 303
    r = review(cat, "cattoken1", "reject", "veto after the accept")
    assert r.status_code == 409
    assert [(rv.accept, rv.user_id) for rv in store.reviews()] == [(True, store.user_by_name("bob").id)]


def test_cookies_are_secure_over_https_and_behind_a_trusted_proxy(store):
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
    create_user(store, "ann", "label-pass-7")

    def cookies(client, **headers):  # the cookie sent back by hand: httpx keeps Secure ones for https URLs
        page = client.get("/login", headers=headers)
        r = client.post("/login", headers={**headers, "cookie": page.headers["set-cookie"].split(";")[0]},
                        data={"name": "ann", "password": "label-pass-7", "csrf": csrf_of(page.text)})
        assert r.status_code == 303, r.text
        return [page.headers["set-cookie"], r.headers["set-cookie"]]
    auto = create_app(store)
    assert all("secure" in c.lower() for c in cookies(TestClient(auto, base_url="https://labels", follow_redirects=False)))
    assert not any("secure" in c.lower() for c in cookies(TestClient(auto, follow_redirects=False)))
    always = create_app(store, AppConfig(secure_cookies=True))  # e.g. TLS ended somewhere uvicorn cannot see
    assert "secure" in TestClient(always).get("/login").headers["set-cookie"].lower()
    proxied = ProxyHeadersMiddleware(auto, trusted_hosts="10.0.0.1")  # what `--forwarded-allow-ips 10.0.0.1` runs
    via_proxy = TestClient(proxied, follow_redirects=False, client=("10.0.0.1", 3000))
    assert all("secure" in c.lower() for c in cookies(via_proxy, **{"x-forwarded-proto": "https",
                                                                     "x-forwarded-for": "192.0.2.5"}))
    spoofer = TestClient(proxied, follow_redirects=False, client=("10.0.0.2", 3000))  # not the proxy: ignored
    assert not any("secure" in c.lower() for c in cookies(spoofer, **{"x-forwarded-proto": "https"}))


def test_label_serve_exposes_secure_cookies_and_the_trusted_proxy(tmp_path, monkeypatch):
    """`cherrytop label serve` hands --secure-cookies and --forwarded-allow-ips to what it runs; without
    the latter no forwarded header is read (uvicorn's default trusts 127.0.0.1's)."""
    import uvicorn

    from cherrytop.cli import main
    served = []

    class Server:  # records what uvicorn would serve, instead of serving it
        def __init__(self, config):
            self.config = config

        def run(self, sockets):
            sockets[0].close()
            c = self.config
            secure = {scheme: "secure" in TestClient(c.app, base_url=f"{scheme}://labels").get("/login")
                      .headers["set-cookie"].lower() for scheme in ("http", "https")}
            served.append((c.proxy_headers, c.forwarded_allow_ips if c.proxy_headers else None, secure))
    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    db = ["--db", f"sqlite:///{tmp_path / 'fb.db'}", "--port", "0"]
    assert main(["label", "serve", *db]) == 0
    assert main(["label", "serve", *db, "--forwarded-allow-ips", "10.0.0.1"]) == 0
    assert main(["label", "serve", *db, "--secure-cookies"]) == 0
    assert main(["label", "serve", *db, "--no-secure-cookies"]) == 0
    assert served == [(False, None, {"http": False, "https": True}), (True, "10.0.0.1", {"http": False, "https": True}),
                      (False, None, {"http": True, "https": True}), (False, None, {"http": False, "https": False})]
