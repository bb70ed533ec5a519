"""Where a loop's policy is still wrong, does its reward model know? On the held-out tasks where a version's
greedy answer is below ideal quality, the share where the reward model scores the world's ideal answer above
the policy's own, per task kind. Where that share is low, PPO has nothing left to climb: the reward model
ranks the policy's mistake at least as high as the right answer.

    .venv/bin/python docs/results/analysis/rm_blind_spots.py runs/loop-s0 round-1 [round-2 ...] [--rm=DIR] [--world.seed=1 ...]

Each version is judged by its own round's reward model (runs/<name>/<version>/rm; `sft` by round 1's), or
every one by the reward model in DIR with --rm=DIR.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from cherrytop.config import load_config
from cherrytop.eval.judge import Judge
from cherrytop.world import World, grade

run = Path(sys.argv[1])
versions = [a for a in sys.argv[2:] if not a.startswith("--")]
rm_dir = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--rm=")), None)
cfg = load_config("tiny", overrides=[a for a in sys.argv[2:] if a.startswith("--") and not a.startswith("--rm=")])
tasks = World(cfg.world).tasks("heldout", cfg.eval.n_tasks, "eval")
for version in versions:
    answers = json.loads((run / "loop_answers" / f"{version}.json").read_text())["answers"]
    flawed = [(t, a) for t, a in zip(tasks, answers) if grade(t, a).quality < grade(t, t.meta["answer"]).quality]
    judge = Judge(rm_dir or run / ("round-1" if version == "sft" else version) / "rm", cfg.eval.batch_size)
    prompts = [list(t.messages) for t, _ in flawed]
    own = judge.scores(prompts, [a for _, a in flawed])
    ideal = judge.scores(prompts, [t.meta["answer"] for t, _ in flawed])
    by_kind = defaultdict(lambda: [0, 0])
    for (t, _), x, y in zip(flawed, own, ideal):
        by_kind[t.kind][0] += y > x
        by_kind[t.kind][1] += 1
    knows = sum(v[0] for v in by_kind.values())
    print(f"{version}: flawed on {len(flawed)} of {len(tasks)}; its reward model prefers the ideal answer on "
          f"{knows} ({knows / max(len(flawed), 1):.2f})")
    for kind, (k, n) in sorted(by_kind.items()):
        print(f"  {kind:14s} flawed {n:3d}  ideal preferred {k / n:.2f}")
