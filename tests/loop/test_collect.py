"""The loop's pieces that need no model: simulated users' ratings, labelers ranking through the feedback
store's queue (only what it offers them), the round's comparisons split by held-out prompt, the reward
model's pairwise accuracy, and the promotion gate."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from cherrytop.config import Config, load_config
from cherrytop.data.records import Comparison, Message
from cherrytop.eval.arena import Rating
from cherrytop.feedback.store import open_store, prompt_key
from cherrytop.loop import collect
from cherrytop.loop.rounds import pair_accuracy, step_gate
from cherrytop.world import SimulatedUser, World, grade
from cherrytop.world.people import comply


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config("test")


def test_simulated_users_like_ideal_answers_report_harmful_ones_and_rate_the_same_twice(cfg):
    world = World(cfg.world)
    tasks = world.prompts(60)
    user = SimulatedUser(cfg.world, "u0", seed=0)
    ideal = Counter(user.rate(t, t.meta["answer"]) for t in tasks)
    assert ideal["up"] >= 0.7 * len(tasks) and ideal["report"] == 0  # noise flips a few, never to a report
    harmful = [t for t in tasks if t.kind == "harmful"]
    assert harmful and all(user.rate(t, comply(t, world.lang, None)) == "report" for t in harmful)
    wrong = [t for t in tasks if t.kind == "add"]
    bad = [f"{t.meta['a']} plus {t.meta['b']} is {t.meta['a'] + t.meta['b'] + 1} ." for t in wrong]
    assert Counter(user.rate(t, b) for t, b in zip(wrong, bad))["down"] >= 0.7 * len(wrong)
    assert [user.rate(t, t.meta["answer"]) for t in tasks] == [user.rate(t, t.meta["answer"]) for t in tasks]


def test_labelers_rank_every_queued_item_through_the_store_and_held_out_ones_twice(cfg, tmp_path):
    world = World(cfg.world)
    tasks = world.prompts(10)
    store = open_store(f"sqlite:///{tmp_path / 'fb.db'}", labels_needed=1)
    # a chat rating queued the first prompt (the loop's server queues it for one label), then come fresh ones,
    # 3 held out
    store.add_chat_feedback(messages=[dict(m) for m in tasks[0].messages], response="no .", rating="down",
                            model="runs/x/sft", settings={})
    collect.queue(store, tasks[1:], heldout=3, labelers=2)
    answers = ["i do not know .", "no .", tasks[0].meta["answer"]]
    for item in store.items():  # what `sample` does with the policy: up to K answers each
        store.add_responses(item.id, [a for a in answers if a not in item.responses][: 3 - len(item.responses)],
                            [{"model": "runs/x/sft"}] * 3)
    by_key = {collect.key_of(t): t for t in tasks}
    assert collect.ranking_progress(store) == (0, 1 + 3 * 2 + 6)
    assert collect.rank_simulated(store, dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, labelers=2)),
                                  by_key, seed=0) == 13
    assert collect.ranking_progress(store) == (13, 13)
    per_item = Counter(r.item_id for r in store.rankings())
    assert sorted(per_item.values()) == [1] * 7 + [2] * 3
    held_keys = {collect.key_of(t) for t in tasks[1:4]}
    train, held = collect.comparisons(store, by_key, held_keys, round_no=2)
    assert len(train) == 7 and len(held) == 6 and {c.meta["round"] for c in train + held} == {2}
    for c in train + held:  # each names its task, whose grader the labeler followed (noise aside)
        task = by_key[prompt_key([m.to_json() for m in c.prompt])]
        assert c.meta["task"]["id"] == task.id and set(c.responses) <= set(answers)


class FixedJudge:
    """Scores looked up in a table: the accuracy is then counted by hand below."""
    def __init__(self, table):
        self.table = table

    def scores(self, prompts, answers):
        return [self.table[a] for a in answers]


def test_reward_model_pair_accuracy_counts_labeler_pairs_and_grader_pairs():
    world = World(load_config("test").world)
    task = next(t for t in world.prompts(20) if t.kind == "add")
    right, off = task.meta["answer"], f"{task.meta['a']} plus {task.meta['b']} is {task.meta['a'] + task.meta['b'] + 1} ."
    prompt = tuple(Message(m["role"], m["content"]) for m in task.messages)
    # labeler: off > right > "no ." (a noisy ranking), tie none; grader: right (6) > off > "no ."
    c = Comparison(prompt, (right, off, "no ."), (1, 0, 2), (), "sim-0", None, {"task": task.to_record()})
    judge = FixedJudge({right: 2.0, off: 1.0, "no .": 0.0})
    acc = pair_accuracy(judge, [c])
    # labeler pairs: off>right (judge says no), off>no (yes), right>no (yes) -> 2/3
    assert acc["pairs"] == 3 and acc["labelers"] == pytest.approx(2 / 3)
    q = [grade(task, a).quality for a in (right, off, "no .")]
    strict = [(x, y) for x in range(3) for y in range(3) if q[x] > q[y]]
    scores = [2.0, 1.0, 0.0]
    assert acc["grader_pairs"] == len(strict) and acc["grader"] == sum(scores[x] > scores[y] for x, y in strict) / len(strict)


def test_the_gate_promotes_only_with_intervals_apart_or_past_the_margin(cfg):
    def ratings(new, old):
        return {"ratings": {"round-2": vars(Rating("round-2", *new, 100)), "round-1": vars(Rating("round-1", *old, 100))}}
    served = {"version": "round-1", "path": "x"}
    apart, overlap = ratings((1100, 1060, 1140), (1000, 970, 1030)), ratings((1100, 1020, 1180), (1000, 960, 1040))
    assert step_gate(cfg, 2, served, apart)["promoted"]
    g = step_gate(cfg, 2, served, overlap)
    assert not g["promoted"] and "round-1 stays served" in g["verdict"]
    margin = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, gate_margin=50.0))
    assert step_gate(margin, 2, served, overlap)["promoted"]  # 100 points up, intervals overlapping
    assert not step_gate(margin, 2, served, ratings((1040, 1030, 1050), (1000, 990, 1010)))["promoted"]


def test_with_people_the_round_waits_until_they_have_ranked_its_queue(cfg, tmp_path):
    """`--loop.labelers=human`: the loop polls the round's store until every queued item has its rankings
    (a person ranking in the web app does what this thread does: next item, then a ranking of it)."""
    import threading
    import time
    import uuid

    from cherrytop.feedback.auth import create_user
    store = open_store(f"sqlite:///{tmp_path / 'fb.db'}", labels_needed=1)
    tasks = World(cfg.world).prompts(3)
    collect.queue(store, tasks, heldout=1, labelers=2)
    for item in store.items():
        store.add_responses(item.id, ["a .", "b ."], [{"model": "x"}] * 2)
    people = [create_user(store, name, "correct-Horse-7") for name in ("ann", "bob")]

    def rank():
        time.sleep(0.3)
        for who in people * 3:
            if (item := store.next_ranking_item(who)) is not None:
                store.submit_ranking(who, item.id, [1, 0], [], uuid.uuid4().hex, 2.0, offered=True)
    person = threading.Thread(target=rank)
    person.start()
    t = time.perf_counter()
    collect.wait_for_people(store, "sqlite:///fb.db", poll_s=0.05)
    assert time.perf_counter() - t >= 0.3 and collect.ranking_progress(store) == (4, 4)  # 2 items once, 1 twice
    person.join()
