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
               coef: float = 0.0, d: distributed.Dist = distributed.SOLO) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Steps 3–4: per-token rewards (−β·kl_t, the score at EOS, the reward model's dense term f), optional
    reward whitening, GAE(γ, λ) [LHP], whitened advantages, and the rollout's statistics.

    head (B,) the reward model's head at EOS; f (B, N) its c · log π_ref term (0 without one, `coef` = c);
    old_logp, ref_logp, values, entropy, mask (B, N); has_eos (B,); `p` the PPO settings. Data-parallel
    (`d`): whitening and the statistics are over every rank's episodes. Returns (advantages (B, N),
    returns (B, N), statistics)."""
    kl = L.per_token_kl(old_logp, ref_logp, mask)  # (B, N)
    raw, scores, rewards = episode_rewards(head, f, kl, mask, has_eos, beta, p.no_eos_penalty)
    if p.whiten_rewards:
        rewards = distributed.masked_whiten(rewards, mask, d, shift_mean=False)
    adv, returns = L.gae(rewards, values, mask, p.gamma, p.lam)
    adv = distributed.masked_whiten(adv, mask, d)
    entropy_mean = float(distributed.masked_mean(entropy, mask, d))  # a token mean: over every rank's tokens
    stats = distributed.mean_over_ranks({  # means over episodes, as many on every rank
        "objective/score": float(scores.mean()), "objective/rm_score": float(raw.mean()),
        "objective/ref_loglik": float(f.sum(1).mean() / coef) if coef else 0.0,
        "objective/kl": float(kl.sum(1).mean()), "objective/kl_k3": float(L.kl_k3(old_logp, ref_logp, mask).sum(1).mean()),
        "objective/non_score_reward": float((-beta * kl).sum(1).mean()),
        "objective/entropy": entropy_mean,
        "rollout/length": float(mask.sum(1).mean()), "rollout/eos_rate": float(has_eos.float().mean()),
    }, d)
    return adv, returns, stats
