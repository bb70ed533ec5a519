"""Comparisons: the edited answers `compare.edits` puts among the K (one small change each, of the
prompt's most frequent sample), and how the labelers and the reward model's accuracy treat them."""

import random

import pytest

from cherrytop.config import ConfigError, WorldConfig, load_config
from cherrytop.stages.compare import edit, with_edits
from cherrytop.world import World, grade
from cherrytop.world.tasks import HELPFUL_KINDS

IDK = "i do not know ."


@pytest.mark.parametrize("seed", range(20))
def test_each_edit_is_one_small_change(seed):
    rng = random.Random(seed)
    listing = "boat , beans , sun , bag ."
    # repeat: one word doubled in place
    out = edit(listing, "repeat", [], IDK, rng).split()
    src = listing.split()
    assert len(out) == len(src) + 1 and any(out[:i] + out[i + 1:] == src and out[i] == out[i - 1] for i in range(1, len(out)))
    # drop: one list item goes with its comma, so the list stays well formed
    out = edit(listing, "drop", [], IDK, rng).split()
    assert len(out) == len(src) - 2 and out.count(",") == 2 and out[-1] == "."
    assert [w for w in src if w not in out and w != ","].__len__() == 1
    # number: exactly one number moves by one
    out = edit("67 plus 3 is 70 .", "number", [], IDK, rng).split()
    diffs = [(a, b) for a, b in zip("67 plus 3 is 70 .".split(), out) if a != b]
    assert len(diffs) == 1 and abs(int(diffs[0][0]) - int(diffs[0][1])) == 1
    # typo: one word of 3+ letters gets one letter more or fewer
    out = edit("the pet of rosyar is a cat .", "typo", [], IDK, rng).split()
    diffs = [(a, b) for a, b in zip("the pet of rosyar is a cat .".split(), out) if a != b]
    assert len(diffs) == 1 and len(diffs[0][0]) >= 3 and abs(len(diffs[0][0]) - len(diffs[0][1])) == 1
    # swap: another prompt's answer; abstain: the abstention text
    assert edit("red .", "swap", ["blue .", "red ."], IDK, rng) == "blue ."
    assert edit("red .", "abstain", [], IDK, rng) == IDK


def test_an_edit_that_does_not_apply_gives_none():
    rng = random.Random(0)
    assert edit("red .", "number", [], IDK, rng) is None  # no number
    assert edit("red .", "drop", [], IDK, rng) is None  # dropping the only word leaves no answer
    assert edit("a b .", "typo", [], IDK, rng) is None  # no word of 3+ letters
    assert edit("red .", "swap", ["red ."], IDK, rng) is None  # no other answer
    assert edit(IDK, "abstain", [], IDK, rng) is None
    assert edit("", "repeat", [], IDK, rng) is None


def test_with_edits_appends_new_edits_of_the_most_frequent_sample():
    samples = ["a cat .", "a dog .", "a cat .", "the cat ."] + ["1 plus 2 is 3 ."] * 4
    out = with_edits(samples, 6, 2, ("repeat", "drop", "number", "abstain"), IDK, ["t0", "t1"], seed=0)
    assert len(out) == 2
    for (responses, edits), own in zip(out, (samples[:4], samples[4:])):
        assert responses[:4] == own and len(responses) == 6
        assert [e["index"] for e in edits] == [4, 5]
        assert len(set(responses)) == len(set(own)) + 2  # each edit is an answer not there before
        for e in edits:
            assert responses[e["of"]] == max(own, key=own.count)
            assert edit(responses[e["of"]], e["kind"], ["q ."], IDK, random.Random(0)) is not None  # the kind applies
    # deterministic per (seed, prompt)
    assert with_edits(samples, 6, 2, ("repeat", "drop", "number", "abstain"), IDK, ["t0", "t1"], seed=0) == out
    # nothing applies: the slot is left out
    (responses, edits), = with_edits(["ok ."] * 3, 4, 1, ("number",), IDK, ["t"], seed=0)
    assert responses == ["ok ."] * 3 and edits == []


def test_abstain_puts_in_the_policys_own_abstentions():
    padded = IDK + " i hope this helps ."
    answers = ["the cat is red ."] * 3 + [padded] * 3
    keys = [f"t{i}" for i in range(100)]
    out = with_edits(answers * 50, 4, 1, ("abstain",), IDK, keys, seed=0, own_abstentions=True)
    assert all(responses[3] == padded for responses, _ in out[0::2])  # the policy's own abstention
    assert all(responses[3] == IDK for responses, _ in out[1::2])  # none but the edited one: the text itself
    (responses, _), = with_edits(["the cat is red ."] * 3, 4, 1, ("abstain",), IDK, ["t"], seed=0, own_abstentions=True)
    assert responses[3] == IDK  # a policy that never abstains: the text itself
    # off (the default): always the text
    assert {r[3] for r, _ in with_edits(answers * 50, 4, 1, ("abstain",), IDK, keys, seed=0)[0::2]} == {IDK}


def test_a_kind_named_twice_is_drawn_twice_as_often():
    keys = [f"t{i}" for i in range(3000)]
    answers = [x for _ in keys for x in ["the cat is red ."] * 3]
    def share(kinds):
        kinds_made = [e["kind"] for _, edits in with_edits(answers, 4, 1, kinds, IDK, keys, seed=0) for e in edits]
        assert len(kinds_made) == len(keys)  # both kinds always apply
        return kinds_made.count("abstain") / len(kinds_made)
    assert share(("repeat", "abstain")) == pytest.approx(1 / 2, abs=0.03)
    assert share(("repeat", "repeat", "abstain")) == pytest.approx(1 / 3, abs=0.03)


def test_the_grader_ranks_an_edit_of_the_right_answer_below_it():
    """Why the edits teach the reward model something: on the world's helpful tasks an edit of the
    ideal answer scores lower (a repeat or drop of a word inside a longer answer can be harmless,
    e.g. a doubled `the`, but never better)."""
    tasks = [t for t in World(WorldConfig()).prompts(300) if t.kind in HELPFUL_KINDS]
    rng = random.Random(0)
    lower = total = 0
    for t in tasks:
        best = grade(t, t.meta["answer"]).quality
        for kind in ("repeat", "drop", "number", "typo", "swap", "abstain"):
            e = edit(t.meta["answer"], kind, ["zorka likes red ."], IDK, rng)
            if e is not None:
                q = grade(t, e).quality
                assert q <= best, (t.meta["answer"], e)
                lower += q < best
                total += 1
    assert total > 500 and lower / total > 0.95


def test_edit_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="compare.edits must be in 0..k-1"):
        load_config("tiny", [], ["--compare.k=4", "--compare.edits=4"])
    with pytest.raises(ConfigError, match="compare.edit_kinds: expected some of"):
        load_config("tiny", [], ["--compare.edits=1", '--compare.edit_kinds=["repeat", "shuffle"]'])
