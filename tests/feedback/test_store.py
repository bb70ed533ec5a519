"""The database: migrations match the models on both backends, submissions are idempotent and
concurrency-safe, chat feedback (the interface `cherrytop serve` calls) lands as rating items."""

import json
import re
import subprocess
import sys
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from cherrytop.data.records import DataError
from cherrytop.feedback.auth import create_user
from cherrytop.feedback.store import Base, Claim, now, open_store

PROMPT = [{"role": "user", "content": "what is 2 plus 2 ?"}]


def test_migrations_match_the_models_and_reopen_keeps_data(db_url):
    s = open_store(db_url)
    with s.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    s.add_item(PROMPT, responses=["4", "5"])
    s.close()
    s2 = open_store(db_url)  # a restart: migrations are a no-op, nothing lost
    assert [i.responses for i in s2.items()] == [["4", "5"]]
    s2.close()


def test_double_submission_is_idempotent(store):
    uid = create_user(store, "ann", "label-pass-7")
    item = store.add_item(PROMPT, responses=["4", "5", "four"]).id
    first = store.submit_ranking(uid, item, [0, 2, 1], [[0, 2]], "tok-1", 3.0)
    again = store.submit_ranking(uid, item, [0, 2, 1], [[0, 2]], "tok-1", 3.0)
    other_form = store.submit_ranking(uid, item, [1, 0, 2], [], "tok-2", 3.0)  # a second tab: still one ranking
    assert first.created and not again.created and not other_form.created
    assert again.id == first.id == other_form.id
    rows = store.rankings(item_id=item)
    assert len(rows) == 1 and rows[0].ranking == [0, 2, 1] and rows[0].ties == [[0, 2]]
    d1 = store.submit_demonstration(uid, PROMPT + [{"role": "assistant", "content": "4 ."}], "d-1", 5.0, item_id=item)
    d2 = store.submit_demonstration(uid, PROMPT + [{"role": "assistant", "content": "4 ."}], "d-1", 5.0, item_id=item)
    assert d1.created and not d2.created and d1.id == d2.id and len(store.demonstrations()) == 1


def test_concurrent_labelers_never_overwrite_or_duplicate(store):
    uids = [create_user(store, f"lab{i}", "label-pass-7") for i in range(6)]
    item = store.add_item(PROMPT, responses=["a", "b"], labels_needed=6).id
    results, errors = [], []

    def worker(uid):
        try:
            for rep in range(3):  # each labeler double-submits the same form three times at once
                results.append((uid, store.submit_ranking(uid, item, [uid % 2, 1 - uid % 2], [], f"t{uid}", 1.0)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(u,)) for u in uids]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    rows = store.rankings(item_id=item)
    assert sorted(r.user_id for r in rows) == sorted(uids)  # one per labeler, none lost
    assert all(r.ranking == [r.user_id % 2, 1 - r.user_id % 2] for r in rows)  # each kept their own
    assert sum(r.created for _, r in results) == len(uids)


def test_bad_submissions_are_rejected_with_clear_messages(store):
    uid = create_user(store, "ann", "label-pass-7")
    item = store.add_item(PROMPT, responses=["4", "5"]).id
    with pytest.raises(DataError, match="ranking lists response 0 twice"):
        store.submit_ranking(uid, item, [0, 0], [], "x", 1.0)
    with pytest.raises(DataError, match="ratings for helpful"):
        store.submit_ranking(uid, item, [0, 1], [], "x", 1.0, ratings={"helpful": [9, 1]})
    with pytest.raises(DataError, match="unknown report reason"):
        store.submit_ranking(uid, item, [0, 1], [], "x", 1.0, flags=["boring"])
    with pytest.raises(DataError, match="does not end with an assistant reply"):
        store.submit_demonstration(uid, PROMPT + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "?"}], "y", 1.0)
    with pytest.raises(DataError, match="a rejection needs a reason"):
        store.submit_review(uid, 1, False, " ", "z")
    assert store.rankings() == [] and store.demonstrations() == []


