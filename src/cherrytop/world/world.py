"""The World: one object that hands out the corpus, tasks, demonstrations and prompts of the
built-in synthetic world, all deterministic from cfg.seed."""

from __future__ import annotations

from cherrytop.config import WorldConfig
from cherrytop.world.corpus import build_corpus
from cherrytop.world.language import language_for
from cherrytop.world.people import SimulatedTrainer, check_kinds
from cherrytop.world.tasks import KINDS, Task, make_tasks


class World:
    """The built-in world: entities, numbers, task kinds and the people who write and judge answers.

    Splits: held-out entities and numbers never occur in anything "train" (corpus, demonstrations,
    prompts); task sets of different (split, purpose) never share a prompt text.
    """

    kinds: tuple[str, ...] = KINDS

    def __init__(self, cfg: WorldConfig):
        check_kinds(cfg.flawed_kinds)
        self.cfg = cfg
        self.lang = language_for(cfg)
        self._corpus: dict[str, list] = {}

    def corpus(self, split: str = "train") -> list[str | list[dict]]:
        """Pretraining documents: a plain string or a dialogue (list of {"role", "content"}).
        "train": ~cfg.corpus_chars characters; "heldout": ~2 % of that, from held-out entities/numbers."""
        if split not in self._corpus:
            self._corpus[split] = build_corpus(self.cfg, self.lang, split)
        return [d if isinstance(d, str) else [dict(m) for m in d] for d in self._corpus[split]]

    def tasks(self, split: str, n: int, purpose: str = "eval") -> list[Task]:
        """n tasks of `split` ("train" | "heldout"), kinds round-robin over KINDS; `purpose` ("demo",
        "prompt", "eval") picks one of disjoint task sets. Prefix-stable: tasks(s, m) = tasks(s, n)[:m]."""
        return make_tasks(self.lang, self.cfg.seed, split, n, purpose)

    def demonstrations(self, n: int | None = None) -> list[list[dict]]:
        """Whole conversations for SFT: the task messages + the SimulatedTrainer's reply."""
        n = self.cfg.n_demonstrations if n is None else n
        trainer = SimulatedTrainer(self.cfg, seed=self.cfg.seed)
        return [[dict(m) for m in t.messages] + [{"role": "assistant", "content": trainer.reply(t)}]
                for t in self.tasks("train", n, "demo")]

    def prompts(self, n: int | None = None) -> list[Task]:
        """Training prompts for comparisons and PPO (disjoint from the demonstration tasks)."""
        return self.tasks("train", self.cfg.n_prompts if n is None else n, "prompt")
