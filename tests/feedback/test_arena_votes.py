"""The arena vote page: two models' answers side by side, names hidden, A / B / tie / both bad.

Store (SQLite and PostgreSQL): votes only on battles offered to that labeler, never more than a
battle's votes_needed, a repeated token is one vote, outcomes in `cherrytop.eval.arena.ratings`'s
format. App: two logged-in labelers vote until nothing is left and the fitted ratings put the model
both preferred first; model names never reach the HTML; hostile answers render as text."""

import html
import random
import re
import threading
from datetime import timedelta
from itertools import combinations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from cherrytop.eval.arena import ratings
from cherrytop.feedback.auth import create_user
from cherrytop.feedback.store import BattleClaim, NotOffered, now

from .test_app import app, csrf_of, field, login  # noqa: F401 (app: the fixture; users root, ann, bob)

PROMPT = [{"role": "user", "content": "what is 2 plus 2 ?"}]
MODELS = {"model-strong-7b": "the answer is 4 .", "model-mid-3b": "maybe 4 ?", "model-weak-1b": "i do not know ."}
"""Each model's answer (numbered per prompt): what a labeler sees, without the name."""


def row(a="model-strong-7b", b="model-weak-1b", n=0, prompt=None):
    """A battle of a (left) and b on a two-turn prompt; answer texts from MODELS, numbered n."""
    prompt = prompt or PROMPT + [{"role": "assistant", "content": "4 ."}, {"role": "user", "content": f"and {n} ?"}]
    return {"prompt": prompt, "model_a": a, "answer_a": f"{MODELS[a]} #{n}", "model_b": b, "answer_b": f"{MODELS[b]} #{n}"}


def expire(store, uid):
    with store.tx() as s:
        s.execute(update(BattleClaim).where(BattleClaim.user_id == uid).values(expires_at=now() - timedelta(seconds=1)))


# ---------------------------------------------------------------- store, on SQLite and PostgreSQL

def test_only_offered_battles_take_votes_and_a_repeated_token_is_one_vote(store):
    ann, bob = (create_user(store, n, "label-pass-7") for n in ("ann", "bob"))
    [bid] = store.add_battles([row()], votes_needed=2, tag="t")
    with pytest.raises(NotOffered, match="not yours"):
        store.submit_vote(ann, bid, "a", "tok-ann-1", 2.0)  # never shown to ann
    assert store.next_battle(ann).id == bid
    expire(store, ann)
    with pytest.raises(NotOffered, match="expired"):
        store.submit_vote(ann, bid, "a", "tok-ann-1", 2.0)
    assert store.next_battle(ann).id == bid  # shown again: held again
    first = store.submit_vote(ann, bid, "a", "tok-ann-1", 2.0)
    again = store.submit_vote(ann, bid, "a", "tok-ann-1", 2.0)  # a double click
    other_tab = store.submit_vote(ann, bid, "b", "tok-ann-2", 2.0)  # one vote per labeler per battle
    assert first.created and not again.created and not other_tab.created and first.id == again.id == other_tab.id
    assert [v.choice for v in store.votes()] == ["a"]
    assert store.next_battle(ann) is None  # never a battle they voted on
    with pytest.raises(ValueError, match="someone else"):
        store.submit_vote(bob, bid, "b", "tok-ann-1", 2.0)  # ann's token is not bob's
    with pytest.raises(ValueError, match="not one of"):
        store.submit_vote(bob, bid, "left", "tok-bob-1", 2.0)
    with pytest.raises(ValueError, match="does not exist"):
        store.submit_vote(bob, bid + 1000, "a", "tok-bob-1", 2.0, offered=False)
    assert store.next_battle(bob).id == bid
    assert store.submit_vote(bob, bid, "tie", "tok-bob-1", 1.0).created
    assert store.battle_progress("t") == (2, 2)


def test_votes_needed_is_never_exceeded_by_two_labelers(store):
    ann, bob, cat = (create_user(store, n, "label-pass-7") for n in ("ann", "bob", "cat"))
    b1, b2 = store.add_battles([row(n=1), row(n=2)], votes_needed=1, tag="t")
    assert store.next_battle(ann).id == b1 and store.next_battle(bob).id == b2  # held: each gets another
    assert store.next_battle(ann).id == b1  # ann still holds hers
    assert store.next_battle(cat) is None  # both battles' only vote is claimed
    with pytest.raises(NotOffered):
        store.submit_vote(bob, b1, "a", "tok-bob-1", 1.0)
    assert store.submit_vote(ann, b1, "a", "tok-ann-1", 1.0).created
    with pytest.raises(NotOffered, match="already has the 1 votes"):
        store.submit_vote(cat, b1, "b", "tok-cat-1", 1.0, offered=False)  # not even unoffered
    expire(store, bob)  # bob walked away: his battle goes to cat
    assert store.next_battle(cat).id == b2
    with pytest.raises(NotOffered):
        store.submit_vote(bob, b2, "b", "tok-bob-2", 1.0)
    assert store.submit_vote(cat, b2, "b", "tok-cat-2", 1.0).created
    assert [store.next_battle(u) for u in (ann, bob, cat)] == [None, None, None]
    assert store.battle_progress("t") == (2, 2) and [len(store.votes(battle_id=b)) for b in (b1, b2)] == [1, 1]


