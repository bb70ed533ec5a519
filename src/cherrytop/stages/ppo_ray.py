"""Stage 6 on Ray: the PPO models as Ray actors placed on chosen devices — a policy trainer, a
value trainer (PPO only: the critic-free `rl.algorithm`s have none), the reward model, the reference
model (none with LoRA: the policy trainer runs its policy with the adapter off) and rollout workers
that sample with a copy of the policy whose weights the trainer pushes after every update (only the
trainable ones: the adapters, with LoRA).

The maths is stage 6's, from the RL core: the experience (`rl.experience.advantages`) and each
model's update (`rl.update.policy_update` / `value_update`, PPO-ptx included) are the very functions
the single process runs, the policy and value updates run by their own actors at the same time, on
the same minibatch order. The batch is the single process's: a prompt's `rl.group_size` answers are
contiguous, and the rollout workers each sample whole groups, in order. Overlap: the next rollout is
generated while the value model is still training; the policy's old log-probs, the reference's,
the values and the reward are computed in parallel. On GPU every actor's forward passes run under
bf16 autocast (`dist.bf16`), as stage 6's do. A run resumes from its checkpoint as stage 6 does: the
trainers' optimizer states, the live weights beside the saved average, β and every random stream
(the rollout workers' samplers, the trainers' and the driver's) are kept in its training state.

One machine: `cherrytop ppo --ray.enabled=true` starts Ray here (CPU actors unless
`--ray.gpus_per_model` > 0). A cluster: `ray start --head` on one node, `ray start
--address=HEAD:6379` on the others (same venv, a shared filesystem for runs/), then on the head
`cherrytop ppo --ray.enabled=true --ray.address=auto --ray.gpus_per_model=1 --ray.rollout_workers=4`.
Placement: `ray.resources` pins a role's actors to a Ray custom resource, `ray.nodes` to a node;
`placement` checks the plan against the cluster before any actor starts (docs/scaling.md).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cherrytop import losses as L
from cherrytop.config import Config, DistConfig, RayConfig, role_gpus, role_map, to_dict
from cherrytop.data.collate import step_indices
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model import lora
from cherrytop.model.heads import loglik_term
from cherrytop.model.load import context_window, resolve_checkpoint
from cherrytop.rollout.episodes import response_logp, response_values
from cherrytop.rl import rewards
from cherrytop.rl.experience import PPO, Rollout, advantages, initial_beta, method
from cherrytop.rl.update import explained_variance, policy_update, value_update
from cherrytop.stages.ppo import (WeightEMA, _watch, adamw, check_reward_tokenizer, describe_method, encode_prompts,
                                  episode_reward, ptx_windows, reference_path, value_savings)
from cherrytop.train.checkpoint import load_state, save_checkpoint
from cherrytop.train.loop import MetricsLog, console, kept


def _device() -> torch.device:
    """The actor's GPU if Ray gave it one, else the CPU (also outside Ray: asking Ray would start it)."""
    import ray
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device) if device.type != "cpu" else x


class PlacementError(ValueError):
    """Actors the Ray cluster could never place (Ray itself would wait for them forever)."""


def _show(res: dict[str, float]) -> str:
    """Resources as `CPU 8, GPU 1, trainer 2` (Ray's memory and per-node entries left out)."""
    keep = {k: v for k, v in res.items() if k not in ("memory", "object_store_memory") and not k.startswith("node:")}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items())) or "nothing"


def _nodes_text(nodes: list[dict]) -> str:
    return "; ".join(f"{n['NodeManagerAddress']} (id {n['NodeID'][:12]}): {_show(n['Resources'])}" for n in nodes)


def _node(name: str, alive: list[dict]) -> dict:
    """The alive node `name` is the IP address, host name or id of (`ray.nodes`)."""
    hits = [n for n in alive if name in (n["NodeID"], n["NodeManagerAddress"], n.get("NodeManagerHostname"))]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise PlacementError(f"ray.nodes: no alive node of the Ray cluster is '{name}'; its nodes: {_nodes_text(alive)}")
    raise PlacementError(f"ray.nodes: {len(hits)} nodes answer to '{name}' (several Ray nodes on one machine); "
                         f"give a node id: {', '.join(n['NodeID'] for n in hits)}")


