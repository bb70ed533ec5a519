"""Stage 4 — comparisons: the policy samples K answers per prompt; labelers rank them best to worst.

With the built-in world the labelers are simulated (noisy, see `world.people`); with your own
prompts they are people, in the feedback app. Output, JSONL, one prompt per line:
`{"prompt": {"messages": [...]}, "responses": [...], "ranking": [best, ..., worst], "ties": [[i, j]],
"labeler": "...", "ratings": {...}, "task": {...}, "policy": "...", "temperature": T}`.
`comparisons.jsonl` trains the reward model; `comparisons_heldout.jsonl` (every held-out prompt ranked
by every labeler) measures its accuracy and the labelers' agreement.

Edited answers (`compare.edits`): a small policy rarely makes a one-word slip next to its own right
answer, so rankings seldom show the reward model that a doubled word, a dropped list item, a sum off
by one or a needless "i do not know" makes an answer worse. `edits` of the K answers are replaced by an
edit of the prompt's most frequent sample (`edit`); the labelers rank them like any other answer (an
edit can be harmless, and then ties), and the record's `edits` lists them: `[{"index", "of", "kind"}]`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

from cherrytop.config import Config
from cherrytop.data.records import write_jsonl
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model.load import load_model, resolve_checkpoint
from cherrytop.rollout.sampler import generate
from cherrytop.train.loop import console
from cherrytop.world import SimulatedLabeler, World, pairwise_agreement


def paths(cfg: Config) -> tuple[Path, Path]:
    d = Path(cfg.run.out_dir) / cfg.run.name / "data"
    return d / "comparisons.jsonl", d / "comparisons_heldout.jsonl"


def run(cfg: Config, fresh: bool = False) -> dict:
    c = cfg.compare
    train_path, held_path = paths(cfg)
    stats_path = train_path.with_suffix(".stats.json")
    if train_path.is_file() and held_path.is_file() and stats_path.is_file() and not fresh:
        console.print(f"[green]compare[/]: comparisons already in {train_path.parent}; pass --fresh to sample again")
        return json.loads(stats_path.read_text())
    if c.prompts:
        raise ValueError("compare.prompts: simulated labelers can only rank the built-in world's tasks; rank answers "
                         "to your own prompts with people in the feedback app")
    policy = resolve_checkpoint(c.policy, cfg)
    model, tok = load_model(policy), load_tokenizer(policy)
    tasks = World(cfg.world).prompts(c.n_prompts)
    # K - edits samples per prompt; with_edits appends the edited answers
    answers = generate(model, tok, [list(t.messages) for t in tasks for _ in range(c.k - c.edits)],
                       max_new_tokens=c.max_new_tokens, temperature=c.temperature, batch_size=cfg.sample.batch_size,
                       seed=cfg.run.seed, progress=True)
    answers = with_edits(answers, c.k, c.edits, c.edit_kinds, c.abstention, [t.id for t in tasks], cfg.run.seed,
                         c.abstain_own)
    labelers = [SimulatedLabeler(cfg.world, f"sim-{i}", seed=cfg.run.seed * 100 + i) for i in range(c.labelers)]
    n_held = max(1, int(round(len(tasks) * c.heldout_share)))
    train_rows, held_rows = [], []
    agree = comparable = 0
    for n, task in enumerate(tasks):
        responses, edits = answers[n]
        held = n < n_held
        rankings = [lab.rank(task, responses) for lab in (labelers if held else [labelers[n % len(labelers)]])]
        for a, b in combinations(rankings, 2):
            x, y = pairwise_agreement(a, b)
            agree, comparable = agree + x, comparable + y
        for r in rankings:
            row = {"prompt": {"messages": list(task.messages)}, "responses": responses, "ranking": list(r.ranking),
                   "ties": [list(t) for t in r.ties], "labeler": r.labeler, "ratings": r.ratings,
                   "task": task.to_record(), "policy": str(policy), "temperature": c.temperature}
            if edits:
                row["edits"] = edits
            (held_rows if held else train_rows).append(row)
    write_jsonl(train_path, train_rows)
    write_jsonl(held_path, held_rows)
    stats = {"prompts": len(tasks), "k": c.k, "train_comparisons": len(train_rows), "heldout_comparisons": len(held_rows),
             "labeler_agreement": agree / comparable if comparable else float("nan"), "agreement_pairs": comparable}
    stats_path.write_text(json.dumps(stats, indent=2))
    console.print(f"compare: {len(train_rows)} + {len(held_rows)} held-out rankings of K={c.k}; "
                  f"labeler agreement {stats['labeler_agreement']:.3f} on {comparable} pairs")
    return stats


_PUNCT = frozenset(".,!?:;")


def edit(answer: str, kind: str, others: list[str], abstention: str, rng: random.Random) -> str | None:
    """One small edit of `answer` (space-separated tokens), or None where `kind` does not apply:
    `repeat` a word, `drop` a word (with its list comma), a `number` ±1, a `typo` (a letter doubled or
    dropped), `swap` in one of `others` (answers to other prompts), `abstain` (answer `abstention`)."""
    toks = answer.split()
    words = [i for i, t in enumerate(toks) if t not in _PUNCT]
    if kind == "repeat" and words:
        i = rng.choice(words)
        toks.insert(i, toks[i])
    elif kind == "drop" and len(words) > 1:
        i = rng.choice(words)
        j = i + 1 if i + 1 < len(toks) and toks[i + 1] == "," else i - 1 if i > 0 and toks[i - 1] == "," else i
        del toks[min(i, j): max(i, j) + 1]
    elif kind == "number" and (nums := [i for i, t in enumerate(toks) if t.isdigit()]):
        i = rng.choice(nums)
        n = int(toks[i])
        toks[i] = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    elif kind == "typo" and (long := [i for i, t in enumerate(toks) if t.isalpha() and len(t) >= 3]):
        i = rng.choice(long)
        w, j = toks[i], rng.randrange(1, len(toks[i]))
        toks[i] = w[:j] + w[j - 1:] if rng.random() < 0.5 else w[:j] + w[j + 1:]
    elif kind == "swap" and (pool := [o for o in others if o.split() != toks]):
        return rng.choice(pool)
    elif kind == "abstain" and abstention.split() != toks:
        return abstention
    else:
        return None
    return " ".join(toks)


def with_edits(samples: list[str], k: int, n_edits: int, kinds: tuple[str, ...], abstention: str, keys: list[str],
               seed: int, own_abstentions: bool = False) -> list[tuple[list[str], list[dict]]]:
    """Per prompt (`samples` holds K - n_edits samples per prompt, in order): its responses, the samples
    followed by `n_edits` edits of the most frequent sample, and the edits made. Each edit is an answer
    not there before; a slot for which no kind gives one is left out (that prompt has fewer answers).
    `abstain` puts in `abstention`, or with `own_abstentions` one of the policy's own abstentions: a
    sample of any prompt that begins with `abstention` and is not the edited answer, drawn by frequency
    (`abstention` itself if there is none)."""
    s = k - n_edits
    groups = [samples[i: i + s] for i in range(0, len(samples), s)]
    modes = [Counter(g).most_common(1)[0][0] for g in groups]
    head = abstention.split()
    abstentions = [a for g in groups for a in g if a.split()[: len(head)] == head] if own_abstentions else []
    out = []
    for n, g in enumerate(groups):
        rng = random.Random(f"edit|{seed}|{keys[n]}")
        responses, edits = list(g), []
        source = responses.index(modes[n])
        for _ in range(n_edits):
            for kind in dict.fromkeys(rng.sample(list(kinds), len(kinds))):  # a kind named twice comes first twice as often
                others = [modes[rng.randrange(len(modes))] for _ in range(3)] if kind == "swap" else []
                said = abstention
                if kind == "abstain" and own_abstentions:
                    said = rng.choice([a for a in abstentions if a != modes[n]] or [abstention])
                new = edit(modes[n], kind, others, said, rng)
                if new is not None and new not in responses:
                    edits.append({"index": len(responses), "of": source, "kind": kind})
                    responses.append(new)
                    break
        out.append((responses, edits))
    return out
