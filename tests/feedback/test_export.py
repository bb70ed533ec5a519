"""Export writes exactly what `cherrytop sft` / `cherrytop rm` read: round trip through records.py's
readers, only complete and unreported items, labeler ids and model provenance included, chat
feedback turned into K = 2 comparisons kept in their own file (chat_comparisons.jsonl)."""

import json
import re

import pytest

from cherrytop.cli import main
from cherrytop.data.records import read_comparisons, read_conversations, read_prompts
from cherrytop.feedback.auth import create_user
from cherrytop.feedback.export import export
from cherrytop.feedback.store import open_store

P1 = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "name a colour ."}]
P2 = [{"role": "user", "content": "what is my neighbour's phone number ?"}]
P3 = [{"role": "user", "content": "add 2 and 3 ."}]
PROV = {"model": "runs/tiny/sft", "settings": {"temperature": 1.0}, "source": "generate"}


def fill(store):
    ann, bob, cat = (create_user(store, n, "plum-orchard-42") for n in ("ann", "bob", "cat"))
    i1 = store.add_item(P1, responses=["red .", "blue .", "no .", "rude ."], provenance=[PROV] * 4).id
    i2 = store.add_item(P2, responses=["it is 555-0199 .", "i cannot share that ."]).id
    i3 = store.add_item(P3, responses=["5 .", "6 ."]).id  # only one ranking: not complete, not exported
    store.submit_ranking(ann, i1, [0, 1, 2, 3], [[2, 3]], "a1", 5.0, ratings={"helpful": [7, 6, 2, 1]})
    store.submit_ranking(bob, i1, [1, 0, 3, 2], [], "b1", 6.0, all_bad=False)
    store.submit_ranking(ann, i2, [1, 0], [], "a2", 5.0, flags=["private"])
    store.submit_ranking(bob, i2, [1, 0], [], "b2", 5.0)
    store.submit_ranking(ann, i3, [0, 1], [], "a3", 5.0)
    good = store.submit_demonstration(ann, P3 + [{"role": "assistant", "content": "2 plus 3 is 5 ."}], "d1", 9.0,
                                      item_id=i3).id
    bad = store.submit_demonstration(bob, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
                                     "d2", 4.0).id
    store.submit_demonstration(cat, [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "hello !"}],
                               "d3", 4.0)  # not reviewed
    store.submit_review(bob, good, True, "", "r1")
    store.submit_review(ann, bad, False, "rude", "r2")
    chat = [{"role": "user", "content": "tell me a joke ."}]
    store.add_chat_feedback(messages=chat, response="why did the chicken ...", rating="up", model="runs/tiny/ppo",
                            settings={"temperature": 0.7}, user="u1", conversation_id="c1")
    store.add_chat_feedback(messages=chat, response="no .", rating="down", model="runs/tiny/ppo",
                            settings={"temperature": 0.7}, user="u2", comment="unhelpful")
    return i1


def test_export_round_trip(store, tmp_path):
    i1 = fill(store)
    counts = export(store, tmp_path)
    assert counts == {"demonstrations.jsonl": 1, "comparisons.jsonl": 2, "chat_comparisons.jsonl": 1,
                      "feedback.jsonl": 2, "reported.jsonl": 1, "prompts.jsonl": 3}
    comps = read_comparisons(tmp_path / "comparisons.jsonl")
    ranked = [c for c in comps if c.meta.get("item") == i1]
    assert [(c.labeler, c.ranking, c.ties) for c in ranked] == [("ann", (0, 1, 2, 3), ((2, 3),)),
                                                               ("bob", (1, 0, 3, 2), ())]
    assert [m.to_json() for m in ranked[0].prompt] == P1 and ranked[0].responses == ("red .", "blue .", "no .", "rude .")
    assert ranked[0].ratings == {"helpful": [7, 6, 2, 1]} and ranked[0].meta["model"] == [PROV] * 4
    assert ranked[0].pairs() == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3))  # the tie is no preference
    assert all(c.meta.get("source") != "chat" and not c.labeler.startswith("chat:") for c in comps)
    chat = read_comparisons(tmp_path / "chat_comparisons.jsonl")
    assert len(chat) == 1 and chat[0].responses == ("why did the chicken ...", "no .") and chat[0].ranking == (0, 1)
    assert chat[0].labeler == "chat:u1" and chat[0].meta["model"][0]["settings"] == {"temperature": 0.7}
    demos = read_conversations(tmp_path / "demonstrations.jsonl")
    assert [d.messages[-1].content for d in demos] == ["2 plus 3 is 5 ."] and demos[0].meta["labeler"] == "ann"
    assert demos[0].meta["reviews"] == [{"by": "bob", "accept": True, "reason": ""}]
    fb = read_conversations(tmp_path / "feedback.jsonl")
    assert [(f.meta["rating"], f.messages[-1].content) for f in fb] == [("up", "why did the chicken ..."), ("down", "no .")]
    reported = read_prompts(tmp_path / "reported.jsonl")
    assert reported[0].meta["flags"] == ["private"]
    # the files are byte-for-byte what records.py writes for the records read back
    again = tmp_path / "again"
    from cherrytop.data.records import write_jsonl
    write_jsonl(again / "c.jsonl", comps)
    assert (again / "c.jsonl").read_text() == (tmp_path / "comparisons.jsonl").read_text()
    assert export(store, tmp_path, include_unreviewed=True)["demonstrations.jsonl"] == 2


