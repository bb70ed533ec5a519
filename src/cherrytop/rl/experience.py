"""Sampled and scored episodes → experience: per-token rewards, KL, advantages and the rollout's
statistics (stage 6's steps 3–4). One copy, used by the single-process / torchrun path
(stages/ppo.py) and by the Ray actors (stages/ppo_ray.py), so the two cannot drift."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cherrytop import losses as L
from cherrytop.train import distributed


@dataclass
class Rollout:
    """One batch of episodes with everything the updates need."""
    ids: torch.Tensor
    """(B, P+N) prompt (left-padded) followed by the response (right-padded)."""
    attn: torch.Tensor
    """(B, P+N) 1 on prompt tokens and response tokens up to EOS."""
    pos: torch.Tensor
    """(B, P+N) position ids."""
    mask: torch.Tensor
    """(B, N) 1 on response tokens up to and including EOS."""
    old_logp: torch.Tensor
    """(B, N) log π_old(a_t | s_t) at temperature T."""
    ref_logp: torch.Tensor
    """(B, N) log π_ref(a_t | s_t) at temperature T."""
    old_values: torch.Tensor
    """(B, N) V_old(s_t)."""
    advantages: torch.Tensor
    """(B, N) whitened GAE advantages."""
    returns: torch.Tensor
    """(B, N) advantages + values (before whitening)."""

    def slice(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def to(self, device: torch.device) -> "Rollout":
        return Rollout(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


GROUP_METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
"""The algorithms that sample `rl.group_size` answers per prompt and baseline each on its group."""


@dataclass(frozen=True)
class Method:
    """`rl.*` resolved: what the rollout, the advantages and the policy loss do for one algorithm."""
    algorithm: str = "ppo"
    """ppo | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline."""
    group_size: int = 1
    """Answers per prompt (G), contiguous in the batch; 1 = one answer per prompt."""
    kl_estimator: str = "k1"
    """k1 | k2 | k3 (`losses.kl_estimate`)."""
    kl_in: str = "reward"
    """reward: −β·k_t in the per-token rewards (β = ppo.kl_coef); loss: + β·agg(k_t) in the policy loss (β = rl.kl_loss_coef)."""
    agg: str = "token_mean"
    """How the policy loss (and a KL loss term) is reduced (`losses.aggregate`)."""

    @property
    def critic(self) -> bool:
        """A value model is trained (PPO's GAE); the others have none."""
        return self.algorithm == "ppo"


PPO = Method()


def initial_beta(m: Method, cfg) -> float:
    """β of the KL penalty at the start of a run: ppo.kl_coef in the rewards, rl.kl_loss_coef in the loss
    (ppo.kl_target adapts either)."""
    return cfg.ppo.kl_coef if m.kl_in == "reward" else cfg.rl.kl_loss_coef


def method(rl) -> Method:
    """`rl` (config.RLConfig) with its `auto` choices made as each paper makes them: GRPO and Dr. GRPO put k3
    in the loss [GRPO, DrG]; PPO, RLOO and REINFORCE++ put k1 in the reward [LHP, RLOO, R++]."""
    a = rl.algorithm
    in_loss = a in ("grpo", "dr_grpo")
    return Method(a, rl.group_size if a in GROUP_METHODS else 1,
                  rl.kl_estimator if rl.kl_estimator != "auto" else ("k3" if in_loss else "k1"),
                  rl.kl_in if rl.kl_in != "auto" else ("loss" if in_loss else "reward"),
                  {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}.get(a, "token_mean"))


def episode_rewards(head: torch.Tensor, f: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor,
                    beta: float, no_eos_penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3: the reward model's score = head (B,) at EOS + Σ_t f_t, f (B, N) its per-token c · log π_ref
    term, which PPO gets token by token (dense) like the KL penalty; a response without EOS gets the
    fixed `no_eos_penalty` instead of the whole score [LHP, N+]. Returns the reward model's scores (B,),
    the scores after the EOS penalty (B,) and the per-token rewards (B, N)."""
    done = has_eos.to(f.dtype)  # (B,)
    scores = L.apply_eos_penalty(head, has_eos, no_eos_penalty)  # (B,)
    rewards = L.shaped_rewards(scores, kl, mask, beta, f * done[:, None])  # (B, N)
    return head + f.sum(1), scores + f.sum(1) * done, rewards


def advantages(head: torch.Tensor, f: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
               values: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor, beta: float, p,
               coef: float = 0.0, d: distributed.Dist = distributed.SOLO,
               m: Method = PPO) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Steps 3–4: per-token rewards (−β·kl_t, the score at EOS, the reward model's dense term f), then the
    advantages of the algorithm `m`, and the rollout's statistics:
    - ppo: optional reward whitening, GAE(γ, λ) [LHP], whitened advantages;
    - grpo / dr_grpo / rloo: the sequence reward r_i = Σ_t reward_t (= score_i − β Σ_t k_t with the KL in the
      reward) baselined on its group of G (`losses.group_advantages`), the same for every token of the answer;
    - reinforce_pp: the return Σ_{k≥t} reward_k (γ = ppo.gamma), whitened over the batch [R++];
    - reinforce_pp_baseline: the same after subtracting the group's mean score from the score [R++].
    The KL penalty k_t (`m.kl_estimator`) is in the rewards only when `m.kl_in` is reward (else β·k goes in
    the loss, `rl.update.policy_objective`).

    head (B,) the score at EOS; f (B, N) the reward model's c · log π_ref term (0 without one, `coef` = c), both
    as `rl.rewards.score_episodes` weighs them;
    old_logp, ref_logp, values (zeros without a critic), entropy, mask (B, N); has_eos (B,); `p` the PPO
    settings. Data-parallel (`d`): whitening and the statistics are over every rank's episodes (a rank holds
    whole groups). Returns (advantages (B, N), returns (B, N), statistics)."""
    kl = L.per_token_kl(old_logp, ref_logp, mask)  # (B, N) k1: what objective/kl reports (and β adapts to)
    penalty = L.kl_estimate(old_logp, ref_logp, mask, m.kl_estimator)  # (B, N) the estimate the penalty uses
    beta_r = beta if m.kl_in == "reward" else 0.0
    _, scores, rewards = episode_rewards(head, f, penalty, mask, has_eos, beta_r, p.no_eos_penalty)
    if m.algorithm == "ppo":
        if p.whiten_rewards:
            rewards = distributed.masked_whiten(rewards, mask, d, shift_mean=False)
        adv, returns = L.gae(rewards, values, mask, p.gamma, p.lam)
        adv = distributed.masked_whiten(adv, mask, d)
    elif m.algorithm in ("grpo", "dr_grpo", "rloo"):
        seq = L.group_advantages(rewards.sum(1), m.group_size, m.algorithm)  # (B,)
        adv = returns = seq[:, None] * mask  # (B, N)
    elif m.algorithm in ("reinforce_pp", "reinforce_pp_baseline"):
        if m.algorithm == "reinforce_pp_baseline":  # the score less its group's mean, at the last token
            baseline = scores - L.group_advantages(scores, m.group_size, "mean")  # (B,) the group's mean score
            rewards = rewards - L.shaped_rewards(baseline, torch.zeros_like(rewards), mask, 0.0)
        returns = L.reward_to_go(rewards, mask, p.gamma)  # (B, N)
        adv = distributed.masked_whiten(returns, mask, d)
    else:
        raise ValueError(f"unknown rl.algorithm {m.algorithm!r}")
    entropy_mean = float(distributed.masked_mean(entropy, mask, d))  # a token mean: over every rank's tokens
    stats = {  # means over episodes, as many on every rank
        "objective/score": float(scores.mean()),  # each part's mean is rl.rewards.score_episodes
        "objective/ref_loglik": float(f.sum(1).mean() / coef) if coef else 0.0,
        "objective/kl": float(kl.sum(1).mean()), "objective/kl_k3": float(L.kl_k3(old_logp, ref_logp, mask).sum(1).mean()),
        "objective/non_score_reward": float((-beta_r * penalty).sum(1).mean()),
        "objective/entropy": entropy_mean,
        "rollout/length": float(mask.sum(1).mean()), "rollout/eos_rate": float(has_eos.float().mean()),
    }
    if m.group_size > 1:  # groups whose scores are all equal: zero advantage, nothing learnt from them
        stats["rollout/equal_groups"] = float(L.equal_groups(scores, m.group_size))
    return adv, returns, distributed.mean_over_ranks(stats, d)
