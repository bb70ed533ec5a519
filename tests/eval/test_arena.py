"""Arena ratings: the Bradley–Terry fit against its closed form for two models and against the
likelihood's score equations (each model's expected wins = its wins) for several; the bootstrap
intervals separate a clearly better model and overlap for equal ones; bad battles stop with one line."""

import math
import random

import numpy as np
import pytest

from cherrytop.eval import arena


def test_two_models_fit_the_log_odds_of_their_win_share_ties_half():
    battles = [("a", "b", 1.0)] * 30 + [("a", "b", 0.0)] * 10 + [("b", "a", 0.5)] * 10
    elo = arena.fit(battles, ["a", "b"], anchor="b", l2=0.0)
    assert elo[1] == 1000.0
    assert elo[0] - 1000.0 == pytest.approx(math.log(35 / 15) * 400 / math.log(10), rel=1e-9)


def test_several_models_meet_the_score_equations():
    rng = random.Random(0)
    strength = {"sft": 0.0, "r1": 0.4, "r2": 0.9, "r3": 1.1}
    models = list(strength)
    battles = []
    for _ in range(600):
        x, y = rng.sample(models, 2)
        p = 1 / (1 + math.exp(strength[y] - strength[x]))
        u = rng.random()
        battles.append((x, y, 0.5 if abs(u - p) < 0.05 else float(u < p)))
    elo = arena.fit(battles, models, anchor="sft", l2=0.0)
    theta = (elo - 1000.0) / arena.SCALE
    for i, m in enumerate(models):  # at the maximum, Σ P(m wins) over m's battles = m's wins
        expected = observed = 0.0
        for x, y, o in battles:
            if m in (x, y):
                p = 1 / (1 + math.exp(theta[models.index(y)] - theta[models.index(x)]))
                expected += p if x == m else 1 - p
                observed += o if x == m else 1 - o
        assert expected == pytest.approx(observed, abs=1e-6), m
    assert np.argsort(elo).tolist() == [0, 1, 2, 3]


def test_intervals_separate_a_better_model_and_overlap_for_equal_ones():
    rng = random.Random(1)
    battles = [("new", "old", float(rng.random() < 0.75)) for _ in range(300)]
    battles += [("twin", "old", float(rng.random() < 0.5)) for _ in range(300)]
    r = {x.model: x for x in arena.ratings(battles, anchor="old", rounds=200)}
    assert r["new"].beats(r["old"]) and not r["twin"].beats(r["old"]) and not r["old"].beats(r["twin"])
    assert r["old"].elo == 1000.0 and r["old"].low <= 1000.0 <= r["old"].high and r["new"].battles == 300
    assert [x.model for x in arena.ratings(battles, anchor="old", rounds=20)][0] == "new"  # best first


@pytest.mark.parametrize("battles, anchor, match", [
    ([], "a", "no battles"), ([("a", "b", 1.0)], "c", "anchor model 'c'"),
    ([("a", "b", 0.7)], "a", "outcome of 1, 0 or 0.5"), ([("a", "a", 1.0)], "a", "two models")])
def test_bad_battles_stop_with_one_line(battles, anchor, match):
    with pytest.raises(ValueError, match=match):
        arena.ratings(battles, anchor)


def test_judged_battles_show_answers_in_random_order_and_count_ties_half():
    class R:
        def __init__(self, ranking, ties):
            self.ranking, self.ties = ranking, ties

    def rank(task, shown):  # prefers the longer answer; equal lengths tie
        if len(shown[0]) == len(shown[1]):
            return R([0, 1], [(0, 1)])
        return R([0, 1] if len(shown[0]) > len(shown[1]) else [1, 0], [])
    answers = {"long": ["aaaa"] * 40, "short": ["a"] * 40, "same": ["bbbb"] * 40}
    battles = arena.judged_battles(list(range(40)), answers, rank, seed=3)
    assert len(battles) == 3 * 40
    firsts = [x for x, y, _ in battles if {x, y} == {"long", "short"}]
    assert 5 < firsts.count("long") < 35  # both orders shown
    for x, y, o in battles:
        want = 0.5 if {x, y} == {"long", "same"} else float(len(answers[x][0]) > len(answers[y][0]))
        assert o == want, (x, y, o)
    assert "| 1 |" in arena.leaderboard(arena.ratings(battles, "short", rounds=20))
