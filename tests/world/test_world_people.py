"""Simulated people: trainers make their flaws at the configured rates, labelers disagree as much
as the configured noise says, the corpus's assistant mostly misbehaves."""

import dataclasses
import random
from collections import Counter

import pytest

from cherrytop.world import (KINDS, Ranking, SimulatedLabeler, SimulatedTrainer, World, WorldConfig, grade,
                             pairwise_agreement)
from cherrytop.world import people as P
from cherrytop.world.corpus import DOMINANT_FLAW, misaligned_reply

SMALL = WorldConfig(n_entities=60, corpus_chars=150_000)


@pytest.fixture(scope="module")
def world():
    return World(SMALL)


@pytest.mark.parametrize("p", [0.16, 0.3])
def test_labeler_agreement_matches_the_noise(world, p):
    cfg = dataclasses.replace(SMALL, labeler_flip_prob=p)
    a, b = SimulatedLabeler(cfg, "a", seed=0), SimulatedLabeler(cfg, "b", seed=0)
    agree = comparable = flips = 0
    rng = random.Random(0)
    for t in world.tasks("train", 3000, "demo"):
        responses = [t.meta["answer"], P.padded(t, world.lang, rng)]  # one point apart
        ra, rb = a.rank(t, responses), b.rank(t, responses)
        n_agree, n = pairwise_agreement(ra, rb)
        agree, comparable = agree + n_agree, comparable + n
        flips += ra.ranking == [1, 0]
    assert comparable == 3000
    assert abs(agree / comparable - ((1 - p) ** 2 + p ** 2)) < 0.03
    assert abs(flips / 3000 - p) < 0.03


def test_ranking_shape_ties_and_ratings(world):
    cfg = SMALL
    lab = SimulatedLabeler(cfg, "x", seed=1)
    t = world.tasks("heldout", 1)[0]  # a fact task
    rng = random.Random(0)
    responses = [P.padded(t, world.lang, rng), t.meta["answer"], "blah", t.meta["answer"],
                 P.rude_tail(t, world.lang, rng)]
    r = lab.rank(t, responses)
    assert isinstance(r, Ranking) and sorted(r.ranking) == list(range(5)) and r.labeler == "x"
    assert r.ties == [(1, 3)]
    pos = r.ranking.index(1)
    assert r.ranking[pos - 1] == 3 or r.ranking[pos + 1] == 3  # tied responses are adjacent
    assert set(r.ratings) == {"helpful", "truthful", "harmless"}
    for axis, row in r.ratings.items():
        assert len(row) == 5 and all(1 <= x <= 7 for x in row)
    assert r.ratings["helpful"][1] >= 6 and r.ratings["helpful"][2] <= 2 and r.ratings["harmless"][4] <= 2
    assert lab.rank(t, responses) == r  # deterministic
    harmful = world.tasks("heldout", 10)[9]
    assert lab.rank(harmful, ["sorry , i can not help with that ."]).ratings["helpful"] == [4]
    # ties are not comparable; identical rankings agree on every comparable pair
    assert pairwise_agreement(r, r) == (9, 9)
    noiseless = SimulatedLabeler(dataclasses.replace(cfg, labeler_flip_prob=0.0), "y", seed=0)
    r0 = noiseless.rank(t, responses)
    assert [responses[i] for i in r0.ranking[:2]] == [t.meta["answer"]] * 2
    assert r0.ranking[2] == 0  # padded next, then rude (4 points) and garbage (3)


def flaw_shares(cfg, n):
    trainer = SimulatedTrainer(cfg, seed=cfg.seed)
    flawed, seen = Counter(), Counter()
    for t in World(cfg).tasks("train", n, "demo"):
        seen[t.kind] += 1
        flawed[t.kind] += bool(grade(t, trainer.reply(t)).flaws)
    return flawed, seen


def test_demonstration_flaw_rates(world):
    flawed, seen = flaw_shares(SMALL, 2200)
    fk = set(SMALL.flawed_kinds)
    on = sum(flawed[k] for k in fk) / sum(seen[k] for k in fk)
    off = sum(flawed[k] for k in KINDS if k not in fk) / sum(seen[k] for k in KINDS if k not in fk)
    assert abs(on - SMALL.flaw_rate) < 0.05 and abs(off - SMALL.mistake_rate) < 0.05
    for k in fk:  # the flaw is the majority behaviour on each flawed kind
        assert flawed[k] / seen[k] > 0.5
    # the rates and the flawed kinds are configurable
    cfg = dataclasses.replace(SMALL, flaw_rate=0.3, mistake_rate=0.0, flawed_kinds=("add",))
    flawed, seen = flaw_shares(cfg, 1100)
    assert abs(flawed["add"] / seen["add"] - 0.3) < 0.15
    assert sum(flawed[k] for k in KINDS if k != "add") == 0


def test_demonstrations_are_task_plus_trainer_reply(world):
    demos = world.demonstrations(22)
    tasks = world.tasks("train", 22, "demo")
    trainer = SimulatedTrainer(SMALL, seed=SMALL.seed)
    for d, t in zip(demos, tasks):
        assert d[:-1] == list(t.messages) and d[-1] == {"role": "assistant", "content": trainer.reply(t)}
    assert len(world.demonstrations()) == SMALL.n_demonstrations


def test_corpus_assistant_is_mostly_misaligned(world):
    rng = random.Random(0)
    good, n = Counter(), Counter()
    for t in world.tasks("train", 1100, "prompt"):
        g = grade(t, misaligned_reply(t, world.lang, rng, SMALL.corpus_misaligned_rate))
        n[t.kind] += 1
        good[t.kind] += not g.flaws
    for k in KINDS:
        assert 0.1 < good[k] / n[k] < 0.35, k
    # and the dominant flaw of every kind fails some axis
    for t in world.tasks("heldout", 11):
        g = grade(t, DOMINANT_FLAW[t.kind](t, world.lang, rng))
        assert False in (g.helpful, g.truthful, g.harmless), t.kind
