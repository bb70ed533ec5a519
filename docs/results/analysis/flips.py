"""Which held-out helpful tasks flip between the SFT and the PPO model of a run, by kind, and how many
of the lost ones PPO answers with "i do not know"; prints a few lost examples (greedy answers).

    python docs/results/analysis/flips.py runs/tiny-seed0 0      # run folder, world seed
"""
import collections
import sys

import torch

from cherrytop.config import load_config
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.eval.heldout import answer_heldout
from cherrytop.model.load import load_model
from cherrytop.world import World, grade

torch.set_num_threads(1)
run, seed = sys.argv[1], int(sys.argv[2])
cfg = load_config("tiny", overrides=[f"--world.seed={seed}"])
world = World(cfg.world)
tok = load_tokenizer(f"{run}/sft")
answers = {}
for name in ("sft", "ppo"):
    tasks, answers[name] = answer_heldout(load_model(f"{run}/{name}").eval(), tok, world, cfg.eval.n_tasks,
                                          cfg.eval.max_new_tokens)
lost, won, lost_to_idk, examples = collections.Counter(), collections.Counter(), 0, []
for task, a, b in zip(tasks, answers["sft"], answers["ppo"]):
    ga, gb = grade(task, a), grade(task, b)
    if ga.helpful is None:
        continue
    if ga.helpful and not gb.helpful:
        lost[task.kind] += 1
        lost_to_idk += "do not know" in b
        examples.append((task.kind, task.messages[-1]["content"][-80:], a, b))
    elif gb.helpful and not ga.helpful:
        won[task.kind] += 1
print(f"{run}: lost {dict(lost)}, won {dict(won)}; lost to 'i do not know': {lost_to_idk}")
for e in examples[:8]:
    print("  ", e)
