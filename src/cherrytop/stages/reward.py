"""Stage 5 — the reward model: the SFT trunk with a scalar head read at the response's EOS, trained
on K-way rankings with InstructGPT's loss over all C(K,2) pairs of a prompt as ONE batch element
(one forward pass per response, never per pair) [IG §3.5, eq. 1].

Ties: a tied pair counts as half a win each way (Bradley–Terry with ties as Chatbot Arena counts
them), which pulls the two rewards together; `rm.tie_weight` scales it (0 ignores ties).
After training, a bias is set so that the labelers' demonstrations score mean 0 [IG].

With `rm.ref_loglik` (default `excess`) the reward is the head's score plus c · f(response), f from
π_ref, the causal LM the reward model starts from (the SFT model): `sum` = Σ_t log π_ref(y_t),
`excess` = Σ_t (log π_ref(y_t) + H_t) with H_t π_ref's entropy at step t (a token drawn from π_ref adds
0 on average, so f does not favour short answers). f of every response is computed once, c is fitted
on the training rankings alone (a 1-D convex fit of the same ranking loss), then frozen while the
head and trunk learn what f does not tell. The head reads style (rudeness, padding, refusals) well
but not whether an answer is right; the SFT model, which looks answers up in the prompt, does
(`883c122` / `571dc17`, 2026-11-23: 0.49 -> 0.85 on held-out pairs that differ only in correctness;
docs/results/settings-history.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from cherrytop import losses as L
from cherrytop.config import Config
from cherrytop.data.collate import pad_batch, step_indices
from cherrytop.data.records import Comparison, DataError, locate, read_comparisons, read_conversations
from cherrytop.data.tokenizer import TemplateError, load_tokenizer, split_response
from cherrytop.model import lora
from cherrytop.model.heads import (BIAS_KEY, KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, fit_answer, loglik_term,
                                   scalar_model_from)
from cherrytop.model.load import CheckpointError, context_window, frozen_dtype, load_model, resolve_checkpoint
from cherrytop.rollout import packing
from cherrytop.rollout.episodes import response_loglik, reward
from cherrytop.stages import compare, sft
from cherrytop.train import distributed, loop
from cherrytop.train.checkpoint import load_state, save_checkpoint
from cherrytop.world import Task, grade

Batch = loop.Batch


def encode_group(tok, comp: Comparison, seq_len: int) -> list[list[int]]:
    """Token ids of prompt + each response (`encode_answer`)."""
    return [encode_answer(tok, _messages(comp), r, seq_len) for r in comp.responses]


def encode_groups(tok, comps: list[Comparison], seq_len: int, place: dict) -> list[tuple[list[list[int]], Comparison]]:
    """(`encode_group`, comparison) of each comparison; one the chat template refuses stops the stage,
    named by its line (`place`: id(comparison) -> (file, record number))."""
    out = []
    for c in comps:
        try:
            out.append((encode_group(tok, c, seq_len), c))
        except TemplateError as e:
            raise DataError(str(e), "comparisons the model's chat template accepts", locate(*place[id(c)])) from None
    return out


def encode_answer(tok, prompt: list[dict], response: str, seq_len: int) -> list[int]:
    """Token ids of prompt + response as the chat template renders them, up to the response's EOS
    (where PPO's sampled responses end, so the head is read at the same token), cut to `seq_len` by
    `heads.fit_answer`: the prompt from the left, then the answer's start, so its end always fits."""
    head, resp, _ = fit_answer(*split_response(tok, prompt, response, seq_len), seq_len)
    return head + resp


def answers_cut(tok, items: list[tuple[list[dict], str]], seq_len: int) -> int:
    """How many of the (prompt messages, response) lose answer tokens to `seq_len` (`heads.fit_answer`)."""
    return sum(fit_answer(*split_response(tok, m, r, seq_len), seq_len)[2] for m, r in items)


def loglik_features(lm, tok, items: list[tuple[list[dict], str]], seq_len: int, excess: bool = False) -> list[float]:
    """log π_ref(response | prompt) (+ π_ref's entropies with `excess`) of each (prompt messages,
    response) under the causal LM `lm`, on the tokens `encode_answer` keeps."""
    pairs = [fit_answer(*split_response(tok, m, r, seq_len), seq_len) for m, r in items]
    return response_loglik(lm, [a for a, _, _ in pairs], [b for _, b, _ in pairs], tok.pad_token_id,
                           excess=excess, max_len=seq_len).tolist()


def fit_loglik_coef(groups: list[tuple[list[list[int]], Comparison]], loglik: list[list[float]], tie_weight: float) -> float:
    """c minimising the ranking loss of rewards c · log π_ref over the training rankings (convex in c),
    on pairs of sampled answers: edited answers (`compare.edits`) are left to the head, since how
    unlikely π_ref finds an edit says nothing about how much worse it is than the answers PPO samples."""
    k_max = max(c.k for _, c in groups)
    ll = torch.zeros(len(groups), k_max, dtype=torch.float64)  # (M, Kmax)
    for m, ((_, comp), row) in enumerate(zip(groups, loglik)):
        ll[m, : comp.k] = torch.tensor(row, dtype=torch.float64)
    pref, tie, weight = pair_tensors([comp for _, comp in groups], k_max, 0.0)  # (M, Kmax, Kmax) each
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = L.ranking_loss(c * ll, pref, tie, tie_weight, weight)
        loss.backward()
        return loss
    opt.step(closure)
    return float(c.detach())


def collate_groups(groups: list[tuple[list[list[int]], Comparison]], pad_id: int, tie_weight: float,
                   loglik: list[list[float]] | None = None, edit_weight: float = 1.0) -> Batch:
    """All responses of the batch's prompts as rows (right-padded), with (M, Kmax, Kmax) pairs, their
    weights in the loss (`edit_weight` for a pair with an edited answer, else 1) and each row's
    log π_ref(response) (`loglik`, zeros if not given)."""
    rows = [ids for g, _ in groups for ids in g]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    attn = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    k_max = max(c.k for _, c in groups)
    pref, tie, weight = pair_tensors([c for _, c in groups], k_max, edit_weight)  # (M, Kmax, Kmax) each
    slot = [m * k_max + j for m, (_, c) in enumerate(groups) for j in range(c.k)]
    ll = torch.tensor([x for row in loglik for x in row] if loglik else [0.0] * len(rows))  # (R,)
    return {"input_ids": ids, "attention_mask": attn, "pref": pref, "tie": tie, "weight": weight,
            "slot": torch.tensor(slot), "n_prompts": torch.tensor(len(groups)), "tie_weight": torch.tensor(tie_weight),
            "loglik": ll}


def group_rewards(model, b: Batch) -> torch.Tensor:
    """(M, Kmax) rewards: one forward pass over every response of the batch (+ c · log π_ref),
    padding-free where the batch is padded enough and the model allows it (rollout.packing)."""
    ids, attn = b["input_ids"], b["attention_mask"]
    r = reward(model, ids, attn, normalised=False, packed=packing.worth_packing(attn))  # (R,)
    r = r + loglik_term(model.config)[0] * b["loglik"]
    M, K = b["pref"].shape[:2]
    out = torch.zeros(M * K, dtype=r.dtype, device=r.device)
    return out.index_put((b["slot"],), r).view(M, K)


def rm_step(model, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = group_rewards(model, b)
    loss = L.ranking_loss(rewards, b["pref"], b["tie"], float(b["tie_weight"]), b["weight"])
    n = b["n_prompts"]
    return loss * n, n


def rm_count(b: Batch) -> int:
    """Prompts in a micro-batch: what `rm_step` sums its per-prompt losses over."""
    return int(b["n_prompts"])


def rm_accuracy(model, b: Batch) -> dict[str, float]:
    correct, total = L.ranking_accuracy(group_rewards(model, b), b["pref"])
    return {"eval/accuracy": float(correct) / max(int(total), 1)}


@torch.no_grad()
def accuracy(model, groups: list[tuple[list[list[int]], Comparison]], loglik: list[list[float]] | None,
             pad_id: int) -> dict[str, float]:
    """Held-out pairwise accuracy against the labelers and (for world tasks) the noise-free grader, on
    pairs of sampled answers; pairs with an edited answer (`compare.edits`) are counted apart
    (`*_edits`), so the headline numbers measure the policy's own answers, what PPO is scored on."""
    model.eval()
    lab, true, lab_e, true_e = [0, 0], [0, 0], [0, 0], [0, 0]
    any_edits = any(edited_answers(c) for _, c in groups)
    for i in range(0, len(groups), 16):
        chunk = groups[i: i + 16]
        b = distributed.to_device(collate_groups(chunk, pad_id, 1.0, loglik[i: i + 16] if loglik else None), distributed.current())
        rewards = group_rewards(model, b).tolist()  # (M, K), read pair by pair below
        pref = b["pref"].tolist()  # (M, K, K)
        for m, (_, c) in enumerate(chunk):
            edited = edited_answers(c)
            q = [grade(Task.from_record(c.meta["task"]), r).quality for r in c.responses] if "task" in c.meta else None
            for x in range(c.k):
                for y in range(c.k):
                    acc_lab, acc_true = (lab_e, true_e) if x in edited or y in edited else (lab, true)
                    right = int(rewards[m][x] > rewards[m][y])
                    if pref[m][x][y]:
                        acc_lab[0] += right
                        acc_lab[1] += 1
                    if q is not None and q[x] > q[y]:
                        acc_true[0] += right
                        acc_true[1] += 1
    out = {"accuracy_labelers": _share(lab), "accuracy_grader": _share(true), "pairs_labelers": lab[1], "pairs_grader": true[1]}
    if any_edits:
        out.update({"accuracy_labelers_edits": _share(lab_e), "accuracy_grader_edits": _share(true_e),
                    "pairs_labelers_edits": lab_e[1], "pairs_grader_edits": true_e[1]})
    return out


def pair_tensors(comps: list[Comparison], k_max: int, edit_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pref, tie, weight), each (M, Kmax, Kmax), of the comparisons' pairs for `losses.ranking_loss`; a pair
    with an edited answer weighs `edit_weight`, the others 1."""
    prefs, ties, weights = [], [], []
    for c in comps:
        pref, tie = L.ranking_pairs(list(c.ranking), [tuple(t) for t in c.ties], k_max)
        w = torch.ones(k_max, k_max)  # (Kmax, Kmax)
        edited = list(edited_answers(c))
        w[edited, :] = w[:, edited] = edit_weight
        prefs.append(pref)
        ties.append(tie)
        weights.append(w)
    return torch.stack(prefs), torch.stack(ties), torch.stack(weights)


def edited_answers(c: Comparison) -> set[int]:
    """Indices of a comparison's edited answers (its `edits` record key, written by `compare`)."""
    edits = c.meta.get("edits")
    if not isinstance(edits, list):
        return set()
    return {e["index"] for e in edits if isinstance(e, dict) and isinstance(e.get("index"), int) and 0 <= e["index"] < c.k}


def _share(counts: list[int]) -> float:
    return counts[0] / counts[1] if counts[1] else float("nan")


@torch.no_grad()
def demonstration_bias(model, tok, convs, loglik: list[float] | None, seq_len: int) -> float:
    """−mean reward of the demonstrations' final assistant turns (+ c · log π_ref), so they score mean 0 [IG]."""
    scores = []
    for i in range(0, len(convs), 32):
        rows = [encode_answer(tok, [{"role": m.role, "content": m.content} for m in c.messages[:-1]],
                              c.messages[-1].content, seq_len) for c in convs[i: i + 32]]
        enc = distributed.to_device(pad_batch([(r, r) for r in rows], tok.pad_token_id), distributed.current())
        scores.append(reward(model, enc["input_ids"], enc["attention_mask"], normalised=False))
    r = torch.cat(scores)
    if loglik is not None:
        r = r + loglik_term(model.config)[0] * torch.tensor(loglik, device=r.device)
    return -float(r.mean())


def _reference_lm(init: Path, cfg: Config):
    """The causal LM whose log-likelihood `rm.ref_loglik` adds (the reward model's starting point), frozen,
    on this process's device with weights in `dist.frozen_dtype` (bf16 on GPU by default)."""
    device = distributed.setup(cfg.dist).device
    try:
        return load_model(init, frozen_dtype(cfg.dist.frozen_dtype, device)).to(device).eval().requires_grad_(False)
    except (CheckpointError, ValueError, OSError) as e:
        raise DataError(f"rm.ref_loglik needs a causal LM as rm.train.init ({init}): {e}; "
                        "set --rm.ref_loglik=off to train the head alone") from e


def run(cfg: Config, fresh: bool = False) -> dict:
    rc = cfg.rm
    train_path, held_path = (Path(rc.train.data), None) if rc.train.data else compare.paths(cfg)
    comps = read_comparisons(train_path)
    held = read_comparisons(held_path) if held_path and held_path.is_file() else []
    place = {id(c): (path, i) for path, cs in ((train_path, comps), (held_path, held)) for i, c in enumerate(cs)}
    if not held:  # hold out 10 % of the file
        perm = np.random.default_rng(cfg.run.seed).permutation(len(comps))
        n_held = max(1, len(comps) // 10)
        held, comps = [comps[i] for i in perm[:n_held]], [comps[i] for i in perm[n_held:]]
    if not comps:
        raise DataError(f"{train_path}: only {len(held)} comparison, held out for the accuracy; expected at least 2 "
                        "(one in 10, at least one, is held out)")
    init = resolve_checkpoint(rc.train.init, cfg)
    tok = load_tokenizer(init)
    t = rc.train
    init_config = AutoConfig.from_pretrained(str(init))
    window = context_window(init_config)
    # π_ref of the log π_ref term: the starting causal LM, or a reward model's own π_ref when training continues one
    ref_path = Path(getattr(init_config, REFERENCE_KEY, None) or init)
    if window and t.seq_len > window:  # a row never runs past the model's positions
        t = replace(t, seq_len=window)
    if rc.epochs > 0:
        t = replace(t, max_steps=max(1, math.ceil(rc.epochs * len(comps) / t.batch_size)))
    groups, held_groups = encode_groups(tok, comps, t.seq_len, place), encode_groups(tok, held, t.seq_len, place)
    demos = [d for d in read_conversations(sft.demonstrations_file(cfg)) if d.messages[-1].role == "assistant"][:256] \
        if not rc.train.data else []
    ll = ll_held = ll_demo = None
    coef = 0.0
    ckpt = Path(cfg.run.out_dir) / cfg.run.name / "rm"
    done = None if fresh else load_state(ckpt)  # a finished reward model needs no log-likelihoods
    done = done is not None and done["step"] >= t.max_steps and "accuracy_labelers" in done["metrics"]
    use = rc.ref_loglik != "off"
    if use and not done:  # log π_ref of every response, once; c fitted on the training rankings only
        lm = _reference_lm(ref_path, cfg)
        excess = rc.ref_loglik == "excess"

        def per_group(cs: list[Comparison]) -> list[list[float]]:
            flat = loglik_features(lm, tok, [(_messages(c), r) for c in cs for r in c.responses], t.seq_len, excess)
            out, i = [], 0
            for c in cs:
                out.append(flat[i: i + c.k])
                i += c.k
            return out
        ll, ll_held = per_group(comps), per_group(held)
        ll_demo = loglik_features(lm, tok, [([{"role": m.role, "content": m.content} for m in d.messages[:-1]],
                                             d.messages[-1].content) for d in demos], t.seq_len, excess) if demos else None
        del lm
        coef = fit_loglik_coef(groups, ll, rc.tie_weight)
    torch.manual_seed(cfg.run.seed)  # the new head's init: reproducible, and the same in every data-parallel process
    base = scalar_model_from(init, tok.pad_token_id)
    if use:
        setattr(base.config, LOGLIK_KEY, coef)
        setattr(base.config, REFERENCE_KEY, str(ref_path.resolve()))
        setattr(base.config, KIND_KEY, rc.ref_loglik)
    model = lora.prepare(base, cfg, "rm", heads=("score",))
    loop.console.print(f"rm: {len(comps)} rankings ({sum(c.k * (c.k - 1) // 2 for c in comps)} pairs), "
                       f"{len(held)} held out, {t.max_steps} steps of {t.batch_size} prompts; init {init}"
                       + (f"; reward = head + {coef:.3f} · {rc.ref_loglik} log π_ref(response)" if use and not done else ""))
    n_answers = sum(c.k for c in comps + held)
    if n_cut := answers_cut(tok, [(_messages(c), r) for c in comps + held for r in c.responses], t.seq_len):
        loop.console.print(f"rm: {n_cut} of {n_answers} answers longer than rm.train.seq_len={t.seq_len} tokens "
                           f"cut to their last {t.seq_len} (head and log π_ref alike)")

    def micro_batches(step: int) -> list[Batch]:
        idx = step_indices(len(groups), t.batch_size, step, cfg.run.seed)
        out = []
        for j in range(0, t.batch_size, t.micro_batch_size):
            part = idx[j: j + t.micro_batch_size]
            out.append(collate_groups([groups[i] for i in part], tok.pad_token_id, rc.tie_weight,
                                      [ll[i] for i in part] if ll else None, rc.edit_weight))
        return out

    evals = [collate_groups(held_groups[i: i + t.micro_batch_size], tok.pad_token_id, rc.tie_weight,
                            ll_held[i: i + t.micro_batch_size] if ll_held else None, rc.edit_weight)
             for i in range(0, min(len(held_groups), t.eval_batches * t.micro_batch_size), t.micro_batch_size)]
    stage = loop.Stage("rm", model, tok, t, micro_batches, rm_step, rm_count, evals, rm_accuracy)
    metrics = loop.run(stage, _with_train(cfg, t), fresh)
    d = distributed.current()
    if d.world > 1:  # data-parallel run: rank 0 finishes on the whole trained model, read back from its checkpoint
        if not d.main:
            return metrics
        model = scalar_model_from(ckpt, tok.pad_token_id).to(d.device)
    state = load_state(ckpt)
    if "accuracy_labelers" not in state["metrics"]:
        setattr(model.config, BIAS_KEY, demonstration_bias(model, tok, demos, ll_demo, t.seq_len) if demos else 0.0)
        metrics.update(accuracy(model, held_groups, ll_held, tok.pad_token_id))
        metrics["reward_bias"] = getattr(model.config, BIAS_KEY)
        metrics["loglik_coef"] = coef
        state["metrics"] = metrics
        save_checkpoint(ckpt, lora.saveable(model), tok, _with_train(cfg, t), state,
                        _carry_over(ckpt) if d.world > 1 else None)
    metrics = state["metrics"]
    loop.console.print(accuracy_line(metrics))
    return metrics


def accuracy_line(metrics: dict[str, float]) -> str:
    """The stage's summary of `accuracy`: against the noise-free grader only where there is one (the
    built-in world's tasks; a comparisons file of your own has none)."""
    graded = metrics.get("pairs_grader", 0) > 0
    line = f"rm: held-out accuracy {metrics['accuracy_labelers']:.3f} vs labelers"
    line += f", {metrics['accuracy_grader']:.3f} vs the noise-free grader" if graded else " (no grader for these prompts)"
    line += f"; bias {metrics['reward_bias']:+.3f}"
    if "accuracy_labelers_edits" in metrics:
        line += f"; on edited answers {metrics['accuracy_labelers_edits']:.3f}"
        line += f" / {metrics['accuracy_grader_edits']:.3f}" if metrics.get("pairs_grader_edits", 0) > 0 else ""
    return line


def _carry_over(ckpt: Path):
    """What rank 0 rewriting a data-parallel run's checkpoint from its plain weights moves into the
    new folder: the LoRA adapter and the FSDP shards the training loop wrote there."""
    def move(new: Path) -> None:
        for name in (lora.ADAPTER, distributed.SHARDS):
            if (ckpt / name).is_dir():
                os.replace(ckpt / name, new / name)
    return move


def _messages(c: Comparison) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in c.prompt]


def _with_train(cfg: Config, t) -> Config:
    """The config with the effective rm.train (max_steps from rm.epochs, seq_len within the model's
    context window), as saved in checkpoints."""
    return replace(cfg, rm=replace(cfg.rm, train=t))
