"""Stage 6 — PPO against the reward model with a per-token KL penalty to the SFT model.

Each iteration (numbered as in the code):
 1. rollout: sample `batch_size` responses with the policy (temperature T, KV cache);
 2. score: log π_old and log π_ref of the sampled tokens (logits / T [NB]), values V_old, and the
    reward model's score at the response's EOS (`rl.reward`: or a rule-based function's, or a weighted
    sum of both: rl/rewards.py); no EOS → the fixed `no_eos_penalty` [LHP, N+];
 3. rewards: r_t = −β·kl_t, the head's score added at the last token [LHP], and the reward model's
    c · log π_ref(y_t) term (stages/reward.py) at each token; optional whitening;
 4. advantages: GAE(γ, λ) [LHP], then whitened;
 5. `ppo_epochs` passes of minibatch updates: clipped policy loss + vf_coef · clipped value loss
    [LHP], plus ptx_coef · pretraining LM loss for PPO-ptx [IG eq. 2]; after each optimizer step the
    weight average ([IG] EMA) moves, and it is what the checkpoint's policy holds;
 6. adaptive β [LHP] when kl_target > 0; log, watch for reward hacking, checkpoint.
`--rl.algorithm` swaps steps 3–5 for a critic-free method (rl/experience.py: `method`, `advantages`):
GRPO, Dr. GRPO, RLOO and REINFORCE++-baseline sample `rl.group_size` answers per prompt and baseline
each on its group; REINFORCE++ whitens its returns over the batch. They load no value model (and save
no `value/`); the KL penalty goes in the reward or in the loss (`rl.kl_in`, `rl.kl_estimator`).
Policy, reference, reward and value models all run with dropout off ([LHP, N+]). The models that
are not trained (reference, reward model, its π_ref) hold their weights in `dist.frozen_dtype` (bf16
on GPU, fp32 on CPU by default) and never get gradients or optimizer state (`frozen_models`).

Data-parallel under `torchrun` (--dist.strategy=ddp|fsdp): each rank rolls out its share of the
iteration's prompts; reward and advantage whitening, the KL that adapts β and the logged statistics
are over every rank's episodes (`distributed.masked_*`, `mean_over_ranks`); the episodes are then
gathered so every rank holds the global batch, and each minibatch's micro-batches are shared out
(`distributed.shard`) with weights from the global minibatch's token count, so each optimizer step
is the single-process step. The policy and value models are wrapped (DDP / FSDP2); under FSDP the
frozen reference and reward models are sharded too (`parallel`), under DDP they are full copies.
Every forward pass runs under bf16 autocast on GPU (`dist.bf16`). Rank 0 logs and writes; with FSDP
checkpoints are sharded. The checkpoint holds every rank's random streams (`rng_states`), so a job
resumed on as many processes ends with the weights of one never stopped.
Launch: torchrun --nproc_per_node 8 -m cherrytop.cli ppo --dist.strategy=ddp
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from cherrytop import losses as L
from cherrytop.config import Config, DistConfig
from cherrytop.data.collate import pack_windows, step_indices
from cherrytop.data.records import DataError, locate, read_prompts
from cherrytop.data.tokenizer import TemplateError, encode_prompt, load_tokenizer
from cherrytop.model import lora
from cherrytop.model.heads import loglik_term, scalar_model_from
from cherrytop.model.load import CheckpointError, context_window, frozen_dtype, load_model, resolve_checkpoint
from cherrytop.rollout.sampler import left_pad, sample, wants_compile
from cherrytop.rollout.episodes import response_logp, response_values, reward
from cherrytop.rl import rewards
from cherrytop.rl.experience import (PPO, Method, Rollout, advantages, episode_rewards, initial_beta,  # noqa: F401
                                     method)
from cherrytop.rl.update import (explained_variance, micro_batches, minibatches, policy_objective, policy_update,  # noqa: F401
                                 shared_pack, train, value_update)
from cherrytop.train import distributed
from cherrytop.train.checkpoint import load_state, save_checkpoint
from cherrytop.config import to_dict
from cherrytop.train.loop import MetricsLog, console, kept
from cherrytop.world import World


ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(ids (B, P+N), attention mask, position ids, prompt length P) -> (B,) sequence scores."""


@dataclass
class Parallel:
    """The models of a data-parallel job (`torchrun`) as this process reaches them (`parallel`)."""
    d: distributed.Dist
    """This process's place in the job."""
    policy: torch.nn.Module
    """The policy's DDP / FSDP wrapper (`distributed.Forward`): `policy(fn, batch) = fn(model, batch)`."""
    value: torch.nn.Module | None
    """The value model's wrapper; None for the critic-free algorithms."""
    ref: torch.nn.Module | None = None
    """The wrapper the reference model's passes go through: under FSDP its own sharded one, or with
    LoRA the policy's (the reference is the policy with its adapter off); None: a full copy, called as it is."""

    @property
    def sharded(self) -> bool:
        """FSDP: every forward pass, with gradients or not, goes through the wrapper (which gathers
        the weights), and every rank makes as many."""
        return distributed.is_sharded(self.policy)


