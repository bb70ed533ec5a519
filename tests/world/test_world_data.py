"""The world's data: splits never leak, everything is deterministic, sizes and formats are as promised."""

import dataclasses
import json
import re

import pytest

from cherrytop.world import KINDS, Task, World, WorldConfig
from cherrytop.world.corpus import doc_chars
from cherrytop.world.language import VOCAB, words

SMALL = WorldConfig(n_entities=60, corpus_chars=150_000)


@pytest.fixture(scope="module")
def world():
    return World(SMALL)


def texts(doc):
    """All text of a corpus document, a conversation or a Task."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, Task):
        doc = doc.messages
    return [m["content"] for m in doc]


def test_train_data_never_shows_heldout_entities_or_numbers(world):
    lang = world.lang
    assert len(lang.heldout_names) == 12 and len(lang.heldout_numbers) == SMALL.n_heldout_numbers
    heldout_numbers = {str(x) for x in lang.heldout_numbers}
    train = world.corpus("train") + world.demonstrations(660) + world.prompts(330) + world.tasks("train", 110)
    seen_names = set()
    for doc in train:
        for text in texts(doc):
            toks = set(re.findall(r"[a-z]+", text))
            assert not toks & lang.heldout_names, text
            assert not set(re.findall(r"\d+", text)) & heldout_numbers, text
            seen_names |= toks & set(lang.by_name)
    assert len(seen_names) > 40  # the train entities do occur
    # held-out arithmetic uses a held-out operand; held-out corpus uses held-out entities only
    for t in world.tasks("heldout", 110):
        if t.kind == "add":
            assert t.meta["a"] in lang.heldout_numbers
        for name in t.meta["world"]:
            assert name in lang.heldout_names
    for doc in world.corpus("heldout"):
        for text in texts(doc):
            assert set(re.findall(r"[a-z]+", text)) & set(lang.by_name) <= lang.heldout_names, text


def test_task_sets_share_no_prompt_text(world):
    sets = {(s, p): {t.prompt_text for t in world.tasks(s, n, p)}
            for s, p, n in [("train", "demo", 1100), ("train", "prompt", 550), ("train", "eval", 220),
                            ("heldout", "eval", 440), ("heldout", "prompt", 110), ("heldout", "demo", 55)]}
    sizes = {("train", "demo"): 1100, ("train", "prompt"): 550, ("train", "eval"): 220,
             ("heldout", "eval"): 440, ("heldout", "prompt"): 110, ("heldout", "demo"): 55}
    for a in sets:
        assert len(sets[a]) == sizes[a], a  # no repeats within a set either
        for b in sets:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    assert {t.prompt_text for t in world.prompts(550)} == sets[("train", "prompt")]


def test_tasks_round_robin_unique_ids_prefix_stable(world):
    ts = world.tasks("heldout", 44)
    assert [t.kind for t in ts] == list(KINDS) * 4
    assert len({t.id for t in ts}) == 44 and ts[17].id == "heldout-eval-list-00017"
    assert world.tasks("heldout", 13) == ts[:13]
    for t in ts:
        assert t.split == "heldout" and t.messages[-1]["role"] == "user"
        assert [m["role"] for m in t.messages] in (["user"], ["user", "assistant", "user"])


def test_determinism_and_seed():
    a, b = World(SMALL), World(dataclasses.replace(SMALL))
    assert a.corpus() == b.corpus() and a.corpus("heldout") == b.corpus("heldout")
    assert a.tasks("heldout", 30) == b.tasks("heldout", 30)
    assert a.demonstrations(30) == b.demonstrations(30)
    c = World(dataclasses.replace(SMALL, seed=1))
    assert c.corpus()[:50] != a.corpus()[:50]
    assert [t.prompt_text for t in c.tasks("heldout", 30)] != [t.prompt_text for t in a.tasks("heldout", 30)]


def test_record_round_trip(world):
    for t in world.tasks("heldout", 22) + world.prompts(22):
        rec = json.loads(json.dumps(t.to_record()))
        assert set(rec) == {"id", "kind", "split", "messages", "meta"}
        assert Task.from_record(rec) == t


def test_corpus_sizes_and_mix(world):
    docs = world.corpus("train")
    total = sum(doc_chars(d) for d in docs)
    assert 0.8 * SMALL.corpus_chars <= total <= 1.2 * SMALL.corpus_chars
    dialogues = [d for d in docs if not isinstance(d, str)]
    share = sum(doc_chars(d) for d in dialogues) / total
    assert abs(share - SMALL.corpus_dialogue_share) < 0.03
    assert all(d[-1]["role"] == "assistant" and d[-2]["role"] == "user" for d in dialogues)
    heldout = sum(doc_chars(d) for d in world.corpus("heldout"))
    assert 0.8 * 0.02 * SMALL.corpus_chars <= heldout <= 1.2 * 0.02 * SMALL.corpus_chars


def test_small_language(world):
    """Lowercase words from a small vocabulary, names, digits; tokens separated by single spaces."""
    names = set(world.lang.by_name) | set(world.lang.cities)
    docs = world.corpus("train")[:2000] + world.tasks("heldout", 220) + world.demonstrations(220)
    for doc in docs:
        for text in texts(doc):
            assert text == " ".join(words(text)), text
            for tok in text.split():
                assert tok.isdigit() or tok in VOCAB or tok in names or not tok.isalpha(), (tok, text)
    for t in world.tasks("heldout", 220):
        assert sum(len(m["content"].split()) for m in t.messages) <= 60
        assert len(t.meta["answer"].split()) <= 18


def test_corpus_has_the_configured_size():
    cfg = dataclasses.replace(WorldConfig(), corpus_chars=400_000)
    docs = World(cfg).corpus()
    assert abs(sum(doc_chars(d) for d in docs) / cfg.corpus_chars - 1) < 0.2


def test_bad_flawed_kind_is_named():
    with pytest.raises(ValueError, match="flawed_kinds.*'facts'"):
        World(dataclasses.replace(SMALL, flawed_kinds=("facts",)))


def test_a_stream_repeats_prompts_only_once_its_set_is_exhausted(world, monkeypatch):
    # `add` has ~80 x 9 x 3 train prompts, of which a share fall in the demo bucket: 2,000 draws exhaust it.
    from cherrytop.world import tasks as T
    calls = []
    real = T.GENERATORS["add"]
    monkeypatch.setitem(T.GENERATORS, "add", lambda *a: calls.append(1) or real(*a))
    stream = T.kind_stream(world.lang, 0, "add", "train", "demo")
    texts = [T.prompt_text(next(stream)[0]) for _ in range(2000)]
    n_unique = len(set(texts))
    assert 100 < n_unique < 2000
    assert len(set(texts[:n_unique])) == n_unique  # every prompt of the set once before any repeat
    draws_at_exhaustion = len(calls)
    for _ in range(500):  # from then on every draw that falls in the set is yielded, no 1000 rejections each
        next(stream)
    assert len(calls) - draws_at_exhaustion < 500 * 40
