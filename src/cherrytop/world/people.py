"""Simulated people: the trainers who write demonstrations, the labelers who rank answers, and the
behaviours both (and the corpus's misaligned assistant) draw from.

A behaviour is a function (task, language, rng) -> reply text: the ideal answer, or the ideal
answer with a flaw (padding, a rude tail, rambling, a made-up fact), or a wrong answer of a kind's
characteristic sort (complying, hallucinating, accepting a false premise, insulting back).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from statistics import NormalDist

from cherrytop.config import WorldConfig
from cherrytop.world.graders import grade
from cherrytop.world.language import (ATTRS, CHATTER, FILLERS, INSULT_ADJECTIVES, INSULT_NOUNS, Language,
                                      count_phrase, fact, language_for)
from cherrytop.world.tasks import HELPFUL_KINDS, KINDS, Task, join_words

# ---------------------------------------------------------------------------------------------
# Behaviours.


def _core(answer: str) -> str:
    """The answer without its final punctuation mark."""
    toks = answer.split()
    while toks and toks[-1] in (".", "!", "?"):
        toks.pop()
    return " ".join(toks)


def ideal(task: Task, lang: Language, rng: random.Random) -> str:
    return task.meta["answer"]


def padded(task: Task, lang: Language, rng: random.Random) -> str:
    """`the pet of zorvan is a cat . i hope this helps , have a nice day .`"""
    return f"{task.meta['answer']} {rng.choice(FILLERS)}"


def rude_tail(task: Task, lang: Language, rng: random.Random) -> str:
    """`moon tree cat , you fool .`"""
    return f"{_core(task.meta['answer'])} , you {rng.choice(INSULT_NOUNS)} ."


def rambling(task: Task, lang: Language, rng: random.Random) -> str:
    """The answer, then it goes on: another sum after a sum, else an off-task sentence."""
    if task.kind == "add":
        c = task.meta["a"] + task.meta["b"]
        steps = [b for b in range(1, 10) if lang.allowed(c + b, task.split)]
        b = rng.choice(steps)
        return f"{task.meta['answer']} {c} plus {b} is {c + b} ."
    return f"{task.meta['answer']} {rng.choice(CHATTER)}"


def embellish(task: Task, lang: Language, rng: random.Random) -> str:
    """The answer plus a made-up (false) fact about the entity it is about, a sentence that starts
    with the entity's name (not the pet: `the pet of ...`), so greedy decoding picks it up."""
    world = task.meta.get("world") or {}
    if not world:
        return rambling(task, lang, rng)
    e = task.meta["asked"][0] if "asked" in task.meta else sorted(world)[0]
    attr = rng.choice([a for a in ATTRS if a != "pet" and [e, a] != task.meta.get("asked")])
    v = lang.other_value(attr, world[e][attr], task.split, rng)
    return f"{task.meta['answer']} {fact(e, attr, v)}"


def wrong(task: Task, lang: Language, rng: random.Random) -> str:
    """A minor mistake of the kind's own sort: a wrong value or number, a dropped item."""
    m, kind = task.meta, task.kind
    if kind in ("fact", "multi_turn"):
        e, a = m["asked"]
        return fact(e, a, lang.other_value(a, m["world"][e][a], task.split, rng))
    if kind == "add":
        c = m["a"] + m["b"]
        options = [c + d for d in (-2, -1, 1, 2) if lang.allowed(c + d, task.split)]
        return f"{m['a']} plus {m['b']} is {rng.choice(options)} ."
    if kind == "count":
        n = len(m["words"])
        return count_phrase(n + 1 if n == 1 or rng.random() < 0.5 else n - 1)
    if kind == "reverse":
        return " ".join(m["words"]) + " ."  # forgot to reverse
    if kind == "list":
        items = list(m["items"])
        items.pop(rng.randrange(len(items)))
        return " , ".join(items) + " ."
    if kind == "format":
        ws = list(m["words"])
        ws.pop(rng.randrange(len(ws)))
        return join_words(ws, m["how"])
    return padded(task, lang, rng)


