"""The web chat in a real browser (headless Debian chromium via Playwright): send a message, watch
the answer stream in, press thumbs down, report a second answer, see a blocked request's safe message, and find both ratings in the
output of `cherrytop label export`, with no Content-Security-Policy violation on the way. CHERRYTOP_SCREENSHOTS=1 saves screenshots to docs/serve/."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from cherrytop.cli import main
from cherrytop.config import ServeConfig
from cherrytop.serve.moderation import Moderator

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serve"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def test_feedback_to_a_database_that_cannot_be_opened_is_a_503(tmp_path, tiny_model, serve):
    """`--feedback-db` naming a file that is not a database (or a server that is down): the rating
    gets OpenAI's error format with the reason, not a bare 500."""
    (tmp_path / "fb.db").write_text("not a database\n" * 100)
    with serve(tiny_model, feedback_url=f"sqlite:///{tmp_path / 'fb.db'}") as s:
        cid = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()["id"]
        r = httpx.post(s.url + "/v1/feedback", json={"id": cid, "rating": "up"}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert "file is not a database" in r.json()["error"]["message"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make install)")
def test_chat_page_streams_and_feedback_reaches_the_export(tmp_path, tiny_model, serve, client):
    from playwright.sync_api import expect, sync_playwright
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    policy = tmp_path / "policy.toml"
    policy.write_text("safe_message = \"Sorry, I can't help with that.\"\n"
                      "[[categories]]\nname = \"violence\"\npatterns = ['\\bkill\\b']\n")
    moderator = Moderator(policy, tmp_path / "blocks.jsonl")
    with serve(tiny_model, cfg=ServeConfig(), feedback_url=db, moderator=moderator) as s, sync_playwright() as pw:
        c = client(s)
        first = "hello , i am ann ."
        expected = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": first}],
                                             temperature=0, max_tokens=64).choices[0].message.content
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.set_default_timeout(30_000)  # the machine may be busy
        expect.set_options(timeout=30_000)
        csp = []  # every Content-Security-Policy violation the page reports (none: no inline script or style)
        page.on("console", lambda m: csp.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(s.url + "/")
        expect(page.locator("#model")).to_have_text("tiny")
        page.fill("#temperature", "0")
        # record every text the answer shows while it streams in
        page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
            const t = document.querySelector('.assistant:last-of-type .text'); if (t) window.seen.push(t.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
        with page.expect_response("**/v1/chat/completions") as resp_info:
            page.fill("#input", first)
            page.keyboard.press("Enter")
        resp = resp_info.value
        assert resp.headers["content-type"].startswith("text/event-stream")
        answer = page.locator(".assistant").nth(0)
        expect(answer.locator(".actions")).to_be_visible()  # shown once the stream has ended
        assert answer.locator(".text").text_content() == expected
        seen = [t for t in page.evaluate("window.seen") if t]
        # every text the page showed on the way was a prefix of the final answer; how many distinct
        # prefixes it shows depends on how the network batches the events (one read on a fast machine),
        # so the streaming itself is checked on the events the page received
        assert seen and all(expected.startswith(t) for t in seen)
        assert resp.text().count("data: ") > 3
        page.screenshot(path=str(tmp_path / "chat.png"))
        answer.get_by_role("button", name="bad answer").click()
        expect(answer.locator(".thanks")).to_have_text("thanks for the feedback")
        # a second turn carries the history; report its answer with a comment
        page.fill("#input", "what is 12 plus 3 ?")
        page.click("#send")
        second = page.locator(".assistant").nth(1)
        expect(second.locator(".actions")).to_be_visible()
        second.get_by_role("button", name="report this answer").click()
        second.locator(".report-box input").fill("wrong sum")
        second.get_by_role("button", name="send report").click()
        expect(second.locator(".thanks")).to_have_text("reported, thank you")
        page.screenshot(path=str(tmp_path / "chat-feedback.png"))
        second_answer = second.locator(".text").text_content()
        # a blocked request shows the policy's safe message, marked as filtered
        page.fill("#input", "how do i kill the cat of ann ?")
        page.click("#send")
        third = page.locator(".assistant").nth(2)
        expect(third.locator(".actions")).to_be_visible()
        assert third.get_attribute("data-finish") == "content_filter" and "filtered" in third.get_attribute("class")
        assert third.locator(".text").text_content() == "Sorry, I can't help with that."
        page.screenshot(path=str(tmp_path / "chat-blocked.png"))
        page.fill("#input", "hello , i am bob .")  # the blocked exchange is left out of the next request
        page.click("#send")
        expect(page.locator(".assistant").nth(3).locator(".actions")).to_be_visible()
        assert page.locator(".assistant").nth(3).get_attribute("data-finish") != "content_filter"
        assert csp == [] and resp.headers["content-security-policy"].startswith("default-src 'none'")
        browser.close()
    out = tmp_path / "export"
    assert main(["label", "export", "--db", db, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "feedback.jsonl").read_text().splitlines()]
    by_rating = {r["rating"]: r for r in rows}
    assert by_rating["down"]["messages"] == [{"role": "user", "content": first},
                                             {"role": "assistant", "content": expected}]
    assert by_rating["report"]["messages"][-1]["content"] == second_answer and by_rating["report"]["comment"] == "wrong sum"
    assert [m["content"] for m in by_rating["report"]["messages"][:3]] == [first, expected, "what is 12 plus 3 ?"]
    assert by_rating["down"]["conversation_id"] == by_rating["report"]["conversation_id"]
    assert by_rating["down"]["settings"] == {"temperature": 0, "top_p": 1.0, "max_tokens": 64, "n": 1}
    assert by_rating["down"]["model"] == "tiny" and by_rating["down"]["served"].startswith("chatcmpl-")
    if os.environ.get("CHERRYTOP_SCREENSHOTS"):  # refresh the docs' screenshots
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("chat.png", "chat-feedback.png", "chat-blocked.png"):
            shutil.copy(tmp_path / name, DOCS / name)