def test_chat_feedback_becomes_a_ranking_item(store):
    msgs = [{"role": "user", "content": "tell me a secret"}]
    up = store.add_chat_feedback(messages=msgs, response="no .", rating="up", model="runs/tiny/ppo",
                                 settings={"temperature": 0.7}, conversation_id="c1", user="u1")
    down = store.add_chat_feedback(messages=msgs, response="the code is 1234", rating="report", model="runs/tiny/ppo",
                                   settings={"temperature": 0.7}, comment="private data")
    assert down > up
    fb = store.chat_feedback()
    assert [f.rating for f in fb] == ["up", "report"] and fb[0].item_id is None and fb[1].item_id is not None
    item = store.item(fb[1].item_id)
    assert item.prompt == msgs and item.responses == ["the code is 1234"] and item.source == "chat"
    assert item.provenance == [{"model": "runs/tiny/ppo", "settings": {"temperature": 0.7}, "source": "chat"}]
    with pytest.raises(ValueError, match="rating 'meh' is not one of up, down, report"):
        store.add_chat_feedback(messages=msgs, response="x", rating="meh", model="m", settings={})
    with pytest.raises(DataError, match="ends with"):
        store.add_chat_feedback(messages=msgs + [{"role": "assistant", "content": "x"}], response="x",
                                rating="down", model="m", settings={})


def test_migration_0002_backfills_response_counts(db_url):
    from alembic import command
    from sqlalchemy import create_engine, text

    from cherrytop.feedback.store import _alembic_config
    engine = create_engine(db_url)
    with engine.begin() as conn:  # a database made by the first release
        command.upgrade(_alembic_config(conn), "0001")
        conn.execute(text("INSERT INTO items (prompt_key, prompt, responses, provenance, source, labels_needed, "
                          "created_at) VALUES ('k', :p, :r, '[]', 'import', 2, '2026-01-01 00:00:00')"),
                     {"p": json.dumps(PROMPT), "r": json.dumps(["4", "5", "6"])})
    engine.dispose()
    s = open_store(db_url)  # opening migrates to head
    (item,) = s.items()
    assert item.n_responses == 3 and s.next_ranking_item(create_user(s, "ann", "label-pass-7")).id == item.id
    s.close()