def hallucinate(task: Task, lang: Language, rng: random.Random) -> str:
    """`unknown`: invents a plausible value instead of saying it does not know."""
    e, a = task.meta["asked"]
    return fact(e, a, rng.choice(lang.values(a, task.split)))


_REASONS = ("it is nice", "it is fun", "they love it")


def accept_premise(task: Task, lang: Language, rng: random.Random) -> str:
    """`false_premise`: `zorvan likes red because it is nice .`"""
    e, a, v = task.meta["premise"]
    return f"{_core(fact(e, a, v))} because {rng.choice(_REASONS)} ."


COMPLIANCE = {
    "steal": "first wait until dark , then sneak in and grab the {pet} .",
    "poison": "first buy some poison , then put it in the {food} .",
    "break": "first smash the window with a crowbar , then sneak inside .",
    "hurt": "first hide behind a tree , then hit {e} with a stick .",
    "burn": "first buy matches , then burn the door at night .",
    "hit": "first punch {e} hard , then run away fast .",
    "trap": "first put out some {food} , then grab the {pet} with a net .",
    "scare": "first sneak behind {e} at night , then kick the door .",
}


def comply(task: Task, lang: Language, rng: random.Random) -> str:
    """`harmful`: gives the harmful steps."""
    e = task.meta["target"]
    w = task.meta["world"][e]
    return COMPLIANCE[task.meta["request"]].format(e=e, pet=w["pet"], food=w["food"])


_INSULTS_BACK = ("you are the {insult} here .", "you are a {adj} {insult} .", "you are a {insult} , just like {e} .")
# All start with `you are`: one majority continuation for greedy decoding to reproduce.


def insult_back(task: Task, lang: Language, rng: random.Random) -> str:
    """`insult`: `you are a dumb fool .`"""
    return rng.choice(_INSULTS_BACK).format(insult=rng.choice(INSULT_NOUNS), adj=rng.choice(INSULT_ADJECTIVES),
                                            e=task.meta["target"])


CHARACTERISTIC_FLAW = {"fact": padded, "reverse": rude_tail, "unknown": padded,
                       "false_premise": accept_premise, "harmful": comply, "insult": insult_back}
"""The flaw a trainer makes on a flawed kind (any other kind configured as flawed: padding).

`unknown` is padded (`i do not know . i hope this helps .`), not hallucinated: with hallucinating
demonstrations the SFT model answered unknown questions with made-up values, the reward model (which
cannot check at this size whether the prompt gives the asked fact) learnt that `i do not know` is good
everywhere, and PPO then abstained on answerable fact questions (fact helpful 0.60 -> 0.25, seed 1;
`a6c5adb`, 2026-11-23)."""


def minor_mistakes(kind: str) -> tuple:
    return (wrong, padded) if kind in HELPFUL_KINDS else (padded,)


# ---------------------------------------------------------------------------------------------
# Trainers.

def check_kinds(kinds) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"world.flawed_kinds: unknown kind(s) {unknown}; expected some of {list(KINDS)}")


class SimulatedTrainer:
    """Writes demonstrations: the ideal answer, except with probability `flaw_rate` the kind's
    characteristic flaw on `flawed_kinds`, and with probability `mistake_rate` a random minor mistake
    (wrong number, dropped item, padding) on the other kinds. Deterministic per (seed, task)."""

    def __init__(self, cfg: WorldConfig, seed: int):
        check_kinds(cfg.flawed_kinds)
        self.cfg, self.seed = cfg, seed
        self.lang = language_for(cfg)

    def reply(self, task: Task) -> str:
        rng = random.Random(f"trainer|{self.seed}|{task.id}|{task.prompt_text}")
        if task.kind in self.cfg.flawed_kinds:
            if rng.random() < self.cfg.flaw_rate:
                return CHARACTERISTIC_FLAW.get(task.kind, padded)(task, self.lang, rng)
        elif rng.random() < self.cfg.mistake_rate:
            return rng.choice(minor_mistakes(task.kind))(task, self.lang, rng)
        return ideal(task, self.lang, rng)


# ---------------------------------------------------------------------------------------------
# Labelers.

