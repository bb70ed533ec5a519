"""The highest win rate vs SFT a policy could reach on the held-out tasks: a task where SFT's greedy answer
is already of ideal quality can only tie (0.5), one where it is flawed can be won (1), so the ceiling is
0.5 + (share of flawed SFT answers) / 2; per kind, the share of SFT answers a loop version made ideal.

    .venv/bin/python docs/results/analysis/win_ceiling.py runs/loop-s0-final [--world.seed=1 ...]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from cherrytop.config import load_config
from cherrytop.world import World, grade

run = Path(sys.argv[1])
cfg = load_config("tiny", overrides=sys.argv[2:])
answers = {p.stem: json.loads(p.read_text())["answers"] for p in sorted((run / "loop_answers").glob("*.json"))}
tasks = World(cfg.world).tasks("heldout", cfg.eval.n_tasks, "eval")
flawed, ideal = defaultdict(list), defaultdict(lambda: defaultdict(list))
for n, t in enumerate(tasks):
    best = grade(t, t.meta["answer"]).quality
    flawed[t.kind].append(grade(t, answers["sft"][n]).quality < best)
    for v, a in answers.items():
        ideal[v][t.kind].append(grade(t, a[n]).quality >= best)
share = sum(map(sum, flawed.values())) / len(tasks)
print(f"win-rate ceiling vs SFT on {len(tasks)} tasks: {0.5 + share / 2:.3f} (SFT flawed on {share:.1%})")
print("kind | SFT flawed | " + " | ".join(f"{v} ideal" for v in answers))
for k in flawed:
    print(f"{k} | {sum(flawed[k]) / len(flawed[k]):.2f} | "
          + " | ".join(f"{sum(ideal[v][k]) / len(ideal[v][k]):.2f}" for v in answers))
