"""Which held-out helpful tasks flip between the SFT and the PPO model of a run, by kind, and how many
of the lost ones PPO answers with "i do not know"; prints a few lost examples (greedy answers).
With a third argument (kinds, comma-separated; any kind, helpful or not): every task of those kinds
whose quality grade differs (kind, SFT -> PPO, end of prompt, SFT's answer || PPO's), and per kind how
many PPO made better, worse or left as graded.

    python docs/results/analysis/flips.py runs/tiny-seed0 0      # run folder, world seed
    python docs/results/analysis/flips.py runs/s0 0 unknown      # the unknown prompts (as in 89f1eba)
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
kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else []
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

graded = collections.defaultdict(collections.Counter)
for task, a, b in zip(tasks, answers["sft"], answers["ppo"]):
    if task.kind in kinds:
        qa, qb = grade(task, a).quality, grade(task, b).quality
        graded[task.kind]["better" if qb > qa else "worse" if qb < qa else "same"] += 1
        if qa != qb:
            print(task.kind, f"{qa:.2f} -> {qb:.2f}", "|", task.messages[-1]["content"][-70:], "|", a, "||", b)
for kind, c in sorted(graded.items()):
    print(f"{kind}: better {c['better']}, worse {c['worse']}, same {c['same']}")