def gather(batch: Rollout, d: distributed.Dist, pad_id: int) -> Rollout:
    """Every rank's episodes in rank order as one batch, every rank holding it: prompts left-padded
    to the longest prompt of any rank, responses right-padded to the longest response."""
    N = batch.mask.shape[1]
    P = batch.ids.shape[1] - N
    P_all, N_all = distributed.all_max(P, d), distributed.all_max(N, d)

    def pad(x: torch.Tensor, fill: int) -> torch.Tensor:  # (B, P+N) -> (B, P_all+N_all)
        return torch.cat([torch.nn.functional.pad(x[:, :P], (P_all - P, 0), value=fill),
                          torch.nn.functional.pad(x[:, P:], (0, N_all - N), value=fill)], 1)
    ids, attn = pad(batch.ids, pad_id), pad(batch.attn, 0)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # as `rollout` computes it
    per_token = [torch.nn.functional.pad(getattr(batch, f), (0, N_all - N))  # (B, N_all), 0 after the response
                 for f in ("mask", "old_logp", "ref_logp", "old_values", "advantages", "returns")]
    return Rollout(*(distributed.all_cat(x, d) for x in (ids, attn, pos, *per_token)))


def _apply(model: torch.nn.Module, kw: dict):
    return model(**kw)


class Through:
    """A model called through its FSDP wrapper (which gathers the sharded weights for the pass), in
    the shape `sample` calls it. It shows the model's `config` (the sampler sizes its preallocated
    cache from it) and its `forward`'s signature (the sampler asks whether it takes `logits_to_keep`);
    every call goes through the wrapper."""

    def __init__(self, wrapped: torch.nn.Module):
        self.wrapped = wrapped
        model = wrapped.model  # distributed.Forward's
        self.config = model.config

        @functools.wraps(model.forward)
        def forward(**kw):
            return self(**kw)
        self.forward = forward

    def __call__(self, **kw):
        return self.wrapped(_apply, kw)


def _no_grad_pass(model, wrapped: torch.nn.Module | None, fn: Callable):
    """fn(model) without gradients (the caller's `torch.no_grad`): inside an FSDP wrapper (which gathers
    the sharded weights of `model`, or of the policy `model` is the adapter-off view of), resharded
    after; on the model itself otherwise (a DDP wrapper's forward would sync buffers, and no gradient
    needs its hooks)."""
    if wrapped is None or not distributed.is_sharded(wrapped):
        return fn(model)
    out = wrapped(lambda _wrapped_model, _: fn(model), None)
    wrapped.reshard()
    return out


def reward_score(rm: torch.nn.Module, wrapped: torch.nn.Module | None = None) -> ScoreFn:
    """The reward model's score at each response's last token (padding-free where the model allows);
    under FSDP through its sharded wrapper `wrapped`."""
    def score(ids, attn, pos, P):
        return _no_grad_pass(rm, wrapped, lambda m: reward(m, ids, attn, pos, packed=True))
    return score


@dataclass
class RefLogLik:
    """A reward model's c · log π_ref(response) term (model.heads, stages/reward.py), added to its score."""
    coef: float
    model: torch.nn.Module | None = None
    """π_ref when it must be run (another model than the PPO reference, or a rollout temperature ≠ 1);
    None: read it off the rollout's reference pass."""
    excess: bool = False
    """The term adds π_ref's entropy at each step (rm.ref_loglik = excess)."""
    wrapped: torch.nn.Module | None = None
    """Under FSDP: the sharded wrapper `model`'s passes go through (`parallel`)."""

    def __call__(self, ids, attn, pos, P: int, ref_logp: torch.Tensor, ref_entropy: torch.Tensor | None,
                 mask: torch.Tensor) -> torch.Tensor:
        """(B, N) log π_ref(y_t) (+ H_t) at each response token up to and including EOS (0 after);
        ref_logp and ref_entropy (B, N) are the rollout's reference pass, used when `model` is None."""
        if self.model is not None:
            ref_logp, ref_entropy = _no_grad_pass(self.model, self.wrapped, lambda m: response_logp(
                m, ids, attn, pos, P, 1.0, with_entropy=True))
        return (ref_logp + ref_entropy if self.excess else ref_logp) * mask


