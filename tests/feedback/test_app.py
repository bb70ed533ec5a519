"""The web app through HTTP (FastAPI's TestClient): login, sessions, CSRF, rate limiting, who sees
what, bad input -> a 4xx with a clear message, double submission -> one row."""

import html
import re

import pytest
from fastapi.testclient import TestClient

from cherrytop.feedback.app import AppConfig, create_app
from cherrytop.feedback.auth import AuthConfig, create_user

PROMPT = [{"role": "user", "content": "name a colour ."}]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def field(html: str, name: str) -> str:
    return re.search(rf'name="{name}" (?:id="{name}" )?value="([^"]*)"', html).group(1)


def login(app, name, password="password1"):
    c = TestClient(app, follow_redirects=False)
    page = c.get("/login")
    r = c.post("/login", data={"name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"})
    assert r.status_code == 303, r.text
    return c


@pytest.fixture
def app(store):
    for name, role in (("root", "admin"), ("ann", "labeler"), ("bob", "labeler")):
        create_user(store, name, "password1", role)
    store.add_item(PROMPT, responses=["red .", "blue .", "no idea .", "you are rude ."], gold=[0, 1, 2, 3])
    return create_app(store, AppConfig(auth=AuthConfig(max_failures=3, window_s=60), max_body_bytes=20_000))


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
    r = ann.post("/admin/users", data={"csrf": csrf_of(ann.get("/").text), "name": "eve", "password": "password1",
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
    r = anon.post("/login", data={"name": "ann", "password": "password1", "csrf": "x"})
    assert r.status_code == 403


def test_login_rate_limit(app):
    c = TestClient(app, follow_redirects=False)
    csrf = csrf_of(c.get("/login").text)
    for _ in range(3):
        r = c.post("/login", data={"name": "ann", "password": "wrong-one", "csrf": csrf})
        assert r.status_code == 401 and "wrong user name or password" in r.text
    r = c.post("/login", data={"name": "ann", "password": "password1", "csrf": csrf})  # right, but too late
    assert r.status_code == 429 and "too many failed logins" in r.text and int(r.headers["retry-after"]) > 0
    r = c.post("/login", data={"name": "nobody", "password": "password1", "csrf": csrf})  # the address is limited too
    assert r.status_code == 429


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
