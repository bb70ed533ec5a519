"""Direct preference optimisation: the policy learns from the labelers' rankings directly, with no
reward model and no sampling loop [DPO, IPO, SimPO] (`losses.preference_loss`, `losses.plackett_luce_loss`).

A K-way ranking is one batch element: each of its K answers is scored once per step, and the K scores
give all C(K, 2) pairs (a pairwise trainer runs 2 · C(K, 2) answers for them). π_ref's log-probs never
change, so they are computed once, before training, and kept with the data; when π_ref is the starting
policy (the default), the policy computes them before its first step (with LoRA, with its adapter off): no
second copy is loaded.

Online DPO (`dpo.rounds` = N > 1) [ODPO]: round 1 trains on the comparisons; round r > 1 samples
compare.k answers per training prompt from round r−1's policy, has them ranked (`dpo.ranker`: the
simulated labelers, or a reward model), and trains on them from that policy against the same π_ref.
Round r's checkpoint is `dpo_round<r>/`, its rankings `data/dpo_round<r>.jsonl`; the last round is copied
to `dpo/`. Raising `dpo.rounds` later trains the new rounds only.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cherrytop import losses as L
from cherrytop.config import Config
from cherrytop.data.collate import step_indices
from cherrytop.data.records import Comparison, DataError, locate, read_comparisons, write_jsonl
from cherrytop.data.tokenizer import TemplateError, load_tokenizer, split_response
from cherrytop.model import lora
from cherrytop.model.heads import fit_answer
from cherrytop.model.load import context_window, frozen_dtype, load_model, resolve_checkpoint
from cherrytop.rollout.episodes import episode_batch, response_logp, response_loglik
from cherrytop.stages import compare
from cherrytop.train import distributed, loop
from cherrytop.train.checkpoint import load_state

Batch = loop.Batch
Encoded = list[tuple[list[int], list[int]]]
"""One comparison's answers as (prompt ids, response ids), each within the stage's seq_len."""


def encode(tok, comps: list[Comparison], seq_len: int, where: list[tuple[Path, int]]) -> list[Encoded]:
    """Each comparison's answers, tokenised as the chat template renders prompt + answer and cut as
    the reward model cuts them (`heads.fit_answer`); one the template refuses stops the stage, named
    by its line (`where`: (file, record number) of each comparison)."""
    out = []
    for c, (path, i) in zip(comps, where, strict=True):
        msgs = [{"role": m.role, "content": m.content} for m in c.prompt]
        try:
            out.append([fit_answer(*split_response(tok, msgs, r, seq_len), seq_len)[:2] for r in c.responses])
        except TemplateError as e:
            raise DataError(str(e), "comparisons the model's chat template accepts", locate(path, i)) from None
    return out


def reference_logps(ref, encoded: list[Encoded], pad_id: int, seq_len: int) -> list[list[float]]:
    """Σ_t log π_ref(y_t) of every answer, once for the whole dataset (π_ref never changes)."""
    flat = response_loglik(ref, [p for e in encoded for p, _ in e], [r for e in encoded for _, r in e], pad_id,
                           max_len=seq_len).tolist()
    out, i = [], 0
    for e in encoded:
        out.append(flat[i: i + len(e)])
        i += len(e)
    return out


def collate(items: list[tuple[Encoded, Comparison, list[float]]], pad_id: int) -> Batch:
    """Every answer of the batch's prompts as one row of episodes (`episode_batch`), with the prompts'
    (M, Kmax, Kmax) pref / tie matrices, each row's slot in (M, Kmax) and its Σ log π_ref."""
    rows = [a for enc, _, _ in items for a in enc]
    b = episode_batch([p for p, _ in rows], [r for _, r in rows], pad_id)
    k_max = max(c.k for _, c, _ in items)
    mats = [L.ranking_pairs(list(c.ranking), [tuple(t) for t in c.ties], k_max) for _, c, _ in items]
    b.update(pref=torch.stack([p for p, _ in mats]), tie=torch.stack([t for _, t in mats]),
             slot=torch.tensor([m * k_max + j for m, (_, c, _) in enumerate(items) for j in range(c.k)]),
             ref_logp=torch.tensor([x for _, _, ref in items for x in ref]), n_prompts=torch.tensor(len(items)))
    return b