def ref_loglik(rm, ref_path: Path, temperature: float, ref, dtype: torch.dtype = torch.float32) -> RefLogLik | None:
    """The reward model's log-likelihood term, sharing PPO's reference model (`ref`, from `ref_path`) when
    π_ref is the same checkpoint; another π_ref is loaded frozen, with weights in `dtype`."""
    c, path, excess = loglik_term(rm.config)
    if not c:
        return None
    if path and Path(path).resolve() == Path(ref_path).resolve():
        return RefLogLik(c, None if temperature == 1.0 else ref, excess)
    if not path or not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"the reward model adds c · log π_ref(response) with π_ref = {path}, which is not a "
                              "model folder any more; train the reward model again (or with --rm.ref_loglik=off)")
    return RefLogLik(c, load_model(path, dtype).eval().requires_grad_(False), excess)


def reference_path(cfg: Config, init: Path) -> Path:
    """The KL reference's folder: `ppo.reference`, or the policy's starting point `init`."""
    return resolve_checkpoint(cfg.ppo.reference, cfg) if cfg.ppo.reference else init


def frozen_models(cfg: Config, init: Path, rm_path: Path | None, pad_id: int, policy: torch.nn.Module,
                  device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module | None, RefLogLik | None]:
    """The models PPO runs but never trains: the reference (`ppo.reference`, by default the SFT model
    `init`; with LoRA and the reference = `init`, the policy with its adapter off, no second copy), the
    reward model and its c · log π_ref term (with its own π_ref when that is another model). Loaded with
    weights in `dist.frozen_dtype` (bf16 on GPU by default), in eval mode and without gradients: no
    optimizer is ever made over them. `rm_path` None (rl.reward=function): no reward model (None, None)."""
    dtype = frozen_dtype(cfg.dist.frozen_dtype, device)
    rm = scalar_model_from(rm_path, pad_id, dtype, require_head=True).eval().requires_grad_(False) if rm_path else None
    ref_path = reference_path(cfg, init)
    if lora.enabled(cfg, "ppo") and ref_path.resolve() == init.resolve():
        ref = lora.Reference(policy)
    else:
        ref = load_model(ref_path, dtype).eval().requires_grad_(False)
    return ref, rm, ref_loglik(rm, ref_path, cfg.ppo.temperature, ref, dtype) if rm is not None else None