def placement(rc: RayConfig, roles: list[str], nodes: list[dict]) -> dict[str, dict]:
    """{role: Ray actor options} for the actors of `roles` (a role once per actor: `rollout` once per
    worker): 1 CPU, the role's GPUs (`ray.gpus`, else `ray.gpus_per_model`), one unit of the role's
    custom resource (`ray.resources`), the role's node (`ray.nodes`: NodeAffinitySchedulingStrategy, not soft).
    Checked against the cluster's `nodes` (`ray.nodes()`) first, since Ray waits forever for an actor
    it cannot place: every actor must fit on one node (its own, when pinned), and all of them
    together in the cluster's (and each pinned node's) totals. Raises PlacementError naming the
    actor, what it asks for and what the cluster has."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    custom, pinned, gpus = role_map(rc.resources, "ray.resources"), role_map(rc.nodes, "ray.nodes"), role_gpus(rc)
    alive = [n for n in nodes if n.get("Alive", True)]
    target = {role: _node(pinned[role], alive) for role in dict.fromkeys(roles) if role in pinned}
    need = {role: {"CPU": 1.0, **({"GPU": gpus[role]} if gpus[role] else {}),
                   **({custom[role]: 1.0} if role in custom else {})} for role in roles}
    for role in dict.fromkeys(roles):  # each actor on one node
        where = [target[role]] if role in target else alive
        if not any(all(n["Resources"].get(k, 0.0) >= v for k, v in need[role].items()) for n in where):
            absent = [k for k in need[role] if not any(k in n["Resources"] for n in alive)]
            hint = (f"; no node has '{absent[0]}': start one with `ray start --resources='{{\"{absent[0]}\": N}}'`"
                    if absent and absent[0] != "GPU" else "; set ray.resources, ray.nodes, ray.gpus or ray.gpus_per_model to fit")
            on = f" on node {pinned[role]}" if role in target else " on one node"
            raise PlacementError(f"ray: a {role} actor needs {_show(need[role])}{on}, which the Ray cluster cannot give "
                                 f"(nodes: {_nodes_text(where)}){hint}")
    on_node = {n["NodeID"]: (f"node {n['NodeManagerAddress']}", n) for n in target.values()}
    groups = [("the cluster", roles, alive)] + [(name, [r for r in roles if r in target and target[r] is n], [n])
                                                 for name, n in on_node.values()]
    for name, members, where in groups:  # all of them together
        for k in {k for r in members for k in need[r]}:
            want, have = sum(need[r].get(k, 0.0) for r in members), sum(n["Resources"].get(k, 0.0) for n in where)
            if want > have + 1e-9:
                counts = ", ".join(f"{r} ×{members.count(r)}" for r in dict.fromkeys(members) if k in need[r])
                fix = "start fewer actors" if name == "the cluster" else "pin fewer actors to it"
                raise PlacementError(f"ray: the actors ({counts}) need {want:g} {k} in all and {name} has {have:g}; give it "
                                     f"more (`ray start --resources=...`, --num-cpus, --num-gpus) or {fix}")
    return {role: {"num_cpus": 1, "num_gpus": gpus[role],
                   **({"resources": {custom[role]: 1.0}} if role in custom else {}),
                   **({"scheduling_strategy": NodeAffinitySchedulingStrategy(target[role]["NodeID"], soft=False)}
                      if role in target else {})}
            for role in dict.fromkeys(roles)}


class Actor:
    """What every PPO actor says about itself: where Ray placed it (logged, and kept in the checkpoint)."""
    device: torch.device
    model: torch.nn.Module

    def where(self) -> dict:
        """{node: Ray node id, resources: what Ray assigned it, device, dtypes: of its weights}."""
        import ray
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "resources": dict(ctx.get_assigned_resources()), "device": str(self.device),
                "dtypes": sorted({str(q.dtype).removeprefix("torch.") for q in self.model.parameters()})}


def _resumed(ckpt: str | None) -> dict | None:
    """The training state of the checkpoint a trainer actor resumes from (None: a fresh start)."""
    return load_state(Path(ckpt)) if ckpt else None


class PolicyTrainer(Actor):
    """The policy, its optimizer, its weight average, the pretraining windows of PPO-ptx and (with LoRA)
    the reference = the policy with its adapter off. `resume`: the checkpoint to go on from (its folder holds
    the average; the live weights, the optimizer and this actor's random state are in its training state)."""

    def __init__(self, cfg: Config, init: str, resume: str | None = None):
        from cherrytop.model.load import load_model
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.p, self.m, self.device = cfg, cfg.ppo, method(cfg.rl), _device()
        state, adapters = _resumed(resume), lora.enabled(cfg, "ppo")
        model = load_model(resume if state is not None and not adapters else init)
        self.model = lora.prepare(model, cfg, "ppo")  # LoRA, gradient checkpointing, as configured
        if state is not None and adapters:
            lora.load_adapter(self.model, Path(resume))
        self.model.to(self.device)
        self.opt = adamw(self.model, self.p.lr)
        self.ema = WeightEMA(self.model, self.p.ema) if self.p.ema > 0 else None  # [IG] weight average: what is saved
        self.windows = (ptx_windows(cfg, load_tokenizer(init), context_window(self.model.config))
                        if self.p.ptx_coef > 0 else None)  # PPO-ptx's pretraining windows (N, T)
        if state is not None:
            self.opt.load_state_dict(state["opt_policy"])
            if self.ema is not None:
                self.ema.assign(state["live_policy"])
            torch.set_rng_state(state["rng_policy"])

    @torch.no_grad()
    def logp(self, ids, attn, pos, P: int, reference: bool = False, entropy: bool = False):
        """(B, N) log π_old and entropy, or log π_ref when `reference` (LoRA only; with its entropy if asked)."""
        self.model.eval()
        args = [_on(x, self.device) for x in (ids, attn, pos)]
        with lora.autocast(self.device, self.cfg.dist.bf16):
            if reference:
                out = response_logp(lora.Reference(self.model), *args, P, self.p.temperature, with_entropy=entropy)
                return tuple(x.cpu() for x in out) if entropy else out.cpu()
            logp, ent = response_logp(self.model, *args, P, self.p.temperature, with_entropy=True)
        return logp.cpu(), ent.cpu()

    def train(self, batch: Rollout, it: int, beta: float) -> dict:
        """The policy half of `ppo.update` (`rl.update.policy_update`): the algorithm's policy loss (+ β · its KL
        term when the KL is in the loss, + ptx_coef · the LM loss for PPO-ptx), micro-batched."""
        self.model.train()
        return policy_update(self.model, self.opt, batch.to(self.device), self.p, it, self.cfg.run.seed, self.m, beta,
                             ema=self.ema, windows=self.windows, amp=lambda: lora.autocast(self.device, self.cfg.dist.bf16))

    def state(self) -> dict:
        """What a resumed run needs beyond the saved folder: the optimizer, the live weights, the random state."""
        return {"opt_policy": self.opt.state_dict(), "rng_policy": torch.get_rng_state(),
                **({"live_policy": self.ema.live()} if self.ema is not None else {})}

    def weights(self) -> dict[str, torch.Tensor]:
        """What the rollout workers need: the trainable tensors (all weights, or only the adapters)."""
        return {n: q.detach().cpu().clone() for n, q in self.model.named_parameters() if q.requires_grad}

    def save(self, out: str) -> None:
        """The policy folder holds the weight average (when `ppo.ema` > 0); rollouts use the live weights."""
        with self.ema.swapped() if self.ema is not None else nullcontext():
            lora.save_merged(self.model, Path(out))


class ValueTrainer(Actor):
    """The value model (initialised from the reward model [IG]) and its optimizer."""

    def __init__(self, cfg: Config, rm_path: str, pad_id: int, resume: str | None = None):
        from cherrytop.model.heads import scalar_model_from
        self.cfg, self.p, self.device = cfg, cfg.ppo, _device()
        state, adapters = _resumed(resume), lora.enabled(cfg, "ppo")
        model = scalar_model_from(Path(resume) / "value" if state is not None and not adapters else rm_path, pad_id)
        self.model = lora.prepare(model, cfg, "ppo", heads=("score",))
        if state is not None and adapters:
            lora.load_adapter(self.model, Path(resume) / "value")
        self.model.to(self.device)
        self.opt = adamw(self.model, self.p.value_lr)
        if state is not None:
            self.opt.load_state_dict(state["opt_value"])
            torch.set_rng_state(state["rng_value"])

    @torch.no_grad()
    def values(self, ids, attn, pos, P: int):
        self.model.eval()
        with lora.autocast(self.device, self.cfg.dist.bf16):
            return response_values(self.model, *(_on(x, self.device) for x in (ids, attn, pos)), P).cpu()

    def train(self, batch: Rollout, it: int) -> dict:
        """The value half of `ppo.update` (`rl.update.value_update`), and the rollout values' explained variance."""
        self.model.train()
        out = value_update(self.model, self.opt, batch.to(self.device), self.p, it, self.cfg.run.seed,
                           amp=lambda: lora.autocast(self.device, self.cfg.dist.bf16))
        return out | explained_variance(batch)

    def state(self) -> dict:
        return {"opt_value": self.opt.state_dict(), "rng_value": torch.get_rng_state()}

    def save(self, out: str) -> None:
        lora.save_merged(self.model, Path(out))


class Scorer(Actor):
    """A frozen model: the reward model (`score`) or the reference policy (`logp`), with weights in
    `dist.frozen_dtype` (bf16 on GPU by default), no gradients and no optimizer."""

    def __init__(self, kind: str, path: str, pad_id: int, temperature: float, dist: DistConfig):
        from cherrytop.model.heads import scalar_model_from
        from cherrytop.model.load import frozen_dtype, load_model
        self.device, self.temperature, self.bf16 = _device(), temperature, dist.bf16
        dtype = frozen_dtype(dist.frozen_dtype, self.device)
        model = scalar_model_from(path, pad_id, dtype, require_head=True) if kind == "reward" else load_model(path, dtype)
        self.model = model.eval().requires_grad_(False).to(self.device)

    def value_savings(self, lora_on: bool) -> str:
        """The start-up line's account of what a critic-free run does not hold (`ppo.value_savings`)."""
        return value_savings(self.model, lora_on)

    @torch.no_grad()
    def score(self, ids, attn, pos):
        from cherrytop.rollout.episodes import reward
        with lora.autocast(self.device, self.bf16):
            return reward(self.model, *(_on(x, self.device) for x in (ids, attn, pos))).cpu()

    @torch.no_grad()
    def logp(self, ids, attn, pos, P: int, entropy: bool = False):
        with lora.autocast(self.device, self.bf16):
            out = response_logp(self.model, *(_on(x, self.device) for x in (ids, attn, pos)), P, self.temperature,
                                with_entropy=entropy)
        return tuple(x.cpu() for x in out) if entropy else out.cpu()


class RolloutWorker(Actor):
    """Samples responses with a copy of the policy; `set_weights` receives the trainer's update."""

    def __init__(self, cfg: Config, init: str, seed: int):
        from cherrytop.model.load import load_model
        self.cfg, self.device = cfg, _device()
        model = load_model(init)
        self.model = (lora.prepare(model, cfg, "ppo") if lora.enabled(cfg, "ppo") else model).eval().to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> int:
        missing = set(weights) - set(n for n, _ in self.model.named_parameters())
        if missing:
            raise KeyError(f"rollout worker: unknown weights {sorted(missing)[:3]}")
        self.model.load_state_dict(weights, strict=False)
        return len(weights)

    def checksum(self) -> float:
        return float(sum(q.double().sum() for q in self.model.parameters()))

    def rng(self) -> torch.Tensor:
        """The sampler's random stream, saved with a checkpoint (`set_rng` puts it back on resume)."""
        return self.gen.get_state()

    def set_rng(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], pad_id: int, eos_id: int):
        from cherrytop.rollout.sampler import left_pad, sample, wants_compile
        p = self.cfg.ppo
        ids_p, mask_p = left_pad(prompt_ids, pad_id)
        with lora.autocast(self.device, self.cfg.dist.bf16):
            s = sample(self.model, _on(ids_p, self.device), _on(mask_p, self.device), max_new_tokens=p.max_new_tokens,
                       eos_id=eos_id, pad_id=pad_id, temperature=p.temperature, generator=self.gen,
                       compiled=wants_compile(p.compile_decode, self.device))
        own = getattr(s, "logprobs", None) is not None and getattr(s, "entropy", None) is not None  # saves a policy pass
        return (ids_p, mask_p, s.tokens.cpu(), s.mask.cpu(), s.has_eos.cpu(),
                (s.logprobs.cpu(), s.entropy.cpu()) if own else None)


