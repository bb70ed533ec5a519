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
from cherrytop.data.collate import step_indices
from cherrytop.rl.experience import PPO, Method, Rollout
from cherrytop.rollout import packing
from cherrytop.rollout.episodes import response_logp, response_pack, response_values
from cherrytop.train import distributed

LossFn = Callable[[Rollout], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""micro-batch -> (its loss, a token mean over the micro-batch; statistics, token means too)."""
Forward = Callable[[Callable, object], object]
"""How a pass of a trained model runs: fwd(fn, x) = fn(model, x), inside its DDP / FSDP wrapper if it has one."""


def shared_pack(ids: torch.Tensor, attn: torch.Tensor, *models) -> packing.Packed | None:
    """The padding-free layout of a batch of episodes (`episodes.response_pack`), built once for several
    models' passes; None when none of them runs packed."""
    return response_pack(ids, attn) if any(packing.supports_packing(m) for m in models) else None


def _plain(model: torch.nn.Module) -> Forward:
    return lambda fn, x: fn(model, x)


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


def value_objective(v: torch.Tensor, part: Rollout, p) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value loss of micro-batch `part` given its values under the current value model, v (B, N) with
    gradient: vf_coef · the clipped value loss [LHP]. Returns (loss, statistics)."""
    vf, stats = L.ppo_value_loss(v, part.old_values, part.returns, part.mask, p.value_clip)
    return p.vf_coef * vf, {"loss/value": vf, **stats}


def ptx_loss(fwd: Forward, windows: torch.Tensor, p, seed: int, device: torch.device, d: distributed.Dist = distributed.SOLO,
             amp: Callable = nullcontext) -> Callable[[int], dict[str, float]]:
    """PPO-ptx [IG eq. 2] as `train`'s `extra`: at optimizer step `step`, ptx_coef · the LM loss of `ptx_batch_size`
    pretraining windows (N, T) (this rank's share of them), back-propagated into the policy (`fwd`)."""
    def lm_of(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return L.lm_loss(model(input_ids=x).logits, x)

    def ptx(step: int) -> dict[str, float]:
        idx = step_indices(len(windows), p.ptx_batch_size, step, seed + 1)
        x = windows[torch.as_tensor(idx)][d.rank:: d.world].to(device)  # this rank's share (B_ptx / world, T)
        with amp():
            s, c = fwd(lm_of, x)
        count = c if d.world == 1 else distributed.all_sum(float(c), d)  # tokens of all ranks' windows
        (p.ptx_coef * s / count * d.world).backward()
        return {"loss/ptx": float(s.detach() / c)}  # windows are equally long
    return ptx


def policy_update(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Rollout, p, it: int, seed: int,
                  m: Method = PPO, beta: float = 0.0, *, fwd: Forward | None = None, d: distributed.Dist = distributed.SOLO,
                  ema=None, windows: torch.Tensor | None = None, amp: Callable = nullcontext) -> dict[str, float]:
    """The policy's optimizer steps of iteration `it` (step 5), on every placement: the clipped loss aggregated
    as algorithm `m` says (+ β · its KL term when the KL is in the loss, `policy_objective`), + ptx_coef · the
    pretraining LM loss when `windows` are given (PPO-ptx), each pass through `fwd` (the model's DDP / FSDP
    wrapper; the model itself by default) on the padding-free layout where the model allows. Returns `train`'s
    statistics (this rank's; the caller averages them over ranks)."""
    fwd = fwd or _plain(model)
    device = next(model.parameters()).device

    def logp_of(net, part: Rollout) -> torch.Tensor:  # (B, N) log π_θ with gradient
        P = part.ids.shape[1] - part.mask.shape[1]
        return response_logp(net, part.ids, part.attn, part.pos, P, p.temperature, pk=shared_pack(part.ids, part.attn, net))

    def loss(part: Rollout):
        return policy_objective(fwd(logp_of, part), part, p, m, beta)
    extra = ptx_loss(fwd, windows, p, seed, device, d, amp) if windows is not None else None
    return train(model, opt, batch, p, it, seed, loss, "policy", sync=fwd, d=d, ema=ema, extra=extra, amp=amp, agg=m.agg)


def value_update(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Rollout, p, it: int, seed: int, *,
                 fwd: Forward | None = None, d: distributed.Dist = distributed.SOLO,
                 amp: Callable = nullcontext) -> dict[str, float]:
    """The value model's optimizer steps of iteration `it` (PPO's critic), on the policy's minibatch order:
    `value_objective` of each micro-batch, passes through `fwd` as in `policy_update`."""
    fwd = fwd or _plain(model)

    def values_of(net, part: Rollout) -> torch.Tensor:  # (B, N) V_θ with gradient
        P = part.ids.shape[1] - part.mask.shape[1]
        return response_values(net, part.ids, part.attn, part.pos, P, pk=shared_pack(part.ids, part.attn, net))

    def loss(part: Rollout):
        return value_objective(fwd(values_of, part), part, p)
    return train(model, opt, batch, p, it, seed, loss, "value", sync=fwd, d=d, amp=amp)


def explained_variance(batch: Rollout) -> dict[str, float]:
    """How well the rollout's values V_old predicted the returns (as cleanRL / Stable-Baselines log it): no
    extra value pass; the same on every rank, which holds the global batch."""
    return {"value/explained_variance": float(L.explained_variance(batch.old_values, batch.returns, batch.mask))}