class WeightEMA:
    """Exponential moving average of a model's trainable weights ([IG] RL: decay 0.992), updated after
    every optimizer step; `swapped()` puts the average in the model's place (to save or evaluate it)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.avg = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}

    @torch.no_grad()
    def update(self) -> None:
        for n, q in self.model.named_parameters():
            if n in self.avg:
                self.avg[n].lerp_(q.detach(), 1.0 - self.decay)

    def live(self) -> dict[str, torch.Tensor]:
        return {n: q.detach().clone() for n, q in self.model.named_parameters() if n in self.avg}

    @torch.no_grad()
    def assign(self, weights: dict[str, torch.Tensor]) -> None:
        for n, q in self.model.named_parameters():
            if n in weights:
                q.copy_(weights[n])

    @contextmanager
    def swapped(self):
        live = self.live()
        self.assign(self.avg)
        try:
            yield
        finally:
            self.assign(live)


def _fused_adam(model: torch.nn.Module) -> bool | None:
    """AdamW's fused kernel (one pass over all parameters per step) for float parameters on CPU or CUDA;
    None (torch's default, foreach) elsewhere."""
    params = list(model.parameters())
    return True if params and all(q.device.type in ("cpu", "cuda") and q.is_floating_point() for q in params) else None


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """The policy's or the value model's optimizer (here and on Ray, stages/ppo_ray.py): AdamW, eps 1e-5,
    no weight decay, with the fused kernel where `_fused_adam` allows it (FSDP's DTensor shards too).
    Made after the model is on its device and wrapped (FSDP shards the parameters in place)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-5, weight_decay=0.0, fused=_fused_adam(model))


def load_prompts(cfg: Config) -> list[list[dict]]:
    if cfg.ppo.prompts:
        return [[{"role": m.role, "content": m.content} for m in p.messages] for p in read_prompts(cfg.ppo.prompts)]
    return [list(t.messages) for t in World(cfg.world).prompts()]


def prompt_where(cfg: Config) -> Callable[[int], str]:
    """Where prompt i (0-based) is, for a message: its file:line, or "built-in prompt N"."""
    return (lambda i: locate(cfg.ppo.prompts, i)) if cfg.ppo.prompts else (lambda i: f"built-in prompt {i + 1}")


def episode_reward(cfg: Config) -> rewards.Reward:
    """The run's score of an episode (`rl.reward`), with every prompt's messages when a function reads them."""
    if cfg.rl.reward == "model":
        return rewards.from_config(cfg)
    return rewards.from_config(cfg, load_prompts(cfg), prompt_where(cfg))


def encode_prompts(cfg: Config, tok, window: int | None) -> list[list[int]]:
    """Token ids of every prompt (`load_prompts`); a prompt the chat template refuses, or one that leaves
    no room in the model's context `window` for `ppo.max_new_tokens`, stops the stage, named by its line."""
    room = window - cfg.ppo.max_new_tokens if window else None
    if room is not None and room < 1:
        raise ValueError(f"ppo.max_new_tokens ({cfg.ppo.max_new_tokens}) leaves no room for a prompt in the policy's "
                         f"context window of {window} tokens; expected ppo.max_new_tokens < {window}")

    where = prompt_where(cfg)
    out = []
    for i, messages in enumerate(load_prompts(cfg)):
        try:
            ids = encode_prompt(tok, messages)
        except TemplateError as e:
            raise DataError(str(e), "prompts the model's chat template accepts", where(i)) from None
        if room is not None and len(ids) > room:
            raise DataError(f"prompt of {len(ids)} tokens, too long for the model's context window of {window} with "
                            f"ppo.max_new_tokens={cfg.ppo.max_new_tokens}", f"prompts of at most {room} tokens", where(i))
        out.append(ids)
    return out


def check_reward_tokenizer(tok, init: Path, rm_path: Path, role: str = "reward model") -> None:
    """The reward model (and the value model, which starts from it) reads the policy's token ids: a
    reward model with another vocabulary would index out of its embeddings, or, with a larger one, score
    other tokens than the policy wrote, without a word. Its tokenizer (else its config's vocabulary
    size) must be the policy's; a CheckpointError names both folders and the first difference. The same
    holds for the KL reference (`role` = "reference")."""
    import json
    try:
        rm_tok = load_tokenizer(rm_path)
    except (FileNotFoundError, ValueError):
        rm_tok = None
    if rm_tok is not None:
        mine, theirs = tok.get_vocab(), rm_tok.get_vocab()
        if mine == theirs:
            return
        diff = next(((t, i, theirs.get(t)) for t, i in sorted(mine.items(), key=lambda x: x[1]) if theirs.get(t) != i),
                    None)
        if diff is None:
            what = f"the {role} has tokens the policy's lacks"
        else:
            what = (f"token {diff[0]!r} is id {diff[1]} for the policy and "
                    + (f"id {diff[2]}" if diff[2] is not None else "absent") + f" for the {role}")
        detail = f"vocabularies of {len(mine)} and {len(theirs)} tokens; {what}"
    else:
        sizes = [json.loads((Path(p) / "config.json").read_text()).get("vocab_size") for p in (init, rm_path)]
        if sizes[0] == sizes[1]:
            return
        detail = f"vocabulary sizes {sizes[0]} and {sizes[1]}"
    expected = ("the policy's SFT model" if role == "reference" else
                "a reward model trained from the policy's SFT model (`cherrytop rm --rm.train.init=DIR`)")
    raise CheckpointError(f"ppo: the {role} {rm_path} has another tokenizer than the policy {init} ({detail}); "
                          f"PPO feeds the policy's token ids to the {role if role == 'reference' else 'reward and value models'}: "
                          f"expected {expected}")


def ptx_windows(cfg: Config, tok, window: int | None = None) -> torch.Tensor:
    """(N, T) the pretraining corpus in windows of `pretrain.seq_len` tokens, or of the model's context
    `window` where that is shorter."""
    from cherrytop.stages.pretrain import corpus, tokenize_documents
    docs, _ = corpus(cfg)
    return pack_windows(tokenize_documents(tok, docs), min(cfg.pretrain.seq_len, window or cfg.pretrain.seq_len),
                        tok.eos_token_id)


def check_parallel(p, cfg: Config, d: distributed.Dist) -> None:
    """The batch sizes a data-parallel job can split evenly (whole groups of answers on every rank)."""
    if d.world == 1:
        return
    G = method(cfg.rl).group_size
    bad = [f"ppo.{k} ({v})" for k, v in (("batch_size / rl.group_size" if G > 1 else "batch_size", p.batch_size // G),
                                         ("minibatch_size / micro_batch_size", p.minibatch_size // p.micro_batch_size),
                                         ("ptx_batch_size", p.ptx_batch_size if p.ptx_coef > 0 else 0)) if v % d.world]
    if bad:
        raise ValueError(f"ppo: {', '.join(bad)} must be a multiple of the number of processes ({d.world}): "
                         "each process takes an equal share of the episodes, micro-batches and ptx windows")


def parallel(d: distributed.Dist, dc: DistConfig, policy, value, ref, rm: torch.nn.Module | None,
             loglik: RefLogLik | None) -> tuple[Parallel, ScoreFn | None]:
    """The models of a data-parallel job. The trained ones are wrapped (DDP / FSDP2, which shards them in
    place: before their optimizers are made). The frozen ones (the reference, the reward model and the
    reward model's own π_ref, if any) are sharded the same way under FSDP, with no gradients and no
    optimizer state (each pass gathers their weights, on every rank alike), and are full copies on this
    rank's device under DDP. With LoRA the reference is the policy with its adapter off, run through
    the policy's wrapper. Returns the job and the reward model's score function (None without one)."""
    def place(m: torch.nn.Module) -> torch.nn.Module | None:  # a frozen model: its FSDP wrapper, or None
        if dc.strategy == "fsdp":
            return distributed.wrap(m, dc, d)
        m.to(d.device)
        return None
    wrapped_policy = distributed.wrap(policy, dc, d)
    par = Parallel(d, wrapped_policy, distributed.wrap(value, dc, d) if value is not None else None,
                   wrapped_policy if isinstance(ref, lora.Reference) else place(ref))
    if loglik is not None and loglik.model is not None:
        loglik.wrapped = par.ref if loglik.model is ref else place(loglik.model)
    return par, reward_score(rm, place(rm)) if rm is not None else None


def run(cfg: Config, fresh: bool = False, name: str = "ppo") -> dict:
    """Train the policy with `rl.algorithm`; checkpoints (policy, + `value/` for PPO) go to runs/<run>/<name>."""
    p, m = cfg.ppo, method(cfg.rl)
    d = distributed.setup(cfg.dist)
    check_parallel(p, cfg, d)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = run_dir / name
    init = resolve_checkpoint(p.init, cfg)
    scoring = episode_reward(cfg)  # the reward function imported first: a bad name stops the stage at once
    rm_path = resolve_checkpoint(p.reward_model, cfg) if scoring.model else None  # rl.reward=function: none
    tok = load_tokenizer(init)
    if rm_path is not None:
        check_reward_tokenizer(tok, init, rm_path)
    if reference_path(cfg, init) != init:
        check_reward_tokenizer(tok, init, reference_path(cfg, init), "reference")
    torch.manual_seed(cfg.run.seed)
    state = None if fresh else load_state(ckpt)
    iterations = p.episodes // p.batch_size
    if state is not None and state["iteration"] >= iterations:
        if d.main:
            console.print(f"[green]ppo[/]: already trained ({state['iteration']} iterations) in {ckpt}; pass --fresh to train it again")
        return state["metrics"]
    shards = state is not None and distributed.has_shards(ckpt)  # written under FSDP: loaded after wrapping
    adapters = lora.enabled(cfg, "ppo")  # LoRA: base weights from init/rm, adapters (and heads) from the checkpoint
    # (from its plain folder, or with its FSDP shards after wrapping)
    policy = load_model(ckpt if state and not adapters and not shards else init)
    value = None  # the critic-free algorithms have no value model (nor its optimizer)
    if m.critic:  # from the reward model [IG]; without one (rl.reward=function), the policy's init with a fresh head
        value = scalar_model_from(ckpt / "value" if state and not adapters and not shards else rm_path or init,
                                  tok.pad_token_id)
    # LoRA adapters and gradient checkpointing, as configured
    policy = lora.prepare(policy, cfg, "ppo")
    value = lora.prepare(value, cfg, "ppo", heads=("score",)) if value is not None else None
    if adapters and state and not shards:
        lora.load_adapter(policy, ckpt)
        if value is not None:
            lora.load_adapter(value, ckpt / "value")
    ref, rm, loglik = frozen_models(cfg, init, rm_path, tok.pad_token_id, policy, d.device)
    score_fn = reward_score(rm) if rm is not None else None
    par = None
    if d.world > 1:  # DDP / FSDP around the models (FSDP shards them in place: before the optimizers)
        par, score_fn = parallel(d, cfg.dist, policy, value, ref, rm, loglik)
        if state is not None and par.sharded and not shards:
            raise ValueError(f"ppo: {ckpt} was written without FSDP; resume it with --dist.strategy=ddp (or in one "
                             "process), or pass --fresh")
    else:  # one process: every model on its device (the GPU, if there is one)
        for model in (policy, value, ref, rm, loglik.model if loglik else None):
            if isinstance(model, torch.nn.Module):
                model.to(d.device)
    opt_pi, opt_v = adamw(policy, p.lr), adamw(value, p.value_lr) if value is not None else None
    live = None  # resuming: the checkpoint's policy is the weight average, the live weights are kept apart
    if shards:  # model and optimizer shards, resharded to this job (live weights with them)
        live = {n: q.detach().clone() for n, q in policy.named_parameters() if q.requires_grad} if p.ema > 0 else None
        distributed.load_sharded(ckpt, policy, opt_pi, {"live": live} if live is not None else None)
        if value is not None:
            distributed.load_sharded(ckpt / "value", value, opt_v)
    elif state is not None:
        live = state.get("live_policy")
    ema = WeightEMA(policy, p.ema) if p.ema > 0 else None
    if ema is not None and state is not None:
        ema.assign(live)
    encoded = encode_prompts(cfg, tok, context_window(policy.config))
    windows = ptx_windows(cfg, tok, context_window(policy.config)) if p.ptx_coef > 0 else None
    beta, start, metrics = initial_beta(m, cfg), 0, {}
    if state is not None:
        if not shards:
            opt_pi.load_state_dict(state["opt_policy"])
            if opt_v is not None:
                opt_v.load_state_dict(state["opt_value"])
        beta, start, metrics = state["beta"], state["iteration"], state["metrics"]
        if d.main:
            console.print(f"[yellow]ppo[/]: resuming at iteration {start} of {iterations}")
    log = MetricsLog(run_dir, name, start * p.batch_size) if d.main else distributed.NoLog()  # logged by episode
    # each rank samples its own episodes: its own stream (rank 0's is the single process's)
    gen = torch.Generator(device=d.device).manual_seed((cfg.run.seed * 1000 + start) * d.world + d.rank)
    if state is not None:
        restore_rng(state, gen, d, start)
    if d.main:
        console.print(f"ppo: {iterations} iterations × {p.batch_size} episodes, {len(encoded)} prompts, β={beta}, "
                      f"ptx_coef={p.ptx_coef}; policy {init}, {scoring.describe(rm_path)}"
                      + (f"; {d.world} processes ({cfg.dist.strategy})" if par else ""))
        if m != PPO:
            console.print(f"ppo: {describe_method(m)}"
                          + ("" if m.critic else f"; no value model: {value_savings(rm if rm is not None else policy, adapters)}"))

    def save(iteration: int) -> None:
        st = {"stage": name, "iteration": iteration, "beta": beta, "metrics": metrics, "config": to_dict(cfg),
              **rng_states(gen, d)}  # every rank's (a collective: before rank 0 alone writes)
        if par is not None and par.sharded:  # every rank writes its shards; the value folder goes in with the policy's
            staged = ckpt.with_name(f".{ckpt.name}.value-staged")
            full = iteration == iterations  # the final checkpoint is also a plain HF folder (both models)
            if value is not None:
                distributed.save_sharded(staged, value, opt_v, None, cfg, None, full, d)
            tensors = {"live": ema.live()} if ema is not None else None
            with ema.swapped() if ema is not None else nullcontext():  # the policy folder holds the average
                distributed.save_sharded(ckpt, policy, opt_pi, tok, cfg, st, full, d, tensors,
                                         (lambda out: os.replace(staged, out / "value")) if value is not None else None)
            return
        st["opt_policy"] = opt_pi.state_dict()
        if opt_v is not None:
            st["opt_value"] = opt_v.state_dict()
        if ema is not None:
            st["live_policy"] = ema.live()
        if d.main:
            def extra(out: Path) -> None:
                lora.saveable(value).save_pretrained(out / "value")
            with ema.swapped() if ema is not None else nullcontext():  # the policy folder holds the average
                save_checkpoint(ckpt, lora.saveable(policy), tok, cfg, st, extra if value is not None else None)
        distributed.barrier(d)

    from rich.progress import Progress
    t_start = time.perf_counter()
    share = p.batch_size // m.group_size // d.world  # prompts per rank (each sampled group_size times)
    with Progress(console=console, disable=not d.main) as bar:
        task = bar.add_task(name, total=iterations, completed=start)
        saved_at = start if state is not None else None  # the iteration of the last checkpoint of this run
        for it in range(start, iterations):
            idx = step_indices(len(encoded), p.batch_size // m.group_size, it, cfg.run.seed)[d.rank * share: (d.rank + 1) * share]
            prompts = [encoded[i] for i in idx for _ in range(m.group_size)]  # a prompt's group of answers is contiguous
            try:
                batch, stats = rollout(policy, ref, score_fn, value, tok, prompts, beta, p, gen, loglik, par, cfg.dist.bf16, m,
                                       scoring, [i for i in idx for _ in range(m.group_size)])
                stats.update(update(policy, value, opt_pi, opt_v, batch, p, windows, it, cfg.run.seed, ema, par,
                                    cfg.dist.bf16, m, beta))
                if p.kl_target > 0:
                    beta = L.adaptive_kl_beta(beta, stats["objective/kl"], p.kl_target, p.kl_horizon, p.batch_size)
                stats["objective/beta"] = beta
                stats["perf/episodes_per_s"] = (it + 1 - start) * p.batch_size / (time.perf_counter() - t_start)
                _watch(stats, p, it, d.main)
            except FloatingPointError as e:  # what is truly left: this run's last save, the previous run's, or none
                raise FloatingPointError(f"{e}; {kept(ckpt, saved_at)}") from None
            metrics = stats
            log.log((it + 1) * p.batch_size, stats)
            bar.update(task, completed=it + 1,
                       description=f"{name} score {stats['objective/score']:.2f} kl {stats['objective/kl']:.2f}")
            if (it + 1) % p.save_every == 0 or it + 1 == iterations:
                save(it + 1)
                saved_at = it + 1
    log.close()
    if d.main:
        console.print(f"[green]ppo[/]: done; policy {ckpt}")
    return metrics


@torch.no_grad()
def rollout(policy, ref, score_fn: ScoreFn | None, value, tok, prompt_ids: list[list[int]], beta: float, p, gen,
            loglik: RefLogLik | None = None, par: Parallel | None = None, bf16: bool = False,
            m: Method = PPO, scoring: rewards.Reward | None = None,
            prompt_idx: list[int] | None = None) -> tuple[Rollout, dict]:
    """Steps 1–4: sample, score (`scoring`, by default the reward model `score_fn` + its c · log π_ref term;
    a rule-based function reads the answers to the prompts numbered `prompt_idx`, one per episode, in
    `scoring.prompts`), shape rewards, the advantages of algorithm `m` (GAE for PPO; without a critic,
    `value` is None and the values are 0).
    Data-parallel (`par`): `prompt_ids` are this rank's; whitening and the returned statistics are
    over every rank's episodes, and the returned batch holds them all (`gather`). `bf16`: the model
    passes run under bf16 autocast on GPU (`lora.autocast`; nothing changes on CPU)."""
    d = par.d if par is not None else distributed.SOLO
    device = next(policy.parameters()).device  # where this process's models run
    amp = functools.partial(lora.autocast, device, bf16)
    policy.eval()
    ids_p, mask_p = left_pad(prompt_ids, tok.pad_token_id)
    ids_p, mask_p = ids_p.to(device), mask_p.to(device)
    sharded = par is not None and par.sharded
    with amp():
        s = sample(Through(par.policy) if sharded else policy, ids_p, mask_p, max_new_tokens=p.max_new_tokens,
                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=p.temperature, generator=gen,
                   all_stopped=(lambda stopped: distributed.all_true(stopped, d)) if sharded else None,
                   compiled=wants_compile(p.compile_decode, device) and not sharded)
    if sharded:
        par.policy.reshard()
    P = ids_p.shape[1]
    ids = torch.cat([ids_p, s.tokens], 1)  # (B, P+N)
    attn = torch.cat([mask_p, s.mask], 1)  # (B, P+N)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = s.mask.float()  # (B, N)
    old_logp, entropy = s.logprobs, s.entropy  # the sampler's own log π_old (no second policy pass)
    pk = shared_pack(ids, attn, *(x for x in (ref, value) if x is not None))  # one layout for the reference and value passes
    entropies = loglik is not None and loglik.excess and loglik.model is None  # the term needs π_ref's entropies too
    with amp():
        out = _no_grad_pass(ref, par and par.ref, lambda net: response_logp(
            net, ids, attn, pos, P, p.temperature, with_entropy=entropies, pk=pk))
        ref_logp, ref_entropy = out if entropies else (out, None)
        values = (_no_grad_pass(value, par and par.value, lambda v: response_values(v, ids, attn, pos, P, pk=pk)) * mask
                  if value is not None else torch.zeros_like(mask))  # (B, N)
        scoring = scoring if scoring is not None else rewards.Reward()
        rm_head = score_fn(ids, attn, pos, P) if scoring.model else None  # (B,)
        rm_f = (loglik.coef * loglik(ids, attn, pos, P, ref_logp, ref_entropy, mask) if loglik  # (B, N)
                else torch.zeros_like(mask)) if scoring.model else None
    head, f, scored = rewards.score_episodes(scoring, rm_head, rm_f, mask, lambda: rewards.answers(
        tok, s.tokens, s.mask, s.has_eos), prompt_idx, d)  # (B,), (B, N): the weighted parts
    adv, returns, stats = advantages(head, f, old_logp, ref_logp, values, entropy, mask, s.has_eos, beta, p,
                                     loglik.coef * scoring.model_weight if loglik and scoring.model else 0.0, d, m)
    stats.update(scored)
    batch = Rollout(ids, attn, pos, mask, old_logp * mask, ref_logp * mask, values, adv, returns)
    return (batch if par is None else gather(batch, d, tok.pad_token_id)), stats


def update(policy, value, opt_pi, opt_v, batch: Rollout, p, windows, it: int, seed: int,
           ema: WeightEMA | None = None, par: Parallel | None = None, bf16: bool = False, m: Method = PPO,
           beta: float = 0.0) -> dict:
    """Step 5: PPO epochs over shuffled minibatches, micro-batched (`rl.update.train`), the policy's
    clipped loss aggregated as algorithm `m` says (+ β · its KL term when the KL is in the loss, + ptx_coef
    · the pretraining LM loss for PPO-ptx) and then, with a critic (`value`; None without), the value
    model's clipped loss, each model with its own optimizer on the same minibatch order; after each policy step the
    weight average, if any, moves. Data-parallel (`par`): `batch` is the global batch on every rank and
    each rank runs its share of each minibatch's micro-batches (and of the ptx windows) through the
    model's DDP / FSDP wrapper. The returned statistics (losses, clipfrac, approx_kl, ...) are token
    means over each minibatch, averaged over the optimizer steps. `bf16`: the forward passes run under
    bf16 autocast on GPU, the backward passes outside it."""
    d = par.d if par is not None else distributed.SOLO
    device = next(policy.parameters()).device  # where this process's models run
    amp = functools.partial(lora.autocast, device, bf16)
    policy.train()
    if value is not None:
        value.train()
    # each pass runs inside its model's DDP / FSDP wrapper (`par`), on the padding-free layout where the model allows
    stats = policy_update(policy, opt_pi, batch, p, it, seed, m, beta, fwd=par.policy if par is not None else None, d=d,
                          ema=ema, windows=windows, amp=amp)
    if value is not None:
        stats.update(value_update(value, opt_v, batch, p, it, seed, fwd=par.value if par is not None else None, d=d, amp=amp))
    out = distributed.mean_over_ranks(stats, d)  # every rank ran as many micro-batches
    if value is not None:
        out.update(explained_variance(batch))  # `batch` is the global batch on every rank: the same number everywhere
    return out


def rng_states(gen: torch.Generator, d: distributed.Dist) -> dict[str, list[torch.Tensor]]:
    """Every rank's random state in rank order (one entry in one process), as the checkpoint keeps it:
    torch's global generator (`rng`) and the rank's sampler stream (`sampler_rng`). Every rank calls it."""
    mine = (torch.get_rng_state(), gen.get_state())
    ranks = [mine]
    if d.world > 1:
        ranks = [None] * d.world
        torch.distributed.all_gather_object(ranks, mine)
    return {"rng": [r[0] for r in ranks], "sampler_rng": [r[1] for r in ranks]}


def restore_rng(state: dict, gen: torch.Generator, d: distributed.Dist, start: int) -> None:
    """This rank's random state from the checkpoint `state` (`rng_states`; a checkpoint from before they
    were kept per rank holds one tensor of each, rank 0's). Written by as many processes as this job has:
    each rank takes its own, and the run goes on exactly as if it had never stopped. Otherwise every rank
    takes rank 0's global state and its sampler keeps the fresh seed `gen` has for iteration `start`."""
    rng, sampler = ([x] if isinstance(x, torch.Tensor) else x for x in (state["rng"], state.get("sampler_rng", [])))
    if len(sampler) == d.world:
        torch.set_rng_state(rng[d.rank])
        gen.set_state(sampler[d.rank])
        return
    torch.set_rng_state(rng[0])
    if d.main:
        console.print(f"[yellow]ppo[/]: the resume is not bit-exact: the checkpoint holds the sampling streams of "
                      f"{len(sampler)} process(es) and this job has {d.world} (the number of processes changed); "
                      f"each process samples from a fresh stream from iteration {start}")


def describe_method(m: Method) -> str:
    """The start-up line's account of the algorithm: its name, group size, and where its KL penalty goes."""
    return (f"rl.algorithm={m.algorithm}" + (f", {m.group_size} answers per prompt" if m.group_size > 1 else "")
            + f", KL {m.kl_estimator} in the {m.kl_in}")


def value_savings(rm: torch.nn.Module, lora_on: bool) -> str:
    """What a critic-free run does not hold: a value model the reward model's size (fp32 weights) and, trained
    in full, its gradients and AdamW's two moments (4 + 4 + 8 bytes a parameter; with LoRA the adapters' are small)."""
    n = sum(q.numel() for q in rm.parameters())
    total = n * (4 if lora_on else 16)
    return (f"{n / 1e6:.2f}M parameters × {4 if lora_on else 16} bytes "
            f"({'weights' if lora_on else 'weights, gradients, AdamW state'}) = {total / 2**20:.1f} MiB saved")


def _watch(stats: dict, p, it: int, main: bool = True) -> None:
    """Stop on NaN/inf; warn (rank 0) on the signs of reward hacking (KL runaway, length blow-up/collapse)."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"ppo: non-finite {', '.join(bad)} at iteration {it + 1}")
    if not main:
        return
    if stats["objective/kl"] > p.kl_warn:
        console.print(f"[red]warning[/]: KL to the SFT model is {stats['objective/kl']:.1f} nats per response "
                      f"(> ppo.kl_warn={p.kl_warn}): the policy may be over-optimising the reward model; raise ppo.kl_coef")
    if stats["rollout/length"] > 0.95 * p.max_new_tokens:
        console.print(f"[red]warning[/]: responses fill the token budget (mean length {stats['rollout/length']:.1f}): "
                      "length blow-up, a reward-hacking sign")
    if stats["rollout/length"] < 1.5:
        console.print(f"[red]warning[/]: responses collapsed to {stats['rollout/length']:.1f} tokens on average")
