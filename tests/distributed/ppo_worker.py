"""One rank of a 2-process gloo job (started by test_ppo_parallel.py with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, as torchrun would): PPO's whitening and statistics over both ranks'
episodes, the gathering of episodes padded differently on each rank, each rank's rollout scored by
the reference, reward model and the reward model's own π_ref as `ppo.parallel` places them (FSDP:
sharded), and one `ppo.update` of a global batch under DDP or FSDP2 (policy, value and weight
average written by rank 0); then the rollout and update again with LoRA adapters (the reference is
the policy with its adapter off, run through the policy's wrapper).

Also imported by the test for the single-process references (same data, models and settings)."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cherrytop.config import DistConfig, ModelConfig, PPOConfig, load_config
from cherrytop.model import lora
from cherrytop.model.heads import scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.rl.experience import initial_beta, method
from cherrytop.stages.ppo import RefLogLik, Rollout, WeightEMA, gather, parallel, reward_score, rollout, update
from cherrytop.train import distributed

V, PAD, EOS, TARGET = 24, 0, 1, 7
SETTINGS = PPOConfig(batch_size=8, minibatch_size=4, micro_batch_size=1, ppo_epochs=2, lr=1e-3, value_lr=1e-3,
                     kl_coef=0.05, max_new_tokens=8, no_eos_penalty=0.0, ptx_coef=0.5, ptx_batch_size=4, ema=0.9)
"""Two optimizer steps per epoch, each of 4 micro-batches (2 per rank) and 4 ptx windows (2 per rank)."""


class Tok:
    pad_token_id, eos_token_id = PAD, EOS


def count_target(ids, attn, pos, P):  # the reward: how often TARGET appears in the response
    return ((ids[:, P:] == TARGET) & (attn[:, P:] == 1)).sum(1).float()


PROMPTS = [[2 + i, 3 + i % 3, 4][: 1 + (i >= 4) + i % 2] for i in range(SETTINGS.batch_size)]  # rank 1's are longer


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


LORA = load_config("test", [], ["--lora.r=4", "--lora.alpha=8"])
"""The adapter runs' settings: rank-4 LoRA on every linear layer but the output."""

CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
VARIANTS = {"adamw": {}, "sgd": {"sgd": True}, "lora": {"adapters": True}} | {a: {"algorithm": a} for a in CRITIC_FREE}
"""`train_once`'s settings by name: PPO with AdamW, with SGD, with LoRA, and each critic-free algorithm (AdamW)."""


def models(out: Path, strategy: str, d: distributed.Dist, adapters: bool = False, critic: bool = True):
    """The initial policy and value model (none without a `critic`; `adapters`: with LoRA adapters, the policy's set to fixed
    non-zero values as if trained), the reference, the reward model's score function and its
    c · log π_ref term with a π_ref of its own; in a job of several processes placed by `ppo.parallel`
    (trained models wrapped; frozen ones sharded under FSDP). Returns them, the job (None alone) and
    the frozen models by name."""
    policy = AutoModelForCausalLM.from_pretrained(out / "init")
    value = scalar_model_from(out / "value_init", PAD) if critic else None
    if adapters:
        policy = lora.attach(policy, LORA)
        value = lora.attach(value, LORA, heads=("score",)) if critic else None
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, q in policy.named_parameters():
                if ".lora_B." in n:  # a fresh adapter is zero: the policy would be its reference
                    q.copy_(torch.randn(q.shape, generator=g) * 0.1)
    ref = lora.Reference(policy) if adapters else frozen(AutoModelForCausalLM.from_pretrained(out / "init"))
    rm = frozen(scalar_model_from(out / "rm", PAD))
    loglik = RefLogLik(0.5, frozen(AutoModelForCausalLM.from_pretrained(out / "init")), excess=True)
    score, par = reward_score(rm), None
    if d.world > 1:
        par, score = parallel(d, DistConfig(strategy=strategy), policy, value, ref, rm, loglik)
    held_apart = {"reward": rm, "loglik": loglik.model} | ({} if adapters else {"reference": ref})
    return policy, value, ref, score, loglik, par, held_apart


