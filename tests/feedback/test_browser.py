"""End to end in a real headless Chromium (Debian's, driven by Playwright): labeler A logs in, writes
a demonstration and ranks 4 answers (by drag and by keyboard, with a tie and ratings); labeler B
ranks the same item and reviews A's demonstration; the admin sees their agreement; export; and
`cherrytop rm` trains on the exported comparisons. A screenshot of every page is saved (under
$CHERRYTOP_SCREENSHOTS if set, e.g. docs/feedback, else a temporary folder)."""

import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from cherrytop.cli import main
from cherrytop.feedback.app import create_app
from cherrytop.feedback.auth import create_user
from cherrytop.feedback.stats import alpha
from cherrytop.feedback.store import open_store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make install)")

ANSWERS = ["the sky is blue .", "blue , because of rayleigh scattering of sunlight .", "green .", "i hate you ."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(store):
    """The labelling app over `store` on a free local port, in a thread, until the block ends; yields its URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(5)


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    store = open_store(url)
    for name, role in (("root", "admin"), ("ann", "labeler"), ("bob", "labeler")):
        create_user(store, name, "label-pass-7", role)
    store.add_item([{"role": "user", "content": "what colour is the sky , and why ?"}], responses=ANSWERS,
                   provenance=[{"model": "runs/tiny/sft", "settings": {"temperature": 1.0}, "source": "generate"}] * 4,
                   gold=[1, 0, 2, 3])
    store.add_item([{"role": "system", "content": "answer briefly ."}, {"role": "user", "content": "what is 2 plus 3 ?"}])
    with serving(store) as base:
        yield base, store, url
    store.close()


def test_label_rank_agree_export_train(server, tmp_path, tiny_model):
    from playwright.sync_api import expect, sync_playwright
    base, store, url = server
    shots = Path(os.environ.get("CHERRYTOP_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)

        def session(name):
            ctx = browser.new_context(viewport={"width": 1100, "height": 760})
            page = ctx.new_page()
            page.goto(f"{base}/")
            assert "/login" in page.url  # not logged in: sent to the login page
            page.fill("input[name=name]", name)
            page.fill("input[name=password]", "label-pass-7")
            return ctx, page

        def shot(page, name):
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        # ---- labeler A: demonstration, then a ranking by drag and keyboard
        ctx_a, a = session("ann")
        shot(a, "01-login")
        a.click("button[type=submit]")
        expect(a.locator("h1")).to_have_text("Hello, ann")
        shot(a, "02-home")
        a.click("text=Write a demonstration")
        expect(a.locator(".msg.user .content")).to_have_text("what is 2 plus 3 ?")
        a.fill("textarea[name=reply]", "2 plus 3 is 5 .")
        shot(a, "03-demo-reply")
        a.click("text=Submit demonstration")
        expect(a.locator(".flash")).to_contain_text("Saved")
        a.goto(f"{base}/demo?mode=free")
        a.click("#add-turn")
        a.locator("textarea[name=content]").nth(0).fill("hi !")
        a.locator("textarea[name=content]").nth(1).fill("hello ! how can i help ?")
        a.locator("textarea[name=content]").nth(2).fill("nothing , thanks .")
        a.click("#add-turn")
        a.locator("textarea[name=content]").nth(3).fill("you are welcome .")
        shot(a, "04-demo-conversation")
        a.click("text=Submit conversation")
        expect(a.locator(".flash")).to_contain_text("Saved")

        a.click("nav >> text=Rank")
        cards = a.locator("#ranklist .answer")
        expect(cards).to_have_count(4)
        shown = [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")]
        # drag the clearly best answer (index 1) to the top
        cards.nth(shown.index(1)).drag_to(cards.nth(0), target_position={"x": 30, "y": 4})
        order = [1] + [i for i in shown if i != 1]
        assert [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")] == order
        # keyboard: pick up the rude answer (3), move it to the bottom, drop it
        cards.nth(order.index(3)).focus()
        a.keyboard.press("Space")
        for _ in range(3 - order.index(3)):
            a.keyboard.press("ArrowDown")
        a.keyboard.press("Space")
        order = [i for i in order if i != 3] + [3]
        assert [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")] == order
        want = [1, 0, 2, 3]  # keyboard again: move "the sky is blue" (0) right below 1
        while order != want:
            pos = order.index(0)
            cards.nth(pos).focus()
            a.keyboard.press("Space")
            a.keyboard.press("ArrowUp" if pos > 1 else "ArrowDown")
            a.keyboard.press("Space")
            order = [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")]
        cards.nth(2).focus()
        a.keyboard.press("t")  # "green ." tied with "the sky is blue ."
        expect(cards.nth(1).locator(".pos")).to_have_text("2=")
        expect(cards.nth(2).locator(".pos")).to_have_text("2=")
        expect(cards.nth(3).locator(".pos")).to_have_text("4")
        for pos, (h, t) in enumerate([(7, 7), (5, 6), (2, 1), (1, 4)]):
            idx = order[pos]
            a.select_option(f"select[name=helpful_{idx}]", str(h))
            a.select_option(f"select[name=truthful_{idx}]", str(t))
        shot(a, "05-rank")
        a.click("text=Submit ranking")
        expect(a.locator(".flash")).to_contain_text("Saved")
        a.click("nav >> text=My work")
        shot(a, "06-my-work")
        a.locator("table a").first.click()
        shot(a, "07-my-ranking")
        mine = a.url
        ctx_a.close()

        (ranking_a,) = store.rankings()
        assert ranking_a.ranking == [1, 0, 2, 3] and ranking_a.ties == [[0, 2]]
        assert ranking_a.ratings["helpful"] == [5, 7, 2, 1] and ranking_a.ratings["truthful"] == [6, 7, 1, 4]
        assert len(store.demonstrations()) == 2

        # ---- labeler B: the same item by keyboard only (no tie), then a review; never sees A's work
        ctx_b, b = session("bob")
        b.keyboard.press("Enter")
        expect(b.locator("h1")).to_have_text("Hello, bob")
        b.goto(mine)
        expect(b.locator("p.error")).to_contain_text("not one of yours")
        b.goto(f"{base}/admin")
        expect(b.locator("p.error")).to_contain_text("admins only")
        shot(b, "08-error-403")
        b.goto(f"{base}/rank")
        cards = b.locator("#ranklist .answer")
        order = [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")]
        want = [1, 2, 0, 3]
        for target, idx in enumerate(want):  # selection sort with the keyboard
            pos = order.index(idx)
            cards.nth(pos).focus()
            b.keyboard.press("Space")
            for _ in range(pos - target):
                b.keyboard.press("ArrowUp")
            b.keyboard.press("Space")
            order = [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.index)")]
        assert order == want
        for idx, h in enumerate([4, 7, 3, 1]):
            b.select_option(f"select[name=helpful_{idx}]", str(h))
        b.check("input[name=all_bad]")
        b.click("text=Submit ranking")
        expect(b.locator(".flash")).to_contain_text("Saved")
        b.click("nav >> text=Review")
        expect(b.locator(".conv")).to_contain_text("2 plus 3 is 5 .")
        shot(b, "09-review")
        b.click("button[value=accept]")
        expect(b.locator(".flash")).to_contain_text("Saved")
        b.click("nav >> text=Review")
        b.fill("textarea[name=reason]", "fine, but too short to teach much")
        b.click("button[value=reject]")
        b.click("nav >> text=Rank")
        expect(b.locator("main")).to_contain_text("Nothing left for you to rank")
        shot(b, "10-rank-done")
        ctx_b.close()

        # ---- the admin sees both labelers and their agreement
        ctx_r, r = session("root")
        r.click("button[type=submit]")
        r.click("nav >> text=Admin")
        # A: 1 > 0 = 2 > 3, B: 1 > 2 > 0 > 3: pairs (0,1) (0,3) (1,2) (1,3) (2,3) agree, (0,2) tie vs 2>0 -> 5/6
        expect(r.locator("#agreement")).to_have_text("83.3 %")
        row_b = r.locator("#labelers tr", has_text="bob")
        expect(row_b).to_contain_text("83.3 %")  # agreement with ann, and gold score: only (0,2) differs
        helpful = alpha(np.array([[5, 7, 2, 1], [4, 7, 3, 1]], dtype=float))  # checked by hand in test_stats
        expect(r.locator("table.alpha tr", has_text="helpful")).to_contain_text(f"{helpful:.3f}")
        expect(r.locator("#between")).to_contain_text("ann")
        shot(r, "11-admin")
        r.click("text=Items")
        shot(r, "12-admin-items")
        r.locator("table a").first.click()
        expect(r.locator("main")).to_contain_text("runs/tiny/sft")
        shot(r, "13-admin-item")
        r.goto(f"{base}/admin/users")
        shot(r, "14-admin-users")
        ctx_r.close()
        browser.close()

    # ---- export, then the reward model trains on exactly that file
    out = tmp_path / "export"
    assert main(["label", "export", "--db", url, "--out", str(out)]) == 0
    assert len((out / "comparisons.jsonl").read_text().splitlines()) == 2
    assert len((out / "demonstrations.jsonl").read_text().splitlines()) == 1  # the accepted one
    assert main(["rm", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--rm.train.data={out / 'comparisons.jsonl'}",
                 f"--rm.train.init={tiny_model}", "--rm.epochs=0", "--rm.train.max_steps=2"]) == 0
    assert (tmp_path / "runs" / "test" / "rm" / "config.json").is_file()
    assert re.search(r'"train/loss"', (tmp_path / "runs" / "test" / "logs" / "rm.jsonl").read_text())


PWN = "window.__pwned=1;alert(1)"
EVIL = [f'"><img src=x onerror="{PWN}">', f"<script>{PWN}</script>", f"' autofocus onfocus='{PWN}",
        f'" tabindex=0 autofocus onfocus={PWN} x="']  # the last one broke out of `title="{{ settings|tojson }}"`


@pytest.fixture
def hostile_server(tmp_path):
    """A database holding markup in every field a page shows: prompts, answers, model names, free-form
    settings (as an anonymous chat rating may send), a demonstration and a review's reason."""
    store = open_store(f"sqlite:///{tmp_path / 'fb.db'}")
    root, ann, bob = (create_user(store, n, "label-pass-7", r) for n, r in (("root", "admin"), ("ann", "labeler"),
                                                                           ("bob", "labeler")))
    for bad in EVIL:  # names are letters, digits, - _ . only
        with pytest.raises(ValueError, match="not valid"):
            create_user(store, bad, "label-pass-7")
    prov = [{"model": e, "settings": {"x": e, "temperature": 0.7, EVIL[3]: EVIL[0]}, "source": e} for e in EVIL]
    item = store.add_item([{"role": "system", "content": EVIL[1]}, {"role": "user", "content": EVIL[0]}],
                          responses=EVIL, provenance=prov, gold=None).id
    store.add_item([{"role": "user", "content": EVIL[3]}], responses=EVIL[::-1], provenance=prov[::-1])
    store.add_item([{"role": "user", "content": EVIL[2]}])  # a prompt to answer
    assert store.next_ranking_item(ann).id == item
    ranking = store.submit_ranking(ann, item, [3, 2, 1, 0], [[2, 1]], "ann-rank-1", 5.0, flags=["spam"],
                                   ratings={"helpful": [1, 2, 3, 4]}, offered=True).id
    conv = [{"role": "user", "content": e} if i % 2 == 0 else {"role": "assistant", "content": e} for i, e in enumerate(EVIL)]
    demo = store.submit_demonstration(ann, conv, "ann-demo-1", 9.0).id
    store.submit_demonstration(bob, [{"role": "user", "content": EVIL[3]}, {"role": "assistant", "content": EVIL[0]}],
                               "bob-demo-1", 9.0)  # for the admin to review
    assert store.next_review(bob).id == demo
    store.submit_review(bob, demo, False, " ".join(EVIL), "bob-review-1", offered=True)
    with serving(store) as base:
        yield base, item, ranking
    store.close()


def test_attack_page_runs_no_script_in_the_admins_browser(hostile_server):
    """The admin (and a labeler) open every page that shows the hostile text: no script runs (no
    alert, `window.__pwned` unset), no element gets an event handler, and the text shows as text."""
    from playwright.sync_api import expect, sync_playwright
    base, item, ranking = hostile_server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for name, paths in (("root", ["/admin", "/admin/items", f"/admin/items/{item}", "/admin/users",
                                      f"/mine/rankings/{ranking}", "/review", "/rank", "/demo", "/mine"]),
                            ("ann", ["/mine", "/rank", "/demo", "/"])):
            ctx = browser.new_context()
            page = ctx.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/login")
            page.fill("input[name=name]", name)
            page.fill("input[name=password]", "label-pass-7")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text(f"Hello, {name}")
            for path in paths:
                page.goto(f"{base}{path}")
                page.wait_for_load_state("load")
                for cell in page.locator("td, .content, summary").all()[:40]:  # hover what might carry a handler
                    if cell.is_visible():
                        cell.hover(timeout=2000)
                page.keyboard.press("Tab")
                page.wait_for_timeout(50)
                assert page.evaluate("window.__pwned") is None and dialogs == [], (name, path)
                handlers = page.evaluate("""() => [...document.querySelectorAll('*')].flatMap(e =>
                    [...e.attributes].map(a => a.name).filter(n => n.startsWith('on') || n === 'autofocus' && !['TEXTAREA', 'INPUT'].includes(e.tagName)))""")
                assert handlers == [], (name, path, handlers)
                shown = {("root", f"/admin/items/{item}"): EVIL[0], ("root", f"/mine/rankings/{ranking}"): EVIL[0],
                         ("root", "/review"): EVIL[3], ("ann", "/mine"): EVIL[1], ("ann", "/rank"): EVIL[3],
                         ("ann", "/demo"): EVIL[2]}.get((name, path))
                if shown:  # the markup is on the page as text
                    expect(page.locator("main")).to_contain_text(shown)
            ctx.close()
        browser.close()
