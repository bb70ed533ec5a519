"""Stage 4 — comparisons: the policy samples K answers per prompt; labelers rank them best to worst.

With the built-in world the labelers are simulated (noisy, see `world.people`); with your own
prompts they are people, in the feedback app. Output, JSONL, one prompt per line:
`{"prompt": {"messages": [...]}, "responses": [...], "ranking": [best, ..., worst], "ties": [[i, j]],
"labeler": "...", "ratings": {...}, "task": {...}, "policy": "...", "temperature": T}`.
`comparisons.jsonl` trains the reward model; `comparisons_heldout.jsonl` (every held-out prompt ranked
by every labeler) measures its accuracy and the labelers' agreement.
"""

from __future__ import annotations

import json
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
    answers = generate(model, tok, [list(t.messages) for t in tasks for _ in range(c.k)], max_new_tokens=c.max_new_tokens,
                       temperature=c.temperature, batch_size=cfg.sample.batch_size, seed=cfg.run.seed, progress=True)
    labelers = [SimulatedLabeler(cfg.world, f"sim-{i}", seed=cfg.run.seed * 100 + i) for i in range(c.labelers)]
    n_held = max(1, int(round(len(tasks) * c.heldout_share)))
    train_rows, held_rows = [], []
    agree = comparable = 0
    for n, task in enumerate(tasks):
        responses = answers[n * c.k: (n + 1) * c.k]
        held = n < n_held
        rankings = [lab.rank(task, responses) for lab in (labelers if held else [labelers[n % len(labelers)]])]
        for a, b in combinations(rankings, 2):
            x, y = pairwise_agreement(a, b)
            agree, comparable = agree + x, comparable + y
        for r in rankings:
            row = {"prompt": {"messages": list(task.messages)}, "responses": responses, "ranking": list(r.ranking),
                   "ties": [list(t) for t in r.ties], "labeler": r.labeler, "ratings": r.ratings,
                   "task": task.to_record(), "policy": str(policy), "temperature": c.temperature}
            (held_rows if held else train_rows).append(row)
    write_jsonl(train_path, train_rows)
    write_jsonl(held_path, held_rows)
    stats = {"prompts": len(tasks), "k": c.k, "train_comparisons": len(train_rows), "heldout_comparisons": len(held_rows),
             "labeler_agreement": agree / comparable if comparable else float("nan"), "agreement_pairs": comparable}
    stats_path.write_text(json.dumps(stats, indent=2))
    console.print(f"compare: {len(train_rows)} + {len(held_rows)} held-out rankings of K={c.k}; "
                  f"labeler agreement {stats['labeler_agreement']:.3f} on {comparable} pairs")
    return stats
