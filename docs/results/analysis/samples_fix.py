"""Can RL find the fix at all? On the held-out tasks where a version's greedy answer is flawed, the share of
8 samples (the rollout temperature, 0.7) that are of ideal quality, and of tasks where any of the 8 is, per kind.
A policy that rarely samples the right answer gives even a perfect reward model little to reinforce.

    .venv/bin/python docs/results/analysis/samples_fix.py runs/fin-s0 round-1 [--world.seed=1 ...]

The policy is runs/<name>/<version>/ppo (`sft`: runs/<name>/sft); its greedy answers are the loop's cached ones.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from cherrytop.config import load_config
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model.load import load_model
from cherrytop.rollout.sampler import generate
from cherrytop.world import World, grade

K = 8
run, version = Path(sys.argv[1]), sys.argv[2]
cfg = load_config("tiny", overrides=sys.argv[3:])
policy = run / "sft" if version == "sft" else run / version / "ppo"
tasks = World(cfg.world).tasks("heldout", cfg.eval.n_tasks, "eval")
greedy = json.loads((run / "loop_answers" / f"{version}.json").read_text())["answers"]
flawed = [t for t, a in zip(tasks, greedy) if grade(t, a).quality < grade(t, t.meta["answer"]).quality]
samples = generate(load_model(policy), load_tokenizer(policy), [list(t.messages) for t in flawed for _ in range(K)],
                   max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature, seed=cfg.run.seed)
by_kind = defaultdict(lambda: [0, 0, 0])  # tasks with an ideal sample, tasks, ideal samples
for i, t in enumerate(flawed):
    best = grade(t, t.meta["answer"]).quality
    ideal = [grade(t, s).quality >= best for s in samples[K * i: K * (i + 1)]]
    by_kind[t.kind][0] += any(ideal)
    by_kind[t.kind][1] += 1
    by_kind[t.kind][2] += sum(ideal)
tasks_fixed = sum(v[0] for v in by_kind.values())
print(f"{version}: flawed on {len(flawed)}; a sample of {K} is ideal on {tasks_fixed} ({tasks_fixed / len(flawed):.2f}); "
      f"ideal samples {sum(v[2] for v in by_kind.values()) / (K * len(flawed)):.3f}")
for kind, (fixed, n, ideal) in sorted(by_kind.items()):
    print(f"  {kind:14s} flawed {n:3d}  any of {K} ideal {fixed / n:.2f}  per sample {ideal / (K * n):.3f}")