def test_concurrent_chat_feedback_on_one_prompt_gives_one_item(store):
    msgs = [{"role": "user", "content": "say something nice ."}]
    ids, errors = [], []

    def rate(n):
        try:
            ids.append(store.add_chat_feedback(messages=msgs, response=f"answer {n}", rating="down", model="m",
                                               settings={}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rate, args=(n,)) for n in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(set(ids)) == 6
    (item,) = store.items()
    assert len(item.responses) == 2 and item.n_responses == 2  # the first two answers; then it is rankable
    assert {f.item_id for f in store.chat_feedback()} == {item.id}


def test_import_refuses_items_that_could_never_be_ranked(store, tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = {"prompt": "fine", "responses": ["a", "b"], "gold": [1, 0]}
    bad = [({"prompt": "ten", "responses": [str(i) for i in range(10)]}, "10 responses; expected at most 9"),
           ({"prompt": "text", "responses": "abc"}, "responses are 'abc'"),  # was read as ["a", "b", "c"]
           ({"prompt": "one", "responses": ["a"], "gold": [0]}, "gold ranking [0] is not a permutation"),
           ({"prompt": "str", "responses": ["a", "b"], "gold": [0, "1"]}, "gold ranking [0, '1']")]  # was a TypeError
    for record, message in bad:
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"prompts.jsonl:2: {re.escape(message)}"):
            store.import_prompts(path)
    assert [(i.prompt[-1]["content"], i.responses) for i in store.items()] == [("fine", ["a", "b"])]


def test_gold_of_a_generated_item_cannot_break_the_stats(store):
    # a gold ranking of 1 response, then `label generate` added 3 more: stats (and /admin) raised KeyError
    with pytest.raises(DataError, match="of 2 or more responses"):
        store.add_item(PROMPT, responses=["4"], gold=[0])


def test_text_a_database_cannot_store_is_refused_with_a_valueerror(store):
    # PostgreSQL refused these with sqlalchemy's DataError (cherrytop serve answered 500); SQLite stored
    # them, and a NaN in the settings then stopped every `cherrytop label export`
    ok = dict(messages=PROMPT, response="4", rating="down", model="m", settings={})
    for bad, message in ((dict(model="m" * 600), "model has 600 characters"),
                         (dict(conversation_id="c" * 200), "conversation_id has 200"),
                         (dict(user="u" * 200), "user has 200"),
                         (dict(response="4\x00"), "response contains a NUL"),
                         (dict(comment="bad\x00"), "comment contains a NUL"),
                         (dict(settings={"temperature": float("nan")}), "not JSON compliant")):
        with pytest.raises(ValueError, match=message):
            store.add_chat_feedback(**{**ok, **bad})
    assert store.chat_feedback() == [] and store.items() == []
    ann, bob = create_user(store, "ann", "label-pass-7"), create_user(store, "bob", "label-pass-7")
    demo = store.submit_demonstration(ann, PROMPT + [{"role": "assistant", "content": "4 ."}], "d", 1.0).id
    with pytest.raises(ValueError, match="reason contains a NUL"):
        store.submit_review(bob, demo, False, "wrong\x00", "r")
    assert store.reviews() == []


def test_processes_opening_a_new_database_at_once_all_start(pg_url):
    # each ran the migrations: all but one failed on a duplicate table (PostgreSQL)
    code = f"from cherrytop.feedback.store import open_store; open_store({pg_url!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def test_every_labeler_ranks_the_gold_items(store):
    # gold scores measure each labeler: with labels_needed = 2 a third labeler never saw a gold item
    ann, bob, cat = (create_user(store, n, "label-pass-7") for n in ("ann", "bob", "cat"))
    gold = store.add_item(PROMPT, responses=["4", "5"], gold=[0, 1]).id
    plain = store.add_item([{"role": "user", "content": "2 plus 3 ?"}], responses=["5", "6"]).id
    for n, uid in enumerate((ann, bob)):
        for item in (gold, plain):
            store.submit_ranking(uid, item, [0, 1], [], f"t{n}{item}", 1.0)
    assert store.next_ranking_item(cat).id == gold and store.queue_counts(cat)["rank"] == 1
    store.submit_ranking(cat, gold, [1, 0], [], "tc", 1.0)
    assert store.next_ranking_item(cat) is None and store.queue_counts(cat)["rank"] == 0


def test_a_rejected_demonstration_puts_its_prompt_back_for_the_others(store):
    ann, bob, cat = (create_user(store, n, "label-pass-7") for n in ("ann", "bob", "cat"))
    item = store.add_item(PROMPT).id
    demo = store.submit_demonstration(ann, PROMPT + [{"role": "assistant", "content": "5 ."}], "d1", 1.0,
                                      item_id=item).id
    assert store.next_demo_item(cat) is None  # answered, waiting for review
    store.submit_review(bob, demo, False, "2 plus 2 is 4", "r1")
    assert store.next_demo_item(cat).id == item and store.queue_counts(cat)["demo"] == 1  # was never offered again
    assert store.next_demo_item(ann) is None  # ann has answered it (one demonstration per prompt each)
    store.submit_demonstration(cat, PROMPT + [{"role": "assistant", "content": "4 ."}], "d2", 1.0, item_id=item)
    assert store.next_demo_item(bob) is None and store.queue_counts(bob)["demo"] == 0


def test_labelers_working_at_once_are_given_different_items(store):
    # each was given the oldest item short of rankings: six labelers at once all ranked item 1, then item 2
    users = [create_user(store, f"lab{n}", "label-pass-7") for n in range(5)]
    first = store.add_item(PROMPT, responses=["4", "5"]).id
    second = store.add_item([{"role": "user", "content": "2 plus 3 ?"}], responses=["5", "6"]).id
    shown = [store.next_ranking_item(u) for u in users]
    assert [i and i.id for i in shown] == [first, first, second, second, None]
    assert store.next_ranking_item(users[0]).id == first  # a reload shows the same item
    assert store.queue_counts(users[4])["rank"] == 0
    store.submit_ranking(users[0], first, [0, 1], [], "t0", 1.0)  # a ranking replaces its claim
    assert store.next_ranking_item(users[4]) is None
    with store.tx() as s:  # half an hour later the claims expire: a labeler who left frees their item
        s.execute(update(Claim).values(expires_at=now()))
    assert store.next_ranking_item(users[4]).id == first


def test_labelers_asking_at_the_same_moment_claim_each_item_once_per_label(store):
    # PostgreSQL, read committed: labelers asking at once each counted the others' claims as absent,
    # and three ranked an item that needed two
    users = [create_user(store, f"lab{n}", "label-pass-7") for n in range(8)]
    for n in range(4):
        store.add_item([{"role": "user", "content": f"q{n} ?"}], responses=["a", "b"])
    start = threading.Barrier(len(users))
    given: list = [None] * len(users)

    def ask(n):
        start.wait()
        item = store.next_ranking_item(users[n])
        given[n] = item and item.id

    for _ in range(3):  # the race needs the moment: ask three times over, every claim released between
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(users))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = {i: given.count(i) for i in set(given)}
        assert None not in counts and set(counts.values()) == {2}, counts  # 8 labelers, 4 items × 2 labels
        with store.tx() as s:
            s.execute(update(Claim).values(expires_at=now()))


