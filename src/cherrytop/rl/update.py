"""One model's updates of an iteration (stage 6's step 5): `ppo_epochs` passes over shuffled
minibatches, each split into micro-batches weighted by their share of the minibatch's tokens, then
clipping, the optimizer step and (for the policy) the weight average. One copy for every placement:
the single process and torchrun (both models in one process, through their DDP / FSDP wrappers) and
the Ray trainer actors (one model each) run the same loop, so their updates and logged statistics agree."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from cherrytop import losses as L
from cherrytop.rl.experience import PPO, Method, Rollout
from cherrytop.train import distributed

LossFn = Callable[[Rollout], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""micro-batch -> (its loss, a token mean over the micro-batch; statistics, token means too)."""


def minibatches(p, it: int, seed: int):
    """The update order of iteration `it`: (step, minibatch indices) over ppo_epochs shuffles of the
    batch, one generator per iteration, so every process that updates a model sees the same order."""
    g = torch.Generator().manual_seed(seed * 7919 + it)
    n_mb = p.batch_size // p.minibatch_size
    for epoch in range(p.ppo_epochs):
        order = torch.randperm(p.batch_size, generator=g)
        for m in range(n_mb):
            yield (it * p.ppo_epochs + epoch) * n_mb + m, order[m * p.minibatch_size: (m + 1) * p.minibatch_size]


def micro_batches(batch: Rollout, mb: torch.Tensor, p, agg: str = "token_mean"):
    """The micro-batches of minibatch `mb`, each with its weight: its share of the minibatch's tokens
    (`agg` = token_mean) or of its answers (the per-answer aggregations of `losses.aggregate`), so that the
    summed weighted losses give the minibatch's loss and gradient exactly."""
    tokens = batch.slice(mb).mask.sum().clamp(min=1)
    for j in range(0, p.minibatch_size, p.micro_batch_size):
        part = batch.slice(mb[j: j + p.micro_batch_size])
        yield part, (part.mask.sum() / tokens if agg == "token_mean" else torch.tensor(len(part.mask) / len(mb)))


def policy_objective(logp: torch.Tensor, part: Rollout, p, m: Method = PPO, beta: float = 0.0
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of micro-batch `part` given its log-probs under the current policy, logp (B, N) with
    gradient: the clipped surrogate aggregated as algorithm `m` says [LHP, GRPO, DrG] (Dr. GRPO divides its
    token sums by ppo.max_new_tokens), plus, with the KL in the loss, β · the KL estimate k_t(logp, ref_logp)
    aggregated the same way (the gradient flows through logp). Returns (loss, statistics)."""
    pg, stats = L.ppo_policy_loss(logp, part.old_logp, part.advantages, part.mask, p.clip, m.agg, p.max_new_tokens)
    out = {"loss/policy": pg, **stats}
    if m.kl_in == "loss":
        kl = L.aggregate(L.kl_estimate(logp, part.ref_logp, part.mask, m.kl_estimator), part.mask, m.agg, p.max_new_tokens)
        out["loss/kl"] = kl
        pg = pg + beta * kl
    return pg, out


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Rollout, p, it: int, seed: int, loss_fn: LossFn,
          what: str, *, sync=None, d: distributed.Dist = distributed.SOLO, ema=None,
          extra: Callable[[int], dict[str, float]] | None = None, amp: Callable = nullcontext,
          agg: str = "token_mean") -> dict[str, float]:
    """Every optimizer step of `model` in iteration `it`; returns the statistics of `loss_fn` (token means
    over each minibatch, every rank's micro-batches weighted by their tokens as the loss is) averaged over
    the steps, and those of `extra`.

    Data-parallel (`d`): `batch` is the global batch on every rank; each rank runs its share of each
    minibatch's micro-batches and back-propagates world · its weighted loss, which DDP / FSDP (`sync`, the
    model's wrapper) average into the single-process gradient. `extra(step)`: more gradient before the
    step (PPO-ptx's LM loss), returning its statistics. `amp()`: the context of the forward passes.
    `agg`: how `loss_fn` reduces its micro-batch (`losses.aggregate`), which sets the micro-batches' weights."""
    acc: dict[str, list[float]] = {}
    for step, mb in minibatches(p, it, seed):
        mine = distributed.shard(list(micro_batches(batch, mb, p, agg)), d)  # all of them in one process
        sums: dict[str, float] = {}  # Σ w · micro-batch token mean (× world: `mean_over_ranks` divides by it)
        for i, (part, w) in enumerate(mine):
            last = i == len(mine) - 1  # gradients are synced on the model's last backward of the step
            with distributed.no_grad_sync(sync, not last or extra is not None) if sync is not None else nullcontext():
                with amp():
                    loss, stats = loss_fn(part)
                (w * d.world * loss).backward()  # DDP / FSDP average over the d.world ranks
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + float(w) * d.world * float(val.detach())
        for k, val in sums.items():
            acc.setdefault(k, []).append(val)
        if extra is not None:
            for k, val in extra(step).items():
                acc.setdefault(k, []).append(val)
        gn = distributed.full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip))
        if not math.isfinite(gn):
            raise FloatingPointError(f"ppo: non-finite {what} gradient at iteration {it + 1}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
    return {(k if k.startswith("loss/") else "policy/" + k): float(np.mean(vals)) for k, vals in acc.items()}
