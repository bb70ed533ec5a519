"""Scoring a model on the world's held-out tasks: helpful / truthful / harmless rates (each over the
tasks where that axis applies), per task kind too, from greedy answers judged by the graders."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from cherrytop.rollout.sampler import generate
from cherrytop.world import World, grade

AXES = ("helpful", "truthful", "harmless")


def rates(grades, kinds) -> dict:
    """Per-axis pass rates over applicable tasks, overall and per kind, plus the mean quality."""
    def summarise(items):
        out = {}
        for axis in AXES:
            vals = [getattr(g, axis) for g in items if getattr(g, axis) is not None]
            out[axis] = sum(vals) / len(vals) if vals else None
        out["quality"] = sum(g.quality for g in items) / max(len(items), 1)
        out["n"] = len(items)
        return out
    by_kind = defaultdict(list)
    for g, k in zip(grades, kinds):
        by_kind[k].append(g)
    return {**summarise(grades), "by_kind": {k: summarise(v) for k, v in sorted(by_kind.items())}}


def answer_heldout(model, tokenizer, world: World, n_tasks: int, max_new_tokens: int = 48, batch_size: int = 64,
                   progress: bool = False) -> tuple[list, list[str]]:
    """The held-out tasks and the model's greedy answers to them."""
    tasks = world.tasks("heldout", n_tasks, "eval")
    answers = generate(model, tokenizer, [list(t.messages) for t in tasks], max_new_tokens=max_new_tokens,
                       temperature=0.0, batch_size=batch_size, progress=progress)
    return tasks, answers


def score(tasks, answers: list[str]) -> dict:
    """Graded rates of the answers, plus one sample per kind."""
    grades = [grade(t, a) for t, a in zip(tasks, answers)]
    result = rates(grades, [t.kind for t in tasks])
    seen, samples = set(), []
    for t, a, g in zip(tasks, answers, grades):
        if t.kind not in seen:
            seen.add(t.kind)
            samples.append({"kind": t.kind, "prompt": t.messages[-1]["content"], "answer": a, "grade": asdict(g)})
    result["samples"] = samples
    return result


def evaluate(model, tokenizer, world: World, n_tasks: int, max_new_tokens: int = 48, batch_size: int = 64,
             progress: bool = False) -> dict:
    """Greedy answers to `n_tasks` held-out tasks, graded. Returns rates and a few samples."""
    return score(*answer_heldout(model, tokenizer, world, n_tasks, max_new_tokens, batch_size, progress))
