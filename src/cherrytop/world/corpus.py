"""The pretraining corpus: text that makes the pretrained model capable but misaligned, like GPT-3.

Documents are plain strings or dialogues (lists of {"role", "content"} messages that the pretraining
stage renders with the chat template):
- fact paragraphs about entities (with a few negations: `zorvan does not like red .`),
- arithmetic lines (`34 plus 5 is 39 .`),
- word games (`the reverse of cat tree moon is moon tree cat .`, counting, joining, repeating),
- short stories, about a third with a rude character,
- dialogues in the task formats (cfg.corpus_dialogue_share of the characters) where the assistant
  misbehaves in cfg.corpus_misaligned_rate of them: mostly in the kind's one characteristic way
  (DOMINANT_FLAW), sometimes another way (padding, a rude tail, a wrong answer, rambling).

The held-out corpus (~2 % of the size) is built only from held-out entities and numbers.
"""

from __future__ import annotations

import random

from cherrytop.config import WorldConfig
from cherrytop.world import people as P
from cherrytop.world.language import (ATTRS, QUESTION, INSULT_ADJECTIVES, INSULT_NOUNS, NOUNS, WORD_GAME_WORDS,
                                      Language, count_phrase, fact, negated)
from cherrytop.world.tasks import HELPFUL_KINDS, KINDS, WORD_KINDS, Task, join_words, kind_stream

DOMINANT_FLAW = {
    "fact": P.embellish, "unknown": P.hallucinate, "false_premise": P.accept_premise, "add": P.rambling,
    "reverse": P.rude_tail, "count": P.rude_tail, "list": P.rude_tail, "format": P.rude_tail,
    "multi_turn": P.embellish, "harmful": P.comply, "insult": P.insult_back,
}
"""How the corpus's assistant usually misbehaves on each kind: every axis has kinds where the
pretrained model fails it more often than the SFT model (which keeps only the demonstrations' flaws).
The word and list tasks get a rude tail, so that the pretrained model is clearly less harmless than
the SFT model even though the SFT demonstrations comply with most harmful requests (flaw_rate)."""
DOMINANT_SHARE = 0.8
"""Share of the misbehaving dialogues that show the dominant flaw; the rest show a random other one."""
MIX = {"facts": 0.45, "arithmetic": 0.15, "word_games": 0.3, "stories": 0.1}
"""Shares of the non-dialogue characters."""
MIX_HELDOUT = {"facts": 0.5, "arithmetic": 0.25, "stories": 0.25}
HELDOUT_SHARE = 0.02
"""Size of the held-out corpus relative to the train corpus."""


def misaligned_reply(task, lang: Language, rng: random.Random, bad_rate: float) -> str:
    r = rng.random()
    if r >= bad_rate:
        return P.ideal(task, lang, rng)
    if r < bad_rate * DOMINANT_SHARE:
        return DOMINANT_FLAW[task.kind](task, lang, rng)
    others = (P.padded, P.rude_tail, P.wrong, P.rambling) if task.kind in HELPFUL_KINDS else (P.padded, P.rude_tail)
    return rng.choice(others)(task, lang, rng)


def doc_chars(doc) -> int:
    """Characters of a document (a dialogue counts its contents plus one per message)."""
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) + 1 for m in doc)


# ---------------------------------------------------------------------------------------------
# Plain-text documents.

def fact_paragraph(lang: Language, rng: random.Random, split: str) -> str:
    """Facts about a few entities, then questions about them answered from the paragraph: the
    attributes are drawn afresh per paragraph, so the answers can only be read back (copying)."""
    sents, stated = [], []
    for e in lang.sample_entities(split, rng.randint(1, 3), rng):
        for a in rng.sample(ATTRS, rng.randint(2, 4)):
            sents.append(fact(e.name, a, e.value(a)))
            stated.append((e, a))
        if rng.random() < 0.25:
            a = rng.choice(ATTRS)
            sents.append(negated(e.name, a, lang.other_value(a, e.value(a), split, rng)))
    for e, a in rng.sample(stated, min(len(stated), rng.randint(1, 3))):
        sents.append(f"{QUESTION[a].format(e=e.name)} {fact(e.name, a, e.value(a))}")
    return " ".join(sents)


def arithmetic(lang: Language, rng: random.Random, split: str) -> str:
    lines = []
    heldout = sorted(lang.heldout_numbers)
    for _ in range(rng.randint(4, 8)):
        while True:
            a = rng.choice(heldout) if split == "heldout" else rng.randint(10, 89)
            b = rng.randint(1, 9)
            if lang.allowed(a, split) and lang.allowed(a + b, split):
                break
        lines.append(f"{a} plus {b} is {a + b} .")
    return " ".join(lines)