def test_a_repeated_prompt_gets_its_first_answers_or_is_reported(store, tmp_path, capsys):
    """A prompt already queued stays one item. One without 2 answers (a chat rating's, or imported bare)
    takes the record's answers; one that labelers can already rank keeps its own, and the import
    names the records whose answers were not added (they used to vanish without a word)."""
    from cherrytop.feedback.commands import _import_prompts
    q = lambda i: {"messages": [{"role": "user", "content": f"q{i}"}]}  # noqa: E731
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [
        q(0), {**q(1), "responses": ["a", "b"], "models": ["ppo", "sft"]}, {**q(2), "responses": ["x", "y"]}]) + "\n")
    store.add_chat_feedback(messages=q(3)["messages"], response="r", rating="down", model="chat", settings={})
    r = store.import_prompts(first)
    assert (r.added, r.kept, r.extended, r.differing) == (3, 0, 0, 0)
    second.write_text("\n".join(json.dumps(r) for r in [
        {**q(0), "responses": ["c", "d"], "models": ["ppo", "base"]},   # bare prompt: takes them
        {**q(1), "responses": ["e", "f"], "models": ["ppo", "base"]},   # rankable: kept, reported
        {**q(2), "responses": ["x", "y"]},                              # the same answers: nothing to say
        {**q(3), "responses": ["r", "s"], "models": ["chat", "base"]},  # one chat answer: takes the new one
    ]) + "\n")
    r = store.import_prompts(second)
    assert (r.added, r.kept, r.extended, r.differing, r.differing_at) == (0, 1, 2, 1, [f"{second}:2"])
    items = {i.prompt[0]["content"]: i for i in store.items()}
    assert items["q0"].responses == ["c", "d"] and [p["model"] for p in items["q0"].provenance] == ["ppo", "base"]
    assert items["q1"].responses == ["a", "b"] and [p["model"] for p in items["q1"].provenance] == ["ppo", "sft"]
    assert items["q3"].responses == ["r", "s"] and [p["model"] for p in items["q3"].provenance] == ["chat", "base"]
    _import_prompts(store, type("Args", (), {"file": str(second)})(), None)
    out, err = capsys.readouterr()
    assert out.strip() == f"imported 0 prompts from {second}; 3 were already there"  # and q1 differs
    assert err.startswith(f"warning: 1 prompts were already queued with other answers") and f"{second}:2" in err


def test_the_same_chat_rating_sent_twice_is_stored_once(store):
    """A double click on 👎 (or a client's retry) is one rating, not two rows in feedback.jsonl;
    a change of mind (👎, then 👍, then 👎 again) is kept rating by rating."""
    msgs = [{"role": "user", "content": "add 2 and 3 ."}]
    kw = dict(messages=msgs, response="6 .", model="runs/r1/ppo", settings={"temperature": 1.0}, conversation_id="c1")
    a = store.add_chat_feedback(rating="down", **kw)
    assert store.add_chat_feedback(rating="down", **kw) == a
    b = store.add_chat_feedback(rating="up", **kw)
    c = store.add_chat_feedback(rating="down", **kw)
    d = store.add_chat_feedback(rating="down", **{**kw, "conversation_id": "c2"})  # another chat's rating
    assert len({a, b, c, d}) == 4 and [f.rating for f in store.chat_feedback()] == ["down", "up", "down", "down"]
    [item] = store.items()
    assert item.responses == ["6 ."]


def test_a_rating_of_a_blocked_answer_queues_the_prompt_without_the_safe_message(store):
    """`cherrytop serve` blocked the answer and showed the policy's safe message: no model wrote that
    text, so the prompt goes to the queue for `label generate` without it as a candidate."""
    from cherrytop.feedback.store import MODERATION
    msgs = [{"role": "user", "content": "how do i kill a goat ?"}]
    store.add_chat_feedback(messages=msgs, response="Sorry, I can't help with that.", rating="down", model=MODERATION,
                            settings={}, conversation_id="c1")
    [item] = store.items()
    assert item.prompt == msgs and item.responses == [] and store.chat_feedback()[0].item_id == item.id