def test_concurrent_labelers_fill_each_battle_exactly(store):
    uids = [create_user(store, f"lab{i}", "label-pass-7") for i in range(5)]
    ids = store.add_battles([row(n=n) for n in range(4)], votes_needed=2, tag="c")
    errors = []

    def worker(uid):
        try:
            while (b := store.next_battle(uid)) is not None:
                store.submit_vote(uid, b.id, "a", f"t{uid}x{b.id}", 1.0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(u,)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for b in ids:
        voters = [v.user_id for v in store.votes(battle_id=b)]
        assert len(voters) == len(set(voters)) == 2
    assert store.battle_progress("c") == (8, 8)


def test_outcomes_map_votes_and_tags_select_a_set(store):
    uids = [create_user(store, f"lab{i}", "label-pass-7") for i in range(4)]
    [bid] = store.add_battles([row("model-mid-3b", "model-weak-1b")], votes_needed=4, tag="round-1")
    store.add_battles([row("model-strong-7b", "model-weak-1b")], votes_needed=1, tag="round-2")
    assert store.battle_progress("round-1") == (0, 4) and store.battle_progress("nothing") == (0, 0)
    for uid, choice in zip(uids, ["a", "b", "tie", "both_bad"]):
        assert store.next_battle(uid).id == bid  # the older battle first
        store.submit_vote(uid, bid, choice, f"tok{uid}", 1.0)
    pair = ("model-mid-3b", "model-weak-1b")
    assert store.battle_outcomes("round-1") == [(*pair, 1.0), (*pair, 0.0), (*pair, 0.5), (*pair, 0.5)]
    assert store.battle_outcomes("round-2") == [] and store.battle_progress("round-2") == (0, 1)
    assert store.battle_progress("round-1") == (4, 4) and store.battle_progress() == (4, 5)
    assert len(store.battle_outcomes()) == 4


@pytest.mark.parametrize("bad, why", [
    ({"model_b": "model-strong-7b"}, "two different"),
    ({"model_a": ""}, "two different"),
    ({"model_a": "m" * 513}, "at most 512"),
    ({"answer_b": "ok\x00"}, "NUL"),
    ({"answer_a": None}, "must be a string"),
    ({"answer_a": "x" * 1_000_001}, "at most 1000000"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "user"),
    ({"prompt": [{"role": "user", "content": "a\x00"}]}, "NUL"),
])
def test_battles_are_bounded_and_added_all_or_none(store, bad, why):
    with pytest.raises(ValueError, match=why):
        store.add_battles([row(), {**row(), **bad}], votes_needed=2, tag="t")
    assert store.battle_progress() == (0, 0)


def test_battle_settings_are_bounded(store):
    for votes_needed, tag, why in ((0, "t", "votes_needed"), (1001, "t", "votes_needed"), (True, "t", "votes_needed"),
                                   (2, "t" * 129, "at most 128")):
        with pytest.raises(ValueError, match=why):
            store.add_battles([row()], votes_needed=votes_needed, tag=tag)
    [bid] = store.add_battles([{**row(), "prompt": "just a string ?"}])  # a string: one user turn
    b = store.battle(bid)
    assert b.prompt == [{"role": "user", "content": "just a string ?"}] and b.votes_needed == 2 and b.tag == ""


# ---------------------------------------------------------------- the page, through HTTP

def answer_on(page: str, side: str) -> str:
    return html.unescape(re.search(rf'id="answer-{side}">(.*?)</div>', page, re.S).group(1))


def vote_form(page: str, choice: str) -> dict:
    return {"csrf": csrf_of(page), "token": field(page, "token"), "started": field(page, "started"),
            "battle_id": field(page, "battle_id"), "choice": choice}


def assert_no_model_names(page: str) -> None:
    for m in MODELS:
        assert m not in page


def test_two_labelers_vote_until_empty_and_the_preferred_model_ranks_first(app, store):
    """Both prefer the strong model's answers; ann prefers mid over weak, bob calls those both bad."""
    rng = random.Random(0)
    rows = []
    for n in range(3):  # every pair of models on 3 prompts, the left model chosen at random
        for x, y in combinations(sorted(MODELS), 2):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            rows.append(row(a, b, n, prompt=[{"role": "user", "content": f"what is 2 plus 2 ? ({n})"}]))
    ids = store.add_battles(rows, votes_needed=2, tag="round-1")
    store.add_battles([row()], votes_needed=2, tag="other")  # another set: voted on, not in round-1's outcomes
    quality = {text: q for q, text in enumerate(["i do not know .", "maybe 4 ?", "the answer is 4 ."])}

    def choose(name: str, a: str, b: str) -> str:
        qa, qb = quality[a.rsplit(" #", 1)[0]], quality[b.rsplit(" #", 1)[0]]
        if name == "bob" and max(qa, qb) < 2:
            return "both_bad"
        return "a" if qa > qb else "b"

    clients = {"ann": login(app, "ann"), "bob": login(app, "bob")}
    assert 'href="/arena"' in clients["ann"].get("/").text  # in the navigation
    rounds = 0
    while True:
        pages = {name: c.get("/arena") for name, c in clients.items()}  # both hold a battle at once
        for p in pages.values():
            assert p.status_code == 200 and "<script" not in p.text
            assert_no_model_names(p.text)
        open_ = {name: p.text for name, p in pages.items() if "No battles left" not in p.text}
        if not open_:
            break
        for name, page in open_.items():
            a, b = answer_on(page, "a"), answer_on(page, "b")
            assert 'value="a"' in page and 'value="b"' in page and 'value="tie"' in page and 'value="both_bad"' in page
            r = clients[name].post("/arena", data=vote_form(page, choose(name, a, b)))
            assert r.status_code == 303 and r.headers["location"] == "/arena?done=vote", r.text
        rounds += 1
        assert rounds <= len(ids) + 2
    assert store.battle_progress("round-1") == (2 * len(ids), 2 * len(ids))
    assert all(len(store.votes(battle_id=b)) == 2 for b in ids)
    outcomes = store.battle_outcomes("round-1")
    assert len(outcomes) == 2 * len(ids)
    rated = ratings(outcomes, anchor="model-weak-1b", rounds=200)
    assert [r.model for r in rated] == ["model-strong-7b", "model-mid-3b", "model-weak-1b"]
    assert rated[0].elo > rated[1].elo > rated[2].elo == pytest.approx(1000.0)


def test_model_names_never_reach_the_page(app, store):
    [bid] = store.add_battles([{**row(), "model_a": "runs/secret-left/ppo", "model_b": "runs/secret-right/sft"}],
                              votes_needed=1, tag="t")
    ann, bob = login(app, "ann"), login(app, "bob")
    page = ann.get("/arena").text
    assert "the answer is 4 . #0" in page and "i do not know . #0" in page
    after = ann.post("/arena", data=vote_form(page, "a"), follow_redirects=True).text  # the flash and the empty page
    bob_page = bob.get("/arena").text
    refused = bob.post("/arena", data={"csrf": csrf_of(bob_page), "token": "bobtoken1", "started": "0",
                                       "battle_id": str(bid), "choice": "a"})
    assert refused.status_code == 409
    refused = refused.text
    for text in (page, after, bob_page, refused):
        assert "secret-left" not in text and "secret-right" not in text and "runs/" not in text
    assert "Vote saved" in after and "No battles left" in after


def test_hostile_answers_render_as_text(app, store):
    evil_a = '<script>alert("a")</script>'
    evil_b = '"><img src=x onerror=alert(1)><b>bold</b>'
    store.add_battles([{**row(), "answer_a": evil_a, "answer_b": evil_b,
                        "prompt": [{"role": "user", "content": "<script>alert('prompt')</script>"}]}], votes_needed=1)
    r = login(app, "ann").get("/arena")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script" not in r.text and "<img" not in r.text and "<b>" not in r.text
    assert "&lt;script&gt;alert(&#34;a&#34;)&lt;/script&gt;" in r.text and "&lt;img src=x onerror" in r.text
    assert answer_on(r.text, "a") == evil_a and answer_on(r.text, "b") == evil_b  # shown exactly, as text


def test_votes_need_login_csrf_an_offer_and_a_known_choice(app, store):
    [bid] = store.add_battles([row()], votes_needed=1)
    anon = TestClient(app, follow_redirects=False)
    assert anon.get("/arena").headers["location"].startswith("/login")
    ann, bob = login(app, "ann"), login(app, "bob")
    page = ann.get("/arena").text
    form = vote_form(page, "a")
    assert bob.get("/arena").status_code == 200 and "No battles left" in bob.get("/arena").text  # ann holds it
    r = bob.post("/arena", data={**form, "csrf": csrf_of(bob.get("/").text), "token": "bobtoken1"})
    assert r.status_code == 409 and "not yours" in r.text  # not offered to bob
    assert ann.post("/arena", data={**form, "csrf": "forged"}).status_code == 403
    for bad, status in (({"choice": "left"}, 422), ({"choice": ""}, 422), ({"battle_id": "x1"}, 400),
                        ({"battle_id": str(bid + 99)}, 404), ({"token": "<x>"}, 400)):
        assert ann.post("/arena", data={**form, **bad}).status_code == status, bad
    r1, r2 = ann.post("/arena", data=form), ann.post("/arena", data=form)  # a double click: one vote
    assert r1.headers["location"] == "/arena?done=vote" and r2.headers["location"] == "/arena?done=again"
    assert len(store.votes()) == 1 and store.battle_outcomes() == [("model-strong-7b", "model-weak-1b", 1.0)]