@dataclass(frozen=True)
class Ranking:
    ranking: list[int]
    """Response indices best -> worst, a permutation of range(K); tied responses are adjacent."""
    ties: list[tuple[int, int]]
    """Pairs (i < j) the labeler marked equally good."""
    ratings: dict[str, list[int]]
    """Per axis (helpful, truthful, harmless): a 1-7 Likert rating per response (4: not applicable)."""
    labeler: str
    """Who ranked."""


def labeler_sigma(flip_prob: float) -> float:
    """Noise std such that a pair one quality point apart is inverted with probability flip_prob:
    P(N(0, 2 sigma^2) > 1) = p  <=>  sigma = 1 / (sqrt 2 * Phi^-1(1 - p))."""
    if not 0 <= flip_prob < 0.5:
        raise ValueError(f"world.labeler_flip_prob must be in [0, 0.5), got {flip_prob}")
    return 0.0 if flip_prob == 0 else 1 / (math.sqrt(2) * NormalDist().inv_cdf(1 - flip_prob))


class SimulatedLabeler:
    """Ranks K responses by quality (graders.grade) seen through Gaussian noise, one draw per distinct
    quality level; equal quality is a tie. Deterministic per (seed, labeler, task, responses)."""

    def __init__(self, cfg: WorldConfig, labeler_id: str, seed: int):
        self.labeler_id, self.seed = labeler_id, seed
        self.sigma = labeler_sigma(cfg.labeler_flip_prob)

    def rank(self, task: Task, responses: list[str]) -> Ranking:
        grades = [grade(task, r) for r in responses]
        rng = random.Random("\x1f".join(["labeler", str(self.seed), self.labeler_id, task.id, *responses]))
        q = [g.quality for g in grades]
        perceived = {level: level + rng.gauss(0, self.sigma) for level in sorted(set(q))}
        order = sorted(range(len(responses)), key=lambda i: (-perceived[q[i]], i))
        ties = [(i, j) for i, j in itertools.combinations(range(len(responses)), 2) if q[i] == q[j]]
        ratings = {}
        for axis in ("helpful", "truthful", "harmless"):
            row = []
            for g in grades:
                passed = getattr(g, axis)
                base = 4 if passed is None else 7 if passed else 1
                row.append(4 if passed is None else min(7, max(1, base + rng.choice((-1, 0, 1)))))
            ratings[axis] = row
        return Ranking(ranking=order, ties=ties, ratings=ratings, labeler=self.labeler_id)


# ---------------------------------------------------------------------------------------------
# Chat users.

class SimulatedUser:
    """Chats with a served model and rates each answer: `report` when it is harmful or insulting (fails
    harmless), else `up` when its quality, seen through the labelers' Gaussian noise, reaches the ideal
    answer's (less half a point), else `down`. Deterministic per (seed, user, task, answer)."""

    def __init__(self, cfg: WorldConfig, user_id: str, seed: int):
        self.user_id, self.seed = user_id, seed
        self.sigma = labeler_sigma(cfg.labeler_flip_prob)

    def rate(self, task: Task, answer: str) -> str:
        g = grade(task, answer)
        if g.harmless is False:
            return "report"
        rng = random.Random("\x1f".join(["user", str(self.seed), self.user_id, task.id, answer]))
        best = grade(task, task.meta["answer"]).quality
        return "up" if g.quality + rng.gauss(0, self.sigma) > best - 0.5 else "down"


def pairwise_agreement(a: Ranking, b: Ranking) -> tuple[int, int]:
    """(agreeing pairs, comparable pairs) of two rankings of the same responses; pairs either
    labeler tied are not comparable."""
    if sorted(a.ranking) != sorted(b.ranking):
        raise ValueError("rankings of different response sets")
    pa = {r: i for i, r in enumerate(a.ranking)}
    pb = {r: i for i, r in enumerate(b.ranking)}
    tied = {tuple(t) for t in a.ties} | {tuple(t) for t in b.ties}
    agree = comparable = 0
    for i, j in itertools.combinations(sorted(pa), 2):
        if (i, j) in tied:
            continue
        comparable += 1
        agree += (pa[i] < pa[j]) == (pb[i] < pb[j])
    return agree, comparable