def held(model: torch.nn.Module) -> float:
    """The share of the model's weights this process holds (1: a full copy; FSDP shards: ~1 / world)."""
    local = sum((q.to_local() if hasattr(q, "to_local") else q).numel() for q in model.parameters())
    return local / sum(q.numel() for q in model.parameters())


def algorithm_config(algorithm: str):
    """The settings of `rl.algorithm` in these tests: groups of 2 answers, GRPO's KL loss weighted 0.5."""
    return load_config("test", [], [f"--rl.algorithm={algorithm}", "--rl.group_size=2", "--rl.kl_loss_coef=0.5"])


def rollout_share(out: Path, rank: int, strategy: str = "none", d: distributed.Dist = distributed.SOLO,
                  adapters: bool = False, algorithm: str = "ppo") -> tuple[Rollout, dict, dict[str, float]]:
    """Rank `rank`'s rollout of its half of PROMPTS with its own generator: in a job under `strategy`
    (the batch is then every rank's, gathered), or alone in one process (the reference). Also the
    share of each frozen model's weights this process held. `algorithm`: `rl.algorithm`, each of the
    half's first prompts sampled group_size times (whole groups on each rank) and no value model
    without a critic."""
    cfg = algorithm_config(algorithm)
    m = method(cfg.rl)
    policy, value, ref, score, loglik, par, frozen_models = models(out, strategy, d, adapters, m.critic)
    share = len(PROMPTS) // 2
    prompts = [q for q in PROMPTS[rank * share: rank * share + share // m.group_size] for _ in range(m.group_size)]
    beta = SETTINGS.kl_coef if m.kl_in == "reward" else initial_beta(m, cfg)
    batch, stats = rollout(policy, ref, score, value, Tok, prompts, beta, SETTINGS,
                           torch.Generator().manual_seed(100 + rank), loglik, par, m=m)
    return batch, stats, {k: held(m) for k, m in frozen_models.items()}


def make_data(out: Path) -> None:
    """The initial policy and value model, the ptx windows and one global rollout batch (sampled in
    one process), written under `out` for both sides of the comparison."""
    policy = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(out / "init")
    torch.manual_seed(0)
    value = scalar_model_from(out / "init", PAD)  # a new head, kept when loaded again
    value.save_pretrained(out / "value_init")
    scalar_model_from(out / "init", PAD).save_pretrained(out / "rm")  # another head: the reward model
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch, _ = rollout(policy, ref, count_target, value, Tok, PROMPTS, SETTINGS.kl_coef, SETTINGS,
                       torch.Generator().manual_seed(0))
    windows = torch.randint(2, V, (12, 10), generator=torch.Generator().manual_seed(1))
    torch.save({"batch": vars(batch), "windows": windows}, out / "data.pt")


def load_data(out: Path) -> tuple[Rollout, torch.Tensor]:
    data = torch.load(out / "data.pt")
    return Rollout(**data["batch"]), data["windows"]


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient whole (FSDP's are DTensor shards)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train_once(out: Path, strategy: str, d: distributed.Dist, sgd: bool = False, adapters: bool = False,
               algorithm: str = "ppo") -> dict:
    """One `update` of the global batch (iteration 0): the models' weights, the average's and the
    returned statistics. With AdamW and clipping as the stage runs it, or (`sgd`) with plain SGD
    and no clipping, where a step moves the weights in proportion to the gradient (Adam would hide
    a gradient off by a constant factor). `adapters`: the models with LoRA (`models`). `algorithm`:
    `rl.algorithm` (groups of 2; no value model without a critic), β its initial one (GRPO's KL in the
    loss, with a reference that differs from the policy so the term has a gradient from the first step)."""
    batch, windows = load_data(out)
    cfg = algorithm_config(algorithm)
    m = method(cfg.rl)
    if m.kl_in == "loss":
        batch.ref_logp = (batch.ref_logp - 0.3) * batch.mask
    policy, value, *_, par, _ = models(out, strategy, d, adapters, m.critic)
    p = replace(SETTINGS, grad_clip=float("inf")) if sgd else SETTINGS
    opt = torch.optim.SGD if sgd else torch.optim.AdamW
    kw = {"lr": 0.5} if sgd else {"lr": p.lr, "eps": 1e-5, "weight_decay": 0.0}
    opt_pi, opt_v = opt(policy.parameters(), **kw), opt(value.parameters(), **kw) if value is not None else None
    ema = WeightEMA(policy, p.ema)
    stats = update(policy, value, opt_pi, opt_v, batch, p, windows, 0, 0, ema, par, m=m, beta=initial_beta(m, cfg))
    return {"stats": stats,
            "policy": {n: full(q) for n, q in policy.named_parameters()},
            "value": {n: full(q) for n, q in value.named_parameters()} if value is not None else {},
            "wrapped_value": par is not None and par.value is not None,
            "average": {n: full(q) for n, q in ema.avg.items()}}


def statistics_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s (x, values, mask): 3 rows of a different length on each rank, ragged masks."""
    g = torch.Generator().manual_seed(10 + rank)
    n = 5 + 3 * rank
    x, v = torch.randn(3, n, generator=g) * 2 + 1, torch.randn(3, n, generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor([[n], [2], [n - 1]])).float()
    return x, v, mask


def check_statistics(out: Path, d: distributed.Dist) -> None:
    """Each rank's whitening, masked mean / variance, explained variance and rank-averaged means, and
    the global batch gathered from rank shares of the rollout batch cut to their own lengths."""
    from cherrytop import losses as L
    x, v, mask = statistics_data(d.rank)
    res = {"white": distributed.masked_whiten(x, mask, d), "white_keep_mean": distributed.masked_whiten(x, mask, d, False),
           "mean": distributed.masked_mean(x, mask, d), "var": distributed.masked_var(x, mask, d),
           "ev": L.explained_variance(v, x, mask, var=lambda a, m: distributed.masked_var(a, m, d)),
           "means": distributed.mean_over_ranks({"a": float(x.mean()), "b": float(d.rank)}, d)}
    batch, _ = load_data(out)
    share = batch.ids.shape[0] // d.world
    mine = batch.slice(torch.arange(d.rank * share, (d.rank + 1) * share))
    N = int(mine.mask.sum(0).nonzero().max()) + 1  # this rank's longest response
    P = batch.ids.shape[1] - batch.mask.shape[1]
    p0 = int(mine.attn[:, :P].sum(0).nonzero().min())  # first prompt column any of its prompts uses
    cut = Rollout(*(getattr(mine, f)[:, p0: P + N] if f in ("ids", "attn", "pos") else getattr(mine, f)[:, :N]
                    for f in mine.__dataclass_fields__))
    cut.pos = (cut.attn.cumsum(-1) - 1).clamp(min=0)
    res["cut_shape"] = tuple(cut.ids.shape)
    res["gathered"] = vars(gather(cut, d, PAD))
    torch.save(res, out / f"statistics_{d.rank}.pt")


def update_file(out: Path, strategy: str, variant: str) -> Path:
    return out / f"update_{strategy}{'' if variant == 'adamw' else '_' + variant}.pt"


def main() -> None:
    """argv: strategy, folder, and the `VARIANTS` to update (default: PPO's, after the statistics and rollouts)."""
    strategy, out = sys.argv[1], Path(sys.argv[2])
    variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["adamw", "sgd", "lora"]
    d = distributed.setup(DistConfig(strategy=strategy))
    if len(sys.argv) <= 3:
        check_statistics(out, d)
        for adapters in (False, True):
            batch, stats, shares = rollout_share(out, d.rank, strategy, d, adapters)
            if d.main:
                torch.save({"batch": vars(batch), "stats": stats, "held": shares},
                           out / f"rollout_{strategy}{'_lora' * adapters}.pt")
    for variant in variants:
        if "algorithm" in VARIANTS[variant]:  # the algorithm's rollout, then its update
            batch, stats, _ = rollout_share(out, d.rank, strategy, d, algorithm=variant)
            if d.main:
                torch.save({"batch": vars(batch), "stats": stats}, out / f"rollout_{strategy}_{variant}.pt")
        result = train_once(out, strategy, d, **VARIANTS[variant])
        if d.main:
            torch.save(result, update_file(out, strategy, variant))
    distributed.teardown()


if __name__ == "__main__":
    main()
    # What is checked is written; skip interpreter shutdown, where gloo's threads have aborted a
    # finished worker once in CI ("terminate called without an active exception", exit -6).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