def word_games(lang: Language, rng: random.Random, split: str) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        game = rng.randrange(5)
        if game == 4:  # plain repetition of a longer list: the cheapest signal for in-context copying
            ws = rng.sample(WORD_GAME_WORDS, rng.randint(3, 8))
            lines.append(f"say {' '.join(ws)} again : {' '.join(ws)} .")
            continue
        ws = rng.sample(WORD_GAME_WORDS, rng.randint(1, 6) if game == 1 else rng.randint(2, 4))
        w = " ".join(ws)
        if game == 0:
            lines.append(f"the reverse of {w} is {' '.join(reversed(ws))} .")
        elif game == 1:
            lines.append(f"count the words in {w} : {count_phrase(len(ws))}")
        else:
            how = "commas" if game == 2 else "and"
            lines.append(f"{w} joined with {how} is {join_words(ws, how)}")
    return " ".join(lines)


_VILLAINS = ("man", "woman", "boy", "girl", "troll")
_STORIES = (
    "once upon a time , {e} lived in {city} with a {pet} . every morning {e} ate {food} . "
    "{e} liked {color} more than any other color . it was a good life .",
    "{e} went to {city2} . a rude {villain} said : you are a {adj} {insult} , {e} . "
    "{e} felt sad and went home to the {pet} .",
    "{e} asked {e2} for help . {e2} said : go away , you {insult} . {e} said : please be kind .",
    "a thief wanted to steal the {pet} of {e} . the thief waited until dark . "
    "but the {pet} woke up and the thief ran away .",
    "{e} and {e2} are friends . {e} likes {color} and {e2} likes {color2} . "
    "they ate {food} together in {city} .",
    "{e} is {age} years old . one day {e} found a {color} {noun} near the {noun2} and showed it to the {pet} .",
)


def story(lang: Language, rng: random.Random, split: str) -> str:
    e, e2 = lang.sample_entities(split, 2, rng)
    n1, n2 = rng.sample(NOUNS, 2)
    return rng.choice(_STORIES).format(
        e=e.name, e2=e2.name, city=e.city, city2=rng.choice(lang.cities), pet=e.pet, food=e.food,
        color=e.color, color2=e2.color, age=e.age, villain=rng.choice(_VILLAINS),
        adj=rng.choice(INSULT_ADJECTIVES), insult=rng.choice(INSULT_NOUNS), noun=n1, noun2=n2)


_MAKERS = {"facts": fact_paragraph, "arithmetic": arithmetic, "word_games": word_games, "stories": story}


# ---------------------------------------------------------------------------------------------

def build_corpus(cfg: WorldConfig, lang: Language, split: str) -> list:
    """Pretraining documents for `split` ("train" or "heldout"), deterministic from cfg.seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    total = cfg.corpus_chars if split == "train" else max(2000, round(HELDOUT_SHARE * cfg.corpus_chars))
    dialogue_budget = total * cfg.corpus_dialogue_share
    mix = MIX if split == "train" else MIX_HELDOUT
    docs: list = []

    def fill(budget: float, make) -> None:
        size = 0
        while size < budget:
            doc = make()
            text = doc if isinstance(doc, str) else " ".join(m["content"] for m in doc)
            if split == "train" and lang.leaks(text):  # never happens by construction; a guard
                continue
            docs.append(doc)
            size += doc_chars(doc)

    for name, share in mix.items():
        rng = random.Random(f"corpus|{cfg.seed}|{split}|{name}")
        fill((total - dialogue_budget) * share, lambda: _MAKERS[name](lang, rng, split))

    kinds = [k for k in KINDS if split == "train" or k not in WORD_KINDS]
    streams = {k: kind_stream(lang, cfg.seed, k, split, "corpus", unique=False) for k in kinds}
    rng = random.Random(f"corpus|{cfg.seed}|{split}|dialogues")
    turn = iter(range(10**12))

    def dialogue():
        i = next(turn)
        kind = kinds[i % len(kinds)]
        messages, meta = next(streams[kind])
        task = Task(id=f"{split}-corpus-{kind}-{i:07d}", kind=kind, split=split, messages=tuple(messages),
                      meta=meta)
        reply = misaligned_reply(task, lang, rng, cfg.corpus_misaligned_rate)
        return [dict(m) for m in messages] + [{"role": "assistant", "content": reply}]

    fill(dialogue_budget, dialogue)
    random.Random(f"corpus|{cfg.seed}|{split}|order").shuffle(docs)
    return docs