def start_ray(cfg: Config) -> None:
    import ray
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False)
    else:  # a Ray instance on this machine; logical CPUs so every actor is placed even on 2 cores
        import os
        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default (15) starves the actors on a busy machine
        ray.init(num_cpus=max(8, 5 + cfg.ray.rollout_workers), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


@dataclass
class Actors:
    """The actors of a PPO run on Ray (handles)."""
    policy: Any
    """PolicyTrainer."""
    value: Any | None
    """ValueTrainer; None for the critic-free algorithms."""
    reward: Any
    """Scorer of the reward model."""
    reference: Any | None
    """Scorer of the reference model; None with LoRA (the policy trainer runs its policy with the adapter off)."""
    rollout: list
    """RolloutWorkers."""

    def named(self) -> dict[str, Any]:
        """Every actor by name: policy, value, reward, reference, rollout 0, rollout 1, ..."""
        one = {"policy": self.policy, "value": self.value, "reward": self.reward, "reference": self.reference}
        return {k: a for k, a in one.items() if a is not None} | {f"rollout {i}": w for i, w in enumerate(self.rollout)}


def start_actors(cfg: Config, init: str, rm_path: str, pad_id: int, ref_path: str | None = None,
                 resume: str | None = None, start: int = 0) -> Actors:
    """The PPO actors, each placed as `placement` says (checked against the running cluster first). The
    reference (`ref_path`, default `init`) is an actor of its own unless LoRA makes it the policy with
    its adapter off (only when it is `init`); there is no value trainer without a critic. `resume`: the
    trainers go on from that checkpoint; `start`: the iteration the run starts at (seeds the samplers as
    stage 6 seeds its ranks', until a saved stream is put back)."""
    import ray
    p, rc, critic = cfg.ppo, cfg.ray, method(cfg.rl).critic
    ref_path = ref_path or init
    own_ref = not lora.enabled(cfg, "ppo") or Path(ref_path).resolve() != Path(init).resolve()
    roles = (["policy"] + (["value"] if critic else []) + ["reward"] + (["reference"] if own_ref else [])
             + ["rollout"] * rc.rollout_workers)
    opts = placement(rc, roles, ray.nodes())
    W = rc.rollout_workers
    return Actors(
        policy=ray.remote(PolicyTrainer).options(**opts["policy"]).remote(cfg, init, resume),
        value=ray.remote(ValueTrainer).options(**opts["value"]).remote(cfg, rm_path, pad_id, resume) if critic else None,
        reward=ray.remote(Scorer).options(**opts["reward"]).remote("reward", rm_path, pad_id, p.temperature, cfg.dist),
        reference=None if not own_ref else ray.remote(Scorer).options(**opts["reference"]).remote(
            "reference", ref_path, pad_id, p.temperature, cfg.dist),
        rollout=[ray.remote(RolloutWorker).options(**opts["rollout"]).remote(cfg, init, (cfg.run.seed * 1000 + start) * W + k)
                 for k in range(W)])


def run(cfg: Config, fresh: bool = False, name: str = "ppo") -> dict:
    """`rl.algorithm` with Ray actors; the checkpoint (policy, + `value/` for PPO) is stage 6's, and a run
    resumes from it to the weights and logs of a run that never stopped."""
    import ray
    p, rc, m = cfg.ppo, cfg.ray, method(cfg.rl)
    if cfg.rl.reward == "function":
        raise ValueError("rl.reward=function is not supported with ray.enabled yet (its actors start from the reward "
                         "model); run it without Ray, or pass --rl.reward=both")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = run_dir / name
    init, rm_path = str(resolve_checkpoint(p.init, cfg)), str(resolve_checkpoint(p.reward_model, cfg))
    ref_path = str(reference_path(cfg, Path(init)))
    tok = load_tokenizer(init)
    check_reward_tokenizer(tok, Path(init), Path(rm_path))
    if ref_path != init:
        check_reward_tokenizer(tok, Path(init), Path(ref_path), "reference")
    iterations = p.episodes // p.batch_size
    state = None if fresh else load_state(ckpt, peek=True)  # the trainer actors read their own parts of it
    if state is not None and state.get("iteration", 0) >= iterations:
        console.print(f"[green]ppo[/]: already trained ({state['iteration']} iterations) in {ckpt}; pass --fresh to train it again")
        return state["metrics"]
    if state is not None and "ray_sampler_rng" not in state:
        raise ValueError(f"ppo (ray): {ckpt} was not written by a Ray run; resume it without --ray.enabled, or pass --fresh")
    if state is not None and len(state["ray_sampler_rng"]) != rc.rollout_workers:
        raise ValueError(f"ppo (ray): {ckpt} was written with {len(state['ray_sampler_rng'])} rollout worker(s); resume it "
                         f"with --ray.rollout_workers={len(state['ray_sampler_rng'])} (the sampled episodes depend on it), "
                         "or pass --fresh")
    from transformers import AutoConfig
    coef, rm_ref, excess = loglik_term(AutoConfig.from_pretrained(rm_path))
    if coef and Path(rm_ref or "").resolve() != Path(ref_path).resolve():  # Ray reads it off the reference actor's pass
        raise ValueError(f"the reward model's c · log π_ref term has π_ref = {rm_ref or '(not recorded)'}, but PPO's KL "
                         f"reference is {ref_path} (--ppo.reference, by default --ppo.init); with ray.enabled they must "
                         f"be the same model: {f'pass --ppo.reference={rm_ref}, ' if rm_ref else ''}run PPO without Ray, "
                         "or use a reward model trained with --rm.ref_loglik=off")
    if coef and p.temperature != 1.0:
        raise ValueError(f"the reward model's c · log π_ref term needs ppo.temperature = 1 with ray.enabled (it is "
                         f"{p.temperature}); pass --ppo.temperature=1, run PPO without Ray, or use a reward model trained "
                         "with --rm.ref_loglik=off")
    encoded = encode_prompts(cfg, tok, context_window(AutoConfig.from_pretrained(str(init))))
    torch.manual_seed(cfg.run.seed)
    beta, start, metrics = initial_beta(m, cfg), 0, {}
    if state is not None:
        torch.set_rng_state(state["rng"])
        beta, start, metrics = state["beta"], state["iteration"], state["metrics"]
        console.print(f"[yellow]ppo (ray)[/]: resuming at iteration {start} of {iterations}")
    start_ray(cfg)
    actors = start_actors(cfg, init, rm_path, tok.pad_token_id, ref_path, str(ckpt) if state is not None else None, start)
    try:
        return _train(cfg, actors, encoded, tok, ckpt, name, state, beta, start, metrics, coef, excess)
    finally:  # the actors go with the run (a second run in this process places its own)
        for a in actors.named().values():
            ray.kill(a)


def _train(cfg: Config, actors: Actors, encoded: list[list[int]], tok, ckpt: Path, name: str, state: dict | None,
           beta: float, start: int, metrics: dict, coef: float, excess: bool) -> dict:
    """The iterations `start`.. of a run on the started `actors` (`run`)."""
    import ray
    p, m = cfg.ppo, method(cfg.rl)
    policy, value, rm, ref, workers = actors.policy, actors.value, actors.reward, actors.reference, actors.rollout
    placed = dict(zip(actors.named(), ray.get([a.where.remote() for a in actors.named().values()])))
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    for who, at in placed.items():
        console.print(f"ppo (ray): {who} on node {address.get(at['node'], '?')} ({at['node'][:12]}) with "
                      f"{_show(at['resources'])}; {at['device']}, {'/'.join(at['dtypes'])} weights")
    iterations = p.episodes // p.batch_size
    log = MetricsLog(ckpt.parent, name, start * p.batch_size)  # logged by episode
    console.print(f"ppo (ray): {iterations} iterations × {p.batch_size} episodes, β={beta}, ptx_coef={p.ptx_coef}; "
                  f"{len(workers)} rollout worker(s), "
                  f"{'full policy + reference actor' if ref is not None else 'LoRA policy (reference = adapter off)'}")
    if m != PPO:
        console.print(f"ppo (ray): {describe_method(m)}"
                      + ("" if m.critic else f"; no value model: {ray.get(rm.value_savings.remote(lora.enabled(cfg, 'ppo')))}"))
    if state is not None:  # the samplers: the live policy's weights and the random streams where they were
        new = policy.weights.remote()
        ray.get([w.set_weights.remote(new) for w in workers] + [w.set_rng.remote(g) for w, g in zip(workers, state["ray_sampler_rng"])])

    def launch(it: int):  # 1. rollout: every worker samples whole groups of the iteration's prompts, in order
        idx = step_indices(len(encoded), p.batch_size // m.group_size, it, cfg.run.seed)
        shares = np.array_split(idx, len(workers))
        return [w.generate.remote([encoded[i] for i in s for _ in range(m.group_size)], tok.pad_token_id, tok.eos_token_id)
                for w, s in zip(workers, shares) if len(s)]

    scoring = episode_reward(cfg)  # rl.reward: the reward model, + a rule-based function with rl.reward=both
    t0 = time.perf_counter()
    next_parts = launch(start)
    saved_at = start if state is not None else None  # the iteration of this run's last checkpoint
    for it in range(start, iterations):
        saving = (it + 1) % p.save_every == 0 or it + 1 == iterations
        try:
            batch, stats = _score(ray.get(next_parts), policy, ref, rm, value, tok, beta, p, coef, excess, m, scoring,
                                  [i for i in step_indices(len(encoded), p.batch_size // m.group_size, it, cfg.run.seed)
                                   for _ in range(m.group_size)])  # 2-4 (each episode's prompt, as `launch` sampled it)
            pol = policy.train.remote(batch, it, beta)  # 5. both halves at once
            val = value.train.remote(batch, it) if value is not None else None
            stats.update(ray.get(pol))
            new = policy.weights.remote()
            ray.get([w.set_weights.remote(new) for w in workers])  # weights: trainer -> rollout workers
            rngs = [w.rng.remote() for w in workers] if saving else None  # the streams before the next rollout
            if it + 1 < iterations:
                next_parts = launch(it + 1)  # the next rollout runs while the value model still trains
            if val is not None:
                stats.update(ray.get(val))
            if p.kl_target > 0:
                beta = L.adaptive_kl_beta(beta, stats["objective/kl"], p.kl_target, p.kl_horizon, p.batch_size)
            stats["objective/beta"] = beta
            stats["perf/episodes_per_s"] = (it + 1 - start) * p.batch_size / (time.perf_counter() - t0)
            _watch(stats, p, it)  # NaN / KL runaway, as the single-process path watches
        except FloatingPointError as e:  # also an actor's (Ray's error is a FloatingPointError too)
            raise FloatingPointError(f"{getattr(e, 'cause', None) or e}; {kept(ckpt, saved_at)}") from None
        metrics = stats
        log.log((it + 1) * p.batch_size, stats)
        console.print(f"ppo (ray) {it + 1}/{iterations}: score {stats['objective/score']:.3f} kl {stats['objective/kl']:.3f}")
        if saving:
            st = {"stage": name, "iteration": it + 1, "beta": beta, "metrics": metrics, "config": to_dict(cfg),
                  "ray": placed, "rng": torch.get_rng_state(), "ray_sampler_rng": ray.get(rngs)}
            for part in ray.get([a.state.remote() for a in (policy, value) if a is not None]):
                st.update(part)
            _save(ckpt, policy, value, tok, cfg, st)
            saved_at = it + 1
    log.close()
    console.print(f"[green]ppo (ray)[/]: done; policy {ckpt}")
    return metrics


def _score(parts, policy, ref, rm, value, tok, beta: float, p, coef: float = 0.0,
           excess: bool = False, m=PPO, scoring: rewards.Reward | None = None,
           prompt_idx: list[int] | None = None) -> tuple[Rollout, dict]:
    """Steps 2-4 of `ppo.rollout` on the actors' outputs: log-probs, values (none without a critic: `value`
    None) and reward in parallel (+ coef · Σ log π_ref(y_t) (+ H_t when `excess`), read off the reference pass),
    then the advantages of algorithm `m`. `scoring` (by default the reward model alone) and `prompt_idx` (each
    episode's prompt, for a rule-based function) as `ppo.rollout` takes them."""
    import ray

    from cherrytop.rollout.sampler import left_pad
    scoring = scoring if scoring is not None else rewards.Reward()
    rows_p, rows_r = [], []
    for ids_p, mask_p, toks, msk, _, _ in parts:  # re-pad the workers' shares to common lengths
        for i in range(len(ids_p)):
            rows_p.append(ids_p[i][mask_p[i].bool()].tolist())
            rows_r.append((toks[i], msk[i]))
    ids_p, mask_p = left_pad(rows_p, tok.pad_token_id)
    N = max(t.shape[0] for t, _ in rows_r)
    tokens = torch.full((len(rows_r), N), tok.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(rows_r), N), dtype=torch.long)
    for i, (t, msk) in enumerate(rows_r):
        tokens[i, : len(t)], rmask[i, : len(msk)] = t, msk
    has_eos = torch.cat([part[4] for part in parts])
    P = ids_p.shape[1]
    ids, attn = torch.cat([ids_p, tokens], 1), torch.cat([mask_p, rmask], 1)  # (B, P+N)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = rmask.float()
    own = all(part[5] is not None for part in parts)
    f_old = None if own else policy.logp.remote(ids, attn, pos, P)
    with_h = bool(coef) and excess  # the reward model's term needs π_ref's entropies
    f_ref = policy.logp.remote(ids, attn, pos, P, reference=True, entropy=with_h) if ref is None \
        else ref.logp.remote(ids, attn, pos, P, entropy=with_h)
    f_val = value.values.remote(ids, attn, pos, P) if value is not None else None
    f_rm = rm.score.remote(ids, attn, pos) if scoring.model else None
    ref_out, raw = ray.get([f_ref, f_rm]) if scoring.model else (ray.get(f_ref), None)
    values = ray.get(f_val) if f_val is not None else torch.zeros(len(rows_r), N)
    ref_logp, ref_entropy = ref_out if with_h else (ref_out, None)
    if own:  # the samplers' log π_old and entropy, right-padded to N
        old_logp, entropy = torch.zeros(len(rows_r), N), torch.zeros(len(rows_r), N)
        i = 0
        for part in parts:
            lp, ent = part[5]
            old_logp[i: i + len(lp), : lp.shape[1]], entropy[i: i + len(lp), : lp.shape[1]] = lp, ent
            i += len(lp)
    else:
        old_logp, entropy = ray.get(f_old)
    values = values * mask
    f = coef * (ref_logp + ref_entropy if with_h else ref_logp) * mask  # (B, N) the reward model's log π_ref term
    head, f, scored = rewards.score_episodes(scoring, raw, f if scoring.model else None, mask,  # the weighted parts
                                             lambda: rewards.answers(tok, tokens, rmask, has_eos), prompt_idx)
    adv, returns, stats = advantages(head, f, old_logp, ref_logp, values, entropy, mask, has_eos, beta, p,
                                     coef * scoring.model_weight if scoring.model else 0.0, m=m)
    stats.update(scored)
    return Rollout(ids, attn, pos, mask, old_logp * mask, ref_logp * mask, values, adv, returns), stats


def _save(ckpt: Path, policy, value, tok, cfg: Config, state: dict) -> None:
    """The trainer actors write the weights (merged, + adapter) straight into the new folder."""
    import ray

    class Writer:
        def save_pretrained(self, out) -> None:
            ray.get([policy.save.remote(str(out))] + ([value.save.remote(str(Path(out) / "value"))] if value is not None else []))
    save_checkpoint(ckpt, Writer(), tok, cfg, state)