def by_prompt(v: torch.Tensor, b: Batch) -> torch.Tensor:
    """(R,) one value per answer row -> (M, Kmax) by prompt and answer slot (padded slots 0)."""
    M, K = b["pref"].shape[:2]
    return torch.zeros(M * K, dtype=v.dtype, device=v.device).index_put((b["slot"],), v).view(M, K)


def answer_scores(model, b: Batch, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((M, Kmax) the score each answer enters the loss with, (M, Kmax) its Σ_t log π(y_t)): h = Σ log π − Σ log π_ref
    (DPO, IPO), or the mean log π per answer token (SimPO). One forward pass over all answers."""
    logp = response_logp(model, b["input_ids"], b["attention_mask"], b["position_ids"], b["prompt_len"], 1.0)  # (R, N)
    mask = b["response_mask"]  # (R, N)
    total = (logp * mask).sum(1)  # (R,)
    x = total / mask.sum(1).clamp_min(1) if loss == "simpo" else total - b["ref_logp"].to(total)  # (R,)
    return by_prompt(x, b), by_prompt(total, b)


def loss_beta(c) -> float:
    """The β the scores are scaled by: SimPO's own, else DPO's (IPO's τ)."""
    return c.simpo_beta if c.loss == "simpo" else c.beta


def objective(model, b: Batch, c) -> torch.Tensor:
    """The configured loss (`dpo.loss`, `dpo.pairs`) of a batch, a mean over its prompts."""
    x, _ = answer_scores(model, b, c.loss)
    if c.pairs == "plackett_luce":
        return L.plackett_luce_loss(x, b["pref"], b["tie"], c.beta)
    return L.preference_loss(x, b["pref"], b["tie"], c.loss, loss_beta(c), c.label_smoothing, c.simpo_gamma, c.tie_weight)


@torch.no_grad()
def pair_metrics(model, b: Batch, c) -> dict[str, float]:
    """On a held-out batch, over its strict pairs (winner w, loser l): the implicit reward's accuracy
    (x_w > x_l) and margin β (x_w − x_l), and the mean Σ log π of winners and losers, now and under π_ref
    (both falling is DPO's known failure: the preferred answers lose likelihood too)."""
    x, logp = answer_scores(model, b, c.loss)  # (M, K) each
    ref = by_prompt(b["ref_logp"].to(logp), b)  # (M, K)
    pref = b["pref"].bool()  # (M, K, K)
    n = pref.sum().clamp_min(1)
    w = lambda v: float((v.unsqueeze(2) * pref).sum() / n)  # noqa: E731  mean over pairs of the winner's value
    lose = lambda v: float((v.unsqueeze(1) * pref).sum() / n)  # noqa: E731  ... and of the loser's
    correct, total_pairs = L.ranking_accuracy(x, pref)
    return {"eval/reward_accuracy": float(correct) / max(int(total_pairs), 1), "eval/margin": loss_beta(c) * (w(x) - lose(x)),
            "eval/logp_chosen": w(logp), "eval/logp_rejected": lose(logp),
            "eval/ref_logp_chosen": w(ref), "eval/ref_logp_rejected": lose(ref)}


def reference_path(cfg: Config, init: Path) -> Path:
    """π_ref's folder: `dpo.reference`, or the policy's starting point (the SFT model)."""
    return resolve_checkpoint(cfg.dpo.reference, cfg) if cfg.dpo.reference else init


def train_round(cfg: Config, name: str, init: Path, ref_path: Path, comps: list[Comparison],
                where: list[tuple[Path, int]], held: list[Comparison], held_where: list[tuple[Path, int]],
                fresh: bool) -> dict[str, float]:
    """One DPO training run (stage `name`) from `init` against π_ref = `ref_path` on `comps`."""
    c = cfg.dpo
    t = c.train
    tok = load_tokenizer(init)
    base = load_model(init)
    window = context_window(base.config)
    if window and t.seq_len > window:  # a row never runs past the model's positions
        t = replace(t, seq_len=window)
    if c.epochs > 0:
        t = replace(t, max_steps=max(1, math.ceil(c.epochs * len(comps) / t.batch_size)))
    cfg = replace(cfg, dpo=replace(c, train=t))  # the effective settings, as saved in the checkpoint
    enc, held_enc = encode(tok, comps, t.seq_len, where), encode(tok, held, t.seq_len, held_where)
    model = lora.prepare(base, cfg, "dpo")
    ckpt = Path(cfg.run.out_dir) / cfg.run.name / name
    state = None if fresh else load_state(ckpt)
    if state is not None and state["step"] >= t.max_steps:  # finished: π_ref's log-probs are not needed
        ref, ref_held = [[0.0] * len(e) for e in enc], [[0.0] * len(e) for e in held_enc]
    else:
        d = distributed.setup(cfg.dist)
        if ref_path.resolve() == init.resolve():  # the policy before any step (loop.run loads a checkpoint later) is π_ref
            off = lora.adapter_disabled(model) if lora.is_lora(model) else contextlib.nullcontext()
            with off:  # with LoRA the base alone, bit-exact
                lm = model.to(d.device).eval()
                ref, ref_held = [reference_logps(lm, e, tok.pad_token_id, t.seq_len) for e in (enc, held_enc)]
        else:
            lm = load_model(ref_path, frozen_dtype(cfg.dist.frozen_dtype, d.device)).to(d.device).eval()
            ref, ref_held = [reference_logps(lm, e, tok.pad_token_id, t.seq_len) for e in (enc, held_enc)]
            del lm
    data = list(zip(enc, comps, ref))
    held_data = list(zip(held_enc, held, ref_held))
    loop.console.print(f"{name}: {len(comps)} rankings ({sum(x.k * (x.k - 1) // 2 for x in comps)} pairs), "
                       f"{len(held)} held out, {t.max_steps} steps of {t.batch_size} prompts; loss {c.loss}"
                       f"{' (Plackett–Luce)' if c.pairs == 'plackett_luce' else ''}; init {init}, π_ref {ref_path}")

    def micro_batches(step: int) -> list[Batch]:
        idx = step_indices(len(data), t.batch_size, step, cfg.run.seed)
        return [collate([data[i] for i in idx[j: j + t.micro_batch_size]], tok.pad_token_id)
                for j in range(0, t.batch_size, t.micro_batch_size)]

    def step(m, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = b["n_prompts"]
        return objective(m, b, c) * n, n

    evals = [collate(held_data[i: i + t.micro_batch_size], tok.pad_token_id)
             for i in range(0, min(len(held_data), t.eval_batches * t.micro_batch_size), t.micro_batch_size)]
    stage = loop.Stage(name, model, tok, t, micro_batches, step, lambda b: int(b["n_prompts"]), evals,
                       lambda m, b: pair_metrics(m, b, c))
    metrics = loop.run(stage, cfg, fresh)
    if distributed.current().main and "eval/logp_chosen" in metrics:
        line = (f"{name}: held-out implicit reward accuracy {metrics['eval/reward_accuracy']:.3f}, margin "
                f"{metrics['eval/margin']:.3f}; Σ log π of preferred / worse answers {metrics['eval/logp_chosen']:.2f} / "
                f"{metrics['eval/logp_rejected']:.2f} (π_ref {metrics['eval/ref_logp_chosen']:.2f} / "
                f"{metrics['eval/ref_logp_rejected']:.2f})")
        if metrics["eval/logp_chosen"] < metrics["eval/ref_logp_chosen"] - 0.1 and \
                metrics["eval/logp_rejected"] < metrics["eval/ref_logp_rejected"] - 0.1:  # beyond rounding: 0.1 nats
            line += "; both fell: the preferred answers lost likelihood too"
        loop.console.print(line)
    return metrics


def _read(path: Path) -> tuple[list[Comparison], list[tuple[Path, int]]]:
    comps = read_comparisons(path)
    return comps, [(path, i) for i in range(len(comps))]


def sample_round(cfg: Config, policy: Path, r: int, path: Path, comps: list[Comparison]) -> None:
    """Round r's rankings, written to `path`: compare.k answers from `policy` to the prompt of each
    training comparison, ranked by the simulated labelers (one per prompt, in turn: the built-in
    world's tasks) or by `dpo.reward_model` (ties where it scores two answers alike)."""
    from cherrytop.rollout.sampler import generate
    cc, c, k = cfg.compare, cfg.dpo, cfg.compare.k
    prompts = [[{"role": m.role, "content": m.content} for m in x.prompt] for x in comps]
    model, tok = load_model(policy), load_tokenizer(policy)
    answers = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens=cc.max_new_tokens,
                       temperature=cc.temperature, batch_size=cfg.sample.batch_size, seed=cfg.run.seed * 1000 + r,
                       progress=True)
    del model
    groups = [answers[i * k: (i + 1) * k] for i in range(len(prompts))]
    if c.ranker == "labelers":
        from cherrytop.world import SimulatedLabeler, Task
        labelers = [SimulatedLabeler(cfg.world, f"sim-{i}", seed=cfg.run.seed * 100 + i) for i in range(cc.labelers)]
        ranked = []
        for n, (x, responses) in enumerate(zip(comps, groups)):
            rk = labelers[n % len(labelers)].rank(Task.from_record(x.meta["task"]), responses)
            ranked.append((list(rk.ranking), [list(t) for t in rk.ties], rk.labeler))
    else:
        from cherrytop.eval.judge import Judge
        scores = Judge(resolve_checkpoint(c.reward_model, cfg)).scores([p for p in prompts for _ in range(k)], answers)
        ranked = []
        for n in range(len(prompts)):
            s = scores[n * k: (n + 1) * k]
            ties = [[i, j] for i in range(k) for j in range(i + 1, k) if s[i] == s[j]]
            ranked.append((sorted(range(k), key=lambda i: (-s[i], i)), ties, f"reward_model:{c.reward_model}"))
    rows = [{"prompt": {"messages": p}, "responses": g, "ranking": rk, "ties": ties, "labeler": who,
             **({"task": x.meta["task"]} if "task" in x.meta else {}), "policy": str(policy), "temperature": cc.temperature}
            for p, g, (rk, ties, who), x in zip(prompts, groups, ranked, comps)]
    write_jsonl(path, rows)
    loop.console.print(f"dpo round {r}: {len(rows)} rankings of K={k} answers from {policy}, by {c.ranker}")


def run(cfg: Config, fresh: bool = False) -> dict:
    c = cfg.dpo
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    train_path, held_path = (Path(c.train.data), None) if c.train.data else compare.paths(cfg)
    comps, where = _read(train_path)
    held, held_where = _read(held_path) if held_path and held_path.is_file() else ([], [])
    if not held:  # hold out 10 % of the file
        perm = np.random.default_rng(cfg.run.seed).permutation(len(comps))
        n_held = max(1, len(comps) // 10)
        held, held_where = [comps[i] for i in perm[:n_held]], [where[i] for i in perm[:n_held]]
        comps, where = [comps[i] for i in perm[n_held:]], [where[i] for i in perm[n_held:]]
    if not comps:
        raise DataError(f"{train_path}: only {len(held)} comparison, held out for the accuracy; expected at least 2 "
                        "(one in 10, at least one, is held out)")
    init = resolve_checkpoint(c.train.init, cfg)
    ref_path = reference_path(cfg, init)
    if c.rounds == 1:
        return train_round(cfg, "dpo", init, ref_path, comps, where, held, held_where, fresh)
    if c.ranker == "labelers" and not all("task" in x.meta for x in comps):
        raise ValueError("dpo.ranker=labelers: the simulated labelers rank only the built-in world's tasks, and "
                         f"{train_path} has prompts without one; rank online rounds with --dpo.ranker=reward_model")
    metrics, policy, first = {}, init, comps
    for r in range(1, c.rounds + 1):
        if r > 1:
            path = run_dir / "data" / f"dpo_round{r}.jsonl"
            if fresh or not path.is_file():
                if distributed.current().main:
                    sample_round(cfg, policy, r, path, first)
                distributed.barrier(distributed.current())
            comps, where = _read(path)
        metrics = train_round(cfg, f"dpo_round{r}", policy, ref_path, comps, where, held, held_where, fresh)
        policy = run_dir / f"dpo_round{r}"
    if distributed.current().main:  # the last round is the stage's output
        tmp = run_dir / ".dpo.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(policy, tmp)
        if (run_dir / "dpo").exists():
            shutil.rmtree(run_dir / "dpo")
        os.replace(tmp, run_dir / "dpo")
    return metrics
