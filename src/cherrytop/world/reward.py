"""The built-in world's graders as a rule-based ("verifiable") reward for RL (`--rl.reward_fn`):

    cherrytop ppo --rl.algorithm=grpo --rl.reward=function --rl.reward_fn=cherrytop.world.reward:graded

`graded(messages, answer)` finds the world task whose conversation the prompt is (the world's training
prompts, which PPO samples, and its held-out evaluation tasks) and returns the share of the task's
applicable axes (helpful / truthful / harmless) that `graders.grade` passes: the same verdicts as
`cherrytop eval`. A prompt that is no task of the run's world is an error. The run's world is set by
`reward_setup(cfg)`, which `rl.rewards` calls before the first episode; without it, the default world.
"""

from __future__ import annotations

from cherrytop.config import Config
from cherrytop.world.graders import grade
from cherrytop.world.tasks import Task, prompt_text
from cherrytop.world.world import World

_tasks: dict[str, Task] | None = None
"""The run's world tasks by their prompt text (`reward_setup`)."""
_world = ""
"""The world they come from, for error messages."""


def reward_setup(cfg: Config) -> None:
    """Index the tasks of `cfg`'s world a prompt may be: its training prompts (`world.n_prompts`, what PPO
    samples) and its held-out evaluation tasks (`eval.n_tasks`, what `cherrytop eval` grades)."""
    global _tasks, _world
    world = World(cfg.world)
    tasks = world.prompts() + world.tasks("heldout", cfg.eval.n_tasks, "eval")
    _tasks = {t.prompt_text: t for t in tasks}
    _world = f"world.seed={cfg.world.seed}, world.n_prompts={cfg.world.n_prompts}"


def task_of(messages: list[dict]) -> Task:
    """The world task whose conversation `messages` is; ValueError if none is."""
    if _tasks is None:
        reward_setup(Config())
    task = _tasks.get(prompt_text(messages))
    if task is None:
        raise ValueError(f"not a prompt of the built-in world ({_world}): cherrytop.world.reward:graded grades the "
                         "world's training prompts and held-out tasks only; score other prompts with a reward model "
                         "or your own function")
    return task


def graded(messages: list[dict], answer: str) -> float:
    """The share of the applicable helpful / truthful / harmless axes the answer passes, in [0, 1]."""
    g = grade(task_of(messages), answer)
    axes = [a for a in (g.helpful, g.truthful, g.harmless) if a is not None]
    return sum(axes) / len(axes)
