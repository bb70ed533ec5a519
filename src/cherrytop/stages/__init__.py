"""The stages of a run, in order, in one table (`STAGES`) that the CLI (`cherrytop <stage>`), the
pipeline and the lineage (what each stage is trained from) all read. A stage's module is imported
only when it runs (`runner`): reading the table costs no torch import."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cherrytop.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    """The stage's name: its output under runs/<name>/ (compare's: data/comparisons*), its command and its
    key in lineage.json."""
    module: str
    """The module of cherrytop.stages whose `run(cfg, fresh)` trains it."""
    needs: Callable[[Config], tuple[list[str | None], list[str | None]]]
    """cfg -> (what it starts from: an earlier stage's name or a checkpoint folder; the data files it reads)."""
    help: str | None = None
    """The help line of `cherrytop <name>`; None: no command of its own (PPO-ptx runs in the pipeline)."""
    ray_module: str | None = None
    """The module that trains it instead with --ray.enabled (its models on Ray actors)."""
    torchrun: bool = False
    """It runs data-parallel under torchrun (`cherrytop <name>` with WORLD_SIZE > 1)."""
    policy: bool = False
    """It trains a policy, which the pipeline evaluates on held-out tasks."""


def _sft_needs(cfg: Config) -> tuple[list[str | None], list[str | None]]:
    from cherrytop.stages.sft import init_ref
    return [init_ref(cfg)], [cfg.sft.data or str(Path(cfg.run.out_dir) / cfg.run.name / "data" / "demos.jsonl")]


def _ppo_needs(cfg: Config) -> tuple[list[str | None], list[str | None]]:
    rm = cfg.ppo.reward_model if cfg.rl.reward != "function" else None  # rl.reward=function: no reward model
    return [cfg.ppo.init, cfg.ppo.reference, rm], [cfg.ppo.prompts]


def _ppo_ptx_needs(cfg: Config) -> tuple[list[str | None], list[str | None]]:
    refs, files = _ppo_needs(cfg)
    return refs, files + [cfg.pretrain.data]  # + the pretraining corpus its LM loss reads


def _dpo_needs(cfg: Config) -> tuple[list[str | None], list[str | None]]:
    c = cfg.dpo
    ranker = c.reward_model if c.rounds > 1 and c.ranker == "reward_model" else None
    return [c.train.init, c.reference, None if c.train.data else "compare", ranker], [c.train.data]


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", "pretrain", lambda cfg: ([], [cfg.pretrain.data]), torchrun=True, policy=True,
          help="stage 1: next-token prediction on the corpus"),
    Stage("sft", "sft", _sft_needs, torchrun=True, policy=True,
          help="stage 3: supervised fine-tuning on demonstrations (assistant tokens only)"),
    Stage("compare", "compare", lambda cfg: ([cfg.compare.policy], []),
          help="stage 4: sample K answers per prompt and have the (simulated) labelers rank them"),
    Stage("rm", "reward", lambda cfg: ([cfg.rm.train.init, None if cfg.rm.train.data else "compare"],
                                       [cfg.rm.train.data]),
          torchrun=True, help="stage 5: train the reward model on K-way rankings"),
    Stage("ppo", "ppo", _ppo_needs, ray_module="ppo_ray", torchrun=True, policy=True,
          help="stage 6: PPO against the reward model with a KL penalty to the SFT model"),
    Stage("ppo_ptx", "ppo", _ppo_ptx_needs, ray_module="ppo_ray", torchrun=True,  # PPO + pipeline.ptx_coef's LM loss
          policy=True),
    Stage("dpo", "dpo", _dpo_needs, torchrun=True, policy=True,
          help="direct preference optimisation on the rankings (DPO, IPO, SimPO; --dpo.rounds for online DPO)"),
)}
"""Every stage, in the order the pipeline runs them."""


def runner(name: str, cfg: Config) -> Callable[..., dict]:
    """The function that trains stage `name` as `cfg` places it, called as fn(cfg, fresh=...): its module's
    `run`, or with --ray.enabled its Ray module's; a module that trains several stages (ppo: PPO and
    PPO-ptx) is told which."""
    stage = STAGES[name]
    module = stage.ray_module if cfg.ray.enabled and stage.ray_module else stage.module
    run = importlib.import_module(f"cherrytop.stages.{module}").run
    shared = sum(s.module == stage.module for s in STAGES.values()) > 1
    return functools.partial(run, name=name) if shared else run