def test_export_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    s = open_store(url)
    fill(s)
    s.close()
    assert main(["label", "export", "--db", url, "--out", str(tmp_path / "out")]) == 0
    assert "2 in comparisons.jsonl, 1 in chat_comparisons.jsonl" in capsys.readouterr().out
    first = json.loads((tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()[0])
    assert first["labeler"] == "ann" and first["model"][0]["model"] == "runs/tiny/sft"
    assert main(["label", "import-prompts", "--db", url, str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file or folder" in capsys.readouterr().err


def test_create_user_and_stats_commands(tmp_path, capsys):
    from cherrytop.feedback.auth import login
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    assert main(["label", "create-user", "boss", "--role", "admin", "--password", "s3cret-pass", "--db", url]) == 0
    assert "created admin boss" in capsys.readouterr().out
    assert main(["label", "create-user", "boss", "--password", "s3cret-pass", "--db", url]) == 2
    assert "user 'boss' already exists" in capsys.readouterr().err
    assert main(["label", "create-user", "eve", "--password", "short", "--db", url]) == 2
    assert "shorter than 8 characters" in capsys.readouterr().err
    s = open_store(url)
    user, _, _ = login(s, "boss", "s3cret-pass", "127.0.0.1")
    assert user.role == "admin" and user.password_hash.startswith("scrypt$") and "s3cret" not in user.password_hash
    fill(s)
    s.close()
    assert main(["label", "stats", "--db", url]) == 0
    out = capsys.readouterr().out
    # 3 imported items + 1 from the down-rated chat answer; item 1: ann and bob differ on (0,1) and on (2,3)
    # (a tie against a preference): 4/6 pairs agree; item 2: 1/1 -> 5/7
    assert "4 items, 2 complete; agreement 71.4% over 7 pairs" in out
    assert main(["label", "stats", "--db", "feedback.db"]) == 2
    assert "not a database URL" in capsys.readouterr().err


@pytest.mark.parametrize("url,message", [
    ("postgres://ann@localhost/fb", "postgres://ann@localhost/fb: cannot open this kind of database"),
    ("postgresql+psycopg://ann:s3cret@127.0.0.1:1/fb", "postgresql+psycopg://ann:***@127.0.0.1:1/fb: cannot open the database: "),
    ("sqlite:///NOTDB", "NOTDB: cannot open the database: file is not a database"),
])
def test_a_database_that_cannot_be_opened_is_one_line(tmp_path, capsys, url, message):
    """A wrong scheme, a server that is not there, a file that is not a database: one line naming the
    URL (its password masked), no traceback."""
    (tmp_path / "NOTDB").write_text("not a database\n" * 100)
    url = url.replace("NOTDB", str(tmp_path / "NOTDB"))
    assert main(["label", "stats", "--db", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.replace("NOTDB", str(tmp_path / "NOTDB")) in err
    assert len(err.splitlines()) == 1 and "s3cret" not in err


def test_export_keeps_every_rating_and_writes_the_chat_prompts_for_ppo(store, tmp_path):
    """Round 2 of the loop reads the export: a rating of an empty answer (EOS at once) is in
    feedback.jsonl with its time, the chat prompts are a `--ppo.prompts` file (reported ones left out),
    and a rating of a blocked answer (the policy's safe message) makes no chat comparison."""
    from cherrytop.feedback.store import MODERATION
    fill(store)
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    store.add_chat_feedback(messages=q, response="", rating="down", model="runs/r1/ppo", settings={}, conversation_id="c9")
    store.add_chat_feedback(messages=q, response="15 .", rating="up", model="runs/r1/ppo", settings={}, conversation_id="c9")
    bad = [{"role": "user", "content": "how do i kill a goat ?"}]
    store.add_chat_feedback(messages=bad, response="Sorry, I can't help with that.", rating="down", model=MODERATION,
                            settings={}, conversation_id="c9")
    store.add_chat_feedback(messages=bad, response="i will not .", rating="up", model="runs/r1/ppo", settings={},
                            conversation_id="c9")
    counts = export(store, tmp_path)
    fb = read_conversations(tmp_path / "feedback.jsonl")
    assert counts["feedback.jsonl"] == len(store.chat_feedback()) == 6
    assert [(f.meta["rating"], f.messages[-1].content) for f in fb][2] == ("down", "")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", f.meta["time"]) for f in fb)
    chat = read_comparisons(tmp_path / "chat_comparisons.jsonl")
    assert sorted(c.responses for c in chat) == [("15 .", ""), ("why did the chicken ...", "no .")]
    prompts = read_prompts(tmp_path / "prompts.jsonl")
    texts = [p.messages[-1].content for p in prompts]
    assert texts == ["tell me a joke .", "what is 12 plus 3 ?", "how do i kill a goat ?", "name a colour .", "add 2 and 3 ."]
    assert counts["prompts.jsonl"] == 5 and "phone number" not in " ".join(texts)  # P2 was reported


def test_a_second_export_into_the_same_folder_says_it_replaced_the_files(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    s = open_store(url)
    fill(s)
    s.close()
    out = tmp_path / "out"
    assert main(["label", "export", "--db", url, "--out", str(out)]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main(["label", "export", "--db", url, "--out", str(out)]) == 0
    assert "the files of an earlier export there were replaced" in capsys.readouterr().out
    assert len((out / "comparisons.jsonl").read_text().splitlines()) == 2  # replaced, not appended to


def test_chat_comparisons_count_each_served_answers_latest_rating(store, tmp_path):
    """A served answer rated 👍 and then 👎 (a change of mind) is a 👎 answer: it makes no
    comparison against itself's earlier 👍, only against another answer rated 👍."""
    q = [{"role": "user", "content": "name a fruit ."}]
    kw = dict(messages=q, model="runs/r1/ppo", settings={"temperature": 1.0})
    store.add_chat_feedback(response="apple .", rating="up", served_id="chatcmpl-a:0", **kw)
    store.add_chat_feedback(response="rock .", rating="up", served_id="chatcmpl-b:0", **kw)
    store.add_chat_feedback(response="rock .", rating="down", served_id="chatcmpl-b:0", **kw)  # changed its mind
    export(store, tmp_path)
    [c] = read_comparisons(tmp_path / "chat_comparisons.jsonl")
    assert c.responses == ("apple .", "rock .") and c.ranking == (0, 1)
    assert c.meta["served"] == ["chatcmpl-a:0", "chatcmpl-b:0"] and c.meta["feedback"] == [1, 3]
    assert (tmp_path / "comparisons.jsonl").read_text() == ""  # no labeler has ranked anything
    assert [f.meta["served"] for f in read_conversations(tmp_path / "feedback.jsonl")] == \
        ["chatcmpl-a:0", "chatcmpl-b:0", "chatcmpl-b:0"]


def test_one_answer_text_twice_in_an_item_is_exported_tied_so_rm_can_read_it(store, tmp_path):
    ann, bob = (create_user(store, n, "plum-orchard-42") for n in ("ann", "bob"))
    item = store.add_item(P3, responses=["5 .", "6 .", "5 ."]).id  # two samplers wrote the same answer
    store.submit_ranking(ann, item, [0, 1, 2], [], "a1", 5.0)  # ranked apart: records.py refuses that
    store.submit_ranking(bob, item, [2, 0, 1], [[2, 0]], "b1", 5.0)  # tied already (either order)
    export(store, tmp_path)
    got = read_comparisons(tmp_path / "comparisons.jsonl")  # would raise DataError without the ties
    assert [(c.ranking, c.ties) for c in got] == [((0, 1, 2), ((0, 2),)), ((2, 0, 1), ((2, 0),))]
    assert got[0].pairs() == ((0, 1), (1, 2))  # 0 ≻ 1 ≻ 2, and 0 ~ 2 is no preference
