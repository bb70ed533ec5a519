"""Labeler statistics against hand-computed references: InstructGPT's pairwise agreement with ties,
Krippendorff's α (ordinal and interval, worked by hand from the coincidence matrix), gold scores."""

import json

import numpy as np
import pytest

from cherrytop.data.records import DataError
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
    ids = {n: create_user(store, n, "label-pass-7") for n in ("ann", "bob", "cat")}
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


def test_labelers_win_rate_per_pair_of_models(store, tmp_path):
    # `cherrytop eval --pairs` writes two models' answers in random order with the model of each
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{n}"}], "responses": r, "models": m} for n, (r, m) in
            enumerate([(["x0", "y0"], ["ppo", "sft"]), (["y1", "x1"], ["sft", "ppo"]), (["x2", "y2"], ["ppo", "sft"])])]
    rows.append({"messages": [{"role": "user", "content": "q3"}], "responses": ["a", "b", "c"],
                 "models": ["ppo", "sft", "other"]})
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert store.import_prompts(pairs).added == 4
    ann, bob = create_user(store, "ann", "label-pass-7"), create_user(store, "bob", "label-pass-7")
    items = {i.prompt[0]["content"]: i.id for i in store.items()}
    store.submit_ranking(ann, items["q0"], [0, 1], [], "a0", 1.0)  # ppo first
    store.submit_ranking(bob, items["q0"], [1, 0], [], "b0", 1.0)  # sft first
    store.submit_ranking(ann, items["q1"], [1, 0], [], "a1", 1.0)  # index 1 = ppo first
    store.submit_ranking(ann, items["q2"], [0, 1], [[0, 1]], "a2", 1.0)  # tied
    store.submit_ranking(ann, items["q3"], [2, 1, 0], [], "a3", 1.0)  # other > sft > ppo
    # ppo vs sft: 1 + 0 + 1 + 0.5 + 0 of 5; other vs ppo: 1 of 1; other vs sft: 1 of 1
    assert report(store).models == [
        {"a": "other", "b": "ppo", "pairs": 1, "win_rate": 1.0},
        {"a": "other", "b": "sft", "pairs": 1, "win_rate": 1.0},
        {"a": "ppo", "b": "sft", "pairs": 5, "win_rate": 2.5 / 5}]


def test_import_names_a_bad_models_list_by_line(store, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "models": ["ppo"]}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: models are \['ppo'\]; expected a list of 2 model names"):
        store.import_prompts(bad)
