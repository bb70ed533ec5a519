"""Labeler statistics against hand-computed references: InstructGPT's pairwise agreement with ties,
Krippendorff's α (ordinal and interval, worked by hand from the coincidence matrix), gold scores."""

import numpy as np
import pytest

from cherrytop.feedback.auth import create_user
from cherrytop.feedback.stats import alpha, pair_agreement, relations, report

PROMPT = [{"role": "user", "content": "name a colour ."}]


def test_relations_and_pair_agreement_by_hand():
    assert relations([2, 0, 1], [[0, 1]]) == {(0, 1): 0, (0, 2): -1, (1, 2): -1}
    # A: 0 > 1 > 2 > 3; B: 1 > 0 > 2 = 3. Pairs (0,1) and (2,3) differ, the other 4 agree.
    assert pair_agreement(([0, 1, 2, 3], []), ([1, 0, 2, 3], [[2, 3]])) == (4, 6)
    assert pair_agreement(([0, 1], [[0, 1]]), ([1, 0], [[1, 0]])) == (1, 1)  # both tied: agree


def test_alpha_by_hand():
    # Two coders, three units: A = 1, 2, 3; B = 1, 2, 4. Pooled values 1,1,2,2,3,4 (n = 6).
    # Interval: D_o = 2*(3-4)^2 / 6 = 1/3; D_e = 82 / (6*5) (sum of squared differences over ordered
    # pairs of the pooled values); alpha = 1 - D_o/D_e = 72/82.
    data = np.array([[1, 2, 3], [1, 2, 4]], dtype=float)
    assert alpha(data, "interval") == pytest.approx(72 / 82)
    # Ordinal: delta(c,k) = (sum_{g=c..k} n_g - (n_c+n_k)/2)^2 with n = {1:2, 2:2, 3:1, 4:1};
    # D_o = 2*delta(3,4)/6 = 1/3; D_e = 2*(4*4 + 2*12.25 + 2*20.25 + 2*2.25 + 2*6.25 + 1*1)/30 = 6.6.
    assert alpha(data, "ordinal") == pytest.approx(1 - (1 / 3) / 6.6)
    assert alpha(np.array([[1, np.nan], [np.nan, 2]])) is None  # no unit rated twice: undefined
    assert alpha(np.array([[3, 3], [3, 3]])) is None  # no variation at all: undefined


def test_report_pools_agreement_gold_and_alpha(store):
    ids = {n: create_user(store, n, "password1") for n in ("ann", "bob", "cat")}
    item = store.add_item(PROMPT, responses=["a", "b", "c", "d"], gold=[0, 1, 2, 3], labels_needed=3).id
    store.submit_ranking(ids["ann"], item, [0, 1, 2, 3], [], "t1", 10.0,
                         ratings={"helpful": [1, 2, 3, None]})
    store.submit_ranking(ids["bob"], item, [1, 0, 2, 3], [[2, 3]], "t2", 20.0,
                         ratings={"helpful": [1, 2, 4, None]})
    store.submit_ranking(ids["cat"], item, [0, 1, 3, 2], [], "t3", 40.0)
    r = report(store)
    # ann-bob 4/6, ann-cat 5/6 (only (2,3) differs), bob-cat 4/6 ((0,1) and (2,3) differ)
    assert r.agreement == pytest.approx(13 / 18) and r.pairs == 18
    by = {s.name: s for s in r.labelers}
    assert by["ann"].agreement == pytest.approx(9 / 12)
    assert by["bob"].agreement == pytest.approx(8 / 12)
    assert by["cat"].agreement == pytest.approx(9 / 12)
    assert {(b["a"], b["b"]): b["agreement"] for b in r.between} == pytest.approx(
        {("ann", "bob"): 4 / 6, ("ann", "cat"): 5 / 6, ("bob", "cat"): 4 / 6})
    assert (by["ann"].gold_score, by["bob"].gold_score, by["cat"].gold_score) == pytest.approx((1, 4 / 6, 5 / 6))
    assert by["bob"].median_seconds == pytest.approx(20.0, abs=0.5) and by["ann"].rankings == 1
    assert r.alpha["helpful"] == pytest.approx(1 - (1 / 3) / 6.6)  # the ordinal example above
    assert r.alpha["truthful"] is None and by["ann"].alpha["helpful"] == pytest.approx(r.alpha["helpful"])
    assert "helpful" not in by["cat"].alpha  # cat gave no ratings
    assert r.items == 1 and r.complete == 1
