"""The built-in synthetic world: a small language of fictional entities, eleven task kinds with
ideal answers, graders for helpful / truthful / harmless, simulated trainers and labelers, and a
pretraining corpus that makes a model capable but misaligned.

    language.py  vocabulary, names, numbers, the train / held-out split
    tasks.py     Task, KINDS and one generator per kind (with its ideal answer)
    graders.py   Grade and grade(): the axes and the quality points
    people.py    behaviours (flaws), SimulatedTrainer, SimulatedLabeler, SimulatedUser, Ranking, pairwise_agreement
    corpus.py    the pretraining corpus
    world.py     World: corpus, tasks, demonstrations, prompts
"""

from cherrytop.config import WorldConfig
from cherrytop.world.graders import Grade, grade
from cherrytop.world.people import Ranking, SimulatedLabeler, SimulatedTrainer, SimulatedUser, pairwise_agreement
from cherrytop.world.tasks import KINDS, Task
from cherrytop.world.world import World

__all__ = ["KINDS", "Grade", "Ranking", "SimulatedLabeler", "SimulatedTrainer", "SimulatedUser", "Task", "World", "WorldConfig",
           "grade", "pairwise_agreement"]
