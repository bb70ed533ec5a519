"""An episode's score (`rl.reward`): the reward model's, a rule-based function's, or a weighted sum of both.

    score = w_rm · (head at EOS + Σ_t c · log π_ref(y_t))   the reward model (stages/reward.py), `model` / `both`
          + w_fn · fn(prompt messages, answer text)           `rl.reward_fn` = module:function, `function` / `both`

The answer text is the response decoded up to (not including) its EOS, as `cherrytop eval` decodes it.
The reward model's dense c · log π_ref term stays token by token (weighted by w_rm); the rest of the score
is read at the last token. An answer without EOS gets `ppo.no_eos_penalty` instead of the whole score
(`rl.experience.episode_rewards`). One copy, used by the single-process / torchrun rollout (stages/ppo.py)
and by the Ray driver (stages/ppo_ray.py)."""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cherrytop.train import distributed

RuleFn = Callable[[list[dict], str], float]
"""(prompt messages [{"role", "content"}, ...], answer text) -> the answer's reward."""


class RewardError(ValueError):
    """A reward function that cannot be imported, raises, or returns no finite number: one line."""


def load_function(spec: str) -> RuleFn:
    """The function `spec` = "module:function" names, imported; a RewardError says what is missing."""
    where = f"rl.reward_fn={spec}"
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RewardError(f"{where}: expected module:function (e.g. cherrytop.world.reward:graded)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {e}); is it on "
                          "PYTHONPATH or installed?") from None
    fn = module
    for part in name.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"{where}: module {module_name!r} has no attribute {name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"{where}: {name!r} in module {module_name!r} is a {type(fn).__name__}, not a function")
    return fn


def _built_in(i: int) -> str:
    return f"built-in prompt {i + 1}"


@dataclass
class Reward:
    """`rl.reward` resolved: which parts make an episode's score and their weights."""
    model_weight: float | None = 1.0
    """w_rm; None: the reward model is no part of the score (and is not loaded)."""
    fn: RuleFn | None = None
    """The rule-based function; None: none."""
    fn_weight: float = 1.0
    """w_fn."""
    spec: str = ""
    """rl.reward_fn as written, for messages."""
    prompts: Sequence[list[dict]] = ()
    """Every prompt's messages, by the index an episode's `prompt_idx` gives."""
    where: Callable[[int], str] = field(default=_built_in)
    """Where prompt i is, for messages: `file:line` (data.records.locate) or "built-in prompt N"."""

    @property
    def model(self) -> bool:
        """The reward model is a part of the score."""
        return self.model_weight is not None

    def describe(self, rm_path) -> str:
        """The start-up line's account of the score."""
        parts = ([f"reward model {rm_path}" if self.model_weight == 1.0 or self.fn is None
                  else f"{self.model_weight:g} × reward model {rm_path}"] if self.model else [])
        if self.fn is not None:
            parts.append(f"reward function {self.spec}" if self.fn_weight == 1.0 or not self.model
                         else f"{self.fn_weight:g} × reward function {self.spec}")
        return " + ".join(parts)

    def function_scores(self, prompt_idx: Sequence[int], answers: Sequence[str]) -> torch.Tensor:
        """(B,) fn(messages of prompt prompt_idx[b], answers[b]), float64; a RewardError naming the prompt
        when the function raises or returns a non-number or a non-finite value."""
        out = []
        for i, answer in zip(prompt_idx, answers):
            try:
                v = self.fn([dict(m) for m in self.prompts[i]], answer)
            except Exception as e:  # noqa: BLE001 (any error of the user's function, named by its prompt)
                raise RewardError(f"rl.reward_fn={self.spec} raised {type(e).__name__} on {self.where(i)}: "
                                  f"{' '.join(str(e).split())}") from None
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardError(f"rl.reward_fn={self.spec} returned {type(v).__name__} {_short(v)} on {self.where(i)}; "
                                  "expected a number (float)")
            if not math.isfinite(v):
                raise RewardError(f"rl.reward_fn={self.spec} returned {v} on {self.where(i)}; expected a finite number")
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float64)


def _short(v) -> str:
    text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."


def from_config(cfg, prompts: Sequence[list[dict]] = (), where: Callable[[int], str] = _built_in) -> Reward:
    """The run's Reward from `cfg.rl`, the function imported; a module with `reward_setup(cfg)` (e.g. the
    world's graders, which read `cfg.world`) gets the run's settings once here."""
    r = cfg.rl
    fn = None
    if r.reward in ("function", "both"):
        fn = load_function(r.reward_fn)
        setup = getattr(importlib.import_module(r.reward_fn.partition(":")[0]), "reward_setup", None)
        if callable(setup):
            setup(cfg)
    return Reward(r.reward_model_weight if r.reward in ("model", "both") else None, fn, r.reward_fn_weight,
                  r.reward_fn, prompts, where)


def answers(tok, tokens: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor) -> list[str]:
    """The responses as text: tokens (B, N), mask (B, N) 1 up to and including EOS, has_eos (B,); each
    decoded up to (not including) its EOS, as `rollout.sampler.generate` (and so `cherrytop eval`) does."""
    n = (mask.sum(1).long() - has_eos.long()).tolist()
    rows = tokens.tolist()
    return [tok.decode(rows[b][: n[b]], skip_special_tokens=True).strip() for b in range(len(rows))]


def score_episodes(reward: Reward, rm_head: torch.Tensor | None, rm_f: torch.Tensor | None, mask: torch.Tensor,
                   texts: Callable[[], list[str]] | None = None, prompt_idx: Sequence[int] | None = None,
                   d: distributed.Dist = distributed.SOLO) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The episodes' scores for `rl.experience.advantages`: head (B,) = w_rm · rm_head + w_fn · fn, read
    at the last token, and f (B, N) = w_rm · rm_f, the reward model's dense c · log π_ref term (zeros
    without the reward model). rm_head (B,) and rm_f (B, N) are the reward model's (None when it is no
    part); mask (B, N); `texts()` the answers (decoded only when the function needs them) to the prompts
    `prompt_idx`. Statistics: each part's mean, unweighted (objective/rm_score = head + Σ_t f_t before the
    EOS penalty, objective/fn_score), over every rank's episodes (`d`)."""
    stats, head, f = {}, torch.zeros(mask.shape[0], dtype=mask.dtype, device=mask.device), torch.zeros_like(mask)
    if reward.model:
        stats["objective/rm_score"] = float((rm_head + rm_f.sum(1)).mean())
        head, f = reward.model_weight * rm_head, reward.model_weight * rm_f
    if reward.fn is not None:
        fn = reward.function_scores(prompt_idx, texts())  # (B,) float64
        stats["objective/fn_score"] = float(fn.mean())
        head = head + (reward.fn_weight * fn).to(head.dtype).to(head.device)
    return head, f, distributed.mean_over_ranks(stats, d) if stats else stats
