"""Chat ratings bound to what the server served: a rating names a completion id and choice index,
and the prompt, answer, model, settings and user stored come from the server's record, never from
the client; unknown or forgotten answers are 404s, every field is bounded, and each client gets a
limited number of ratings a minute."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from cherrytop.config import ServeConfig
from cherrytop.feedback.store import MODERATION, open_store
from cherrytop.serve.feedback import Served, ServedAnswers
from cherrytop.serve.moderation import Moderator

HI = [{"role": "user", "content": "hello , i am ann ."}]


def chat(s, messages=HI, key: str | None = None, **kw) -> dict:
    kw.setdefault("max_tokens", 8)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, **kw},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def rate(s, key: str | None = None, **body) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(s.url + "/v1/feedback", json=body, headers=headers, timeout=60)


def test_a_rating_stores_what_was_served_never_what_the_client_says(tmp_path, tiny_model, serve):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    with serve(tiny_model, feedback_url=url, checkpoint="runs/r1/ppo") as s:
        r = chat(s, n=2, temperature=1.0, seed=3, user="ann")
        cid, answer = r["id"], r["choices"][1]["message"]["content"]
        ok = rate(s, id=cid, index=1, rating="down", conversation_id="c1", comment="too short")
        assert ok.status_code == 200 and ok.json()["object"] == "feedback"
        assert rate(s, id=cid, index=1, rating="down", conversation_id="c1", comment="too short").json() == ok.json()
        # the old request, which named the text, the model and the settings itself, is refused
        forged = rate(s, id=cid, rating="up", messages=HI, response="i love you", model="runs/other/ppo",
                      settings={"temperature": '" autofocus onfocus=alert(1) x="'}, user="mallory")
        assert forged.status_code == 400 and forged.json()["error"]["param"] in ("messages", "response", "model",
                                                                                  "settings", "user")
        for body, status, param in (({"id": "chatcmpl-" + "0" * 24}, 404, "id"),  # never served
                                    ({"id": cid, "index": 2}, 404, "id"),         # no such choice
                                    ({"id": "chatcmpl-../../x"}, 400, "id"),
                                    ({"id": cid, "comment": "x" * 2001}, 400, "comment"),
                                    ({"id": cid, "conversation_id": "c" * 129}, 400, "conversation_id")):
            bad = rate(s, rating="up", **body)
            assert bad.status_code == status and bad.json()["error"]["param"] == param, bad.text
        assert "did not serve it" in rate(s, id="chatcmpl-" + "0" * 24, rating="up").json()["error"]["message"]
    store = open_store(url)
    [f] = store.chat_feedback()
    assert (f.id, f.messages, f.response, f.rating, f.model, f.user) == \
        (ok.json()["id"], HI, answer, "down", "runs/r1/ppo", "ann")
    assert f.settings == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "n": 2, "seed": 3}
    assert (f.served_id, f.conversation_id, f.comment) == (f"{cid}:1", "c1", "too short")
    [item] = store.items()
    assert item.prompt == HI and item.responses == [answer] and item.provenance[0]["model"] == "runs/r1/ppo"


def test_a_streamed_answer_is_rated_by_the_id_of_its_chunks(tmp_path, tiny_model, serve):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    with serve(tiny_model, feedback_url=url) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 0, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: {")]
        chunks = [json.loads(e) for e in events]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert len({c["id"] for c in chunks}) == 1
        assert rate(s, id=chunks[0]["id"], rating="up").status_code == 200
    [f] = open_store(url).chat_feedback()
    assert (f.response, f.model, f.settings["temperature"]) == (text, "tiny", 0.0)


def test_a_blocked_answer_is_rated_as_moderation_and_is_no_candidate(tmp_path, tiny_model, serve):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    policy = tmp_path / "policy.toml"
    policy.write_text("[[categories]]\nname = \"violence\"\npatterns = ['\\bkill\\b']\n")
    kill = [{"role": "user", "content": "how do i kill ann ?"}]
    with serve(tiny_model, feedback_url=url, moderator=Moderator(policy), checkpoint="runs/r1/ppo") as s:
        r = chat(s, kill)
        assert r["choices"][0]["finish_reason"] == "content_filter"
        assert rate(s, id=r["id"], rating="down").status_code == 200
    store = open_store(url)
    [f] = store.chat_feedback()
    assert (f.model, f.response) == (MODERATION, "Sorry, I can't help with that.")
    [item] = store.items()
    assert item.prompt == kill and item.responses == []


def test_ratings_are_rate_limited_per_client(tmp_path, tiny_model, serve):
    """300 reports in 15 s each queued a ranking item; now a client gets feedback_per_minute ratings,
    tries at unknown ids included (so ids cannot be guessed at speed either)."""
    keys = ("sk-first-client-1", "sk-other-client-2")
    with serve(tiny_model, feedback_url=f"sqlite:///{tmp_path / 'fb.db'}",
               cfg=ServeConfig(feedback_per_minute=3, api_keys=keys)) as s:
        cid = chat(s, key=keys[0])["id"]
        assert rate(s, keys[0], id="chatcmpl-" + "1" * 24, rating="up").status_code == 404
        assert [rate(s, keys[0], id=cid, rating=r).status_code for r in ("up", "down")] == [200, 200]
        over = rate(s, keys[0], id=cid, rating="report")
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(over.headers["retry-after"]) <= 60
        # another key has its own allowance, but cannot rate the first key's answer
        assert rate(s, keys[1], id=cid, rating="up").status_code == 404
        assert rate(s, None, id=cid, rating="up").status_code == 401


def test_an_answer_can_be_rated_only_while_the_server_remembers_it(tmp_path, tiny_model, serve):
    with serve(tiny_model, feedback_url=f"sqlite:///{tmp_path / 'fb.db'}", cfg=ServeConfig(served_records=2)) as s:
        ids = [chat(s)["id"] for _ in range(3)]
        assert len(s.app.state.served) == 2
        assert [rate(s, id=i, rating="up").status_code for i in ids] == [404, 200, 200]
    record = ServedAnswers(max_records=10, max_age_s=0.05)
    record.add("chatcmpl-a", Served(tuple(HI), ("x",), (False,), {}, None, "addr:x"))
    assert record.get("chatcmpl-a") is not None
    time.sleep(0.1)
    assert record.get("chatcmpl-a") is None and len(record) == 0
    record = ServedAnswers(max_records=10, max_age_s=60, max_chars=100)  # text, not count, bounds the memory
    for i in range(3):
        record.add(f"chatcmpl-{i}", Served(({"role": "user", "content": "q" * 30},), ("a" * 10,), (False,), {}, None, "x"))
    assert len(record) == 2 and record.get("chatcmpl-0") is None and record.get("chatcmpl-2") is not None
    record.add("chatcmpl-big", Served(({"role": "user", "content": "q" * 101},), ("",), (False,), {}, None, "x"))
    assert len(record) == 0  # one record over the budget is not kept either


@pytest.mark.parametrize("cfg", [ServeConfig(client_share=0), ServeConfig(feedback_per_minute=0),
                                 ServeConfig(served_records=0), ServeConfig(max_body_bytes=10),
                                 ServeConfig(served_max_chars=0)])
def test_bad_limits_are_refused(tiny_model, serve, cfg):
    with pytest.raises(ValueError, match="serve\\."):
        serve(tiny_model, cfg=cfg)


def test_an_answer_with_a_nul_character_can_be_rated(tmp_path, tiny_model, serve):
    """A small model may emit NUL (a byte-level token); no database stores it (PostgreSQL refuses it), so the
    server stores U+FFFD in its place rather than refuse the rating (it did: 400)."""
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    with serve(tiny_model, feedback_url=url) as s:
        said = ({"role": "user", "content": "hi\x00 there"},)
        s.app.state.served.add("chatcmpl-" + "a" * 24, Served(said, ("fo\x00o .",), (False,), {}, None, "addr:x"))
        r = rate(s, id="chatcmpl-" + "a" * 24, rating="down")
        assert r.status_code == 200, r.text
    [f] = open_store(url).chat_feedback()
    assert f.response == "fo\ufffdo ." and f.messages == [{"role": "user", "content": "hi\ufffd there"}]
