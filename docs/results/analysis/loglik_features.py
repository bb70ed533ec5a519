"""Which summary of π_SFT's per-token log-likelihood tells right answers from wrong ones?

For a run's comparisons (train and held-out), per response: the trained reward head's score (the
reward minus its c · f term) and π_SFT's per-token log p_t and entropy H_t. Fits, on the training
rankings only, the ranking loss's best coefficients for several rewards, then prints held-out
accuracy against the noise-free grader, overall and by the flaw that separates a pair.

    python docs/results/analysis/loglik_features.py runs/tiny-seed0
"""
import collections
import sys

import torch

from cherrytop import losses as L
from cherrytop.data.records import read_comparisons
from cherrytop.data.tokenizer import load_tokenizer, split_response
from cherrytop.model.heads import loglik_term
from cherrytop.model.load import load_model
from cherrytop.rollout.episodes import response_logp, reward
from cherrytop.rollout.sampler import left_pad
from cherrytop.stages.reward import collate_groups, encode_group
from cherrytop.world import Task, grade
from transformers import AutoModelForSequenceClassification

run = sys.argv[1]
tok = load_tokenizer(f"{run}/rm")
rm = AutoModelForSequenceClassification.from_pretrained(f"{run}/rm").eval()
_, ref, _ = loglik_term(rm.config)
lm = load_model(ref).eval()
train = read_comparisons(f"{run}/data/comparisons.jsonl")
held = read_comparisons(f"{run}/data/comparisons_heldout.jsonl")


@torch.no_grad()
def per_token(comps):
    """Per comparison: (K, N) log p, (K, N) entropy, (K, N) mask under π_SFT."""
    out = []
    for c in comps:
        msgs = [{"role": m.role, "content": m.content} for m in c.prompt]
        pairs = [split_response(tok, msgs, r, 160) for r in c.responses]
        ids_p, mask_p = left_pad([a for a, _ in pairs], tok.pad_token_id)
        N = max(len(b) for _, b in pairs)
        ids_r = torch.full((len(pairs), N), tok.pad_token_id)
        mask_r = torch.zeros((len(pairs), N), dtype=torch.long)
        for i, (_, b) in enumerate(pairs):
            ids_r[i, : len(b)] = torch.tensor(b)
            mask_r[i, : len(b)] = 1
        ids, attn = torch.cat([ids_p, ids_r], 1), torch.cat([mask_p, mask_r], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        lp, h = response_logp(lm, ids, attn, pos, ids_p.shape[1], 1.0, with_entropy=True)
        out.append((lp, h, mask_r.float()))
    return out


@torch.no_grad()
def heads(comps):
    out = []
    for i in range(0, len(comps), 16):
        chunk = comps[i: i + 16]
        b = collate_groups([(encode_group(tok, c, 160), c) for c in chunk], tok.pad_token_id, 1.0)
        r = reward(rm, b["input_ids"], b["attention_mask"], normalised=False)
        j = 0
        for c in chunk:
            out.append(r[j: j + c.k])
            j += c.k
    return out


def features(tok_stats, head):
    """name -> per comparison (K,) feature."""
    f = collections.defaultdict(list)
    for (lp, h, m), hd in zip(tok_stats, head):
        ex = (lp + h) * m
        big = 1e4 * (1 - m)
        f["head"].append(hd)
        f["sum"].append((lp * m).sum(1))
        f["excess"].append(ex.sum(1))
        f["min_logp"].append((lp * m + big).min(1).values)
        f["min_excess"].append((ex + big).min(1).values)
        f["excess_neg"].append(ex.clamp(max=0).sum(1))
    return f


def pairs(comps):
    k_max = max(c.k for c in comps)
    pr, ti = zip(*[L.ranking_pairs(list(c.ranking), [tuple(t) for t in c.ties], k_max) for c in comps])
    return torch.stack(pr), torch.stack(ti), k_max


def stack(rows, k_max):
    x = torch.zeros(len(rows), k_max, dtype=torch.float64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r.double()
    return x


def fit(X, pref, tie, fixed=None):
    """Coefficients of the columns X (M, K, F) minimising the ranking loss (+ a fixed reward)."""
    w = torch.zeros(X.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    base = fixed if fixed is not None else 0.0

    def closure():
        opt.zero_grad()
        loss = L.ranking_loss(base + X @ w, pref, tie, 1.0)
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


def by_flaw(comps, r):
    acc = collections.defaultdict(lambda: [0, 0])
    for m, c in enumerate(comps):
        g = [grade(Task.from_record(c.meta["task"]), x) for x in c.responses]
        for x in range(c.k):
            for y in range(c.k):
                if g[x].quality > g[y].quality:
                    ok = int(r[m, x] > r[m, y])
                    for key in ("all", ",".join(sorted(set(g[y].flaws) - set(g[x].flaws))) or "-"):
                        acc[key][0] += ok
                        acc[key][1] += 1
    return acc


tr_f, he_f = features(per_token(train), heads(train)), features(per_token(held), heads(held))
pref, tie, k_tr = pairs(train)
variants = {
    "excess": ["excess"], "excess+min_excess": ["excess", "min_excess"], "excess+min_logp": ["excess", "min_logp"],
    "excess_neg": ["excess_neg"], "head+excess (fit c with the head)": ["head", "excess"],
    "head + excess + min_excess": ["head", "excess", "min_excess"], "head + excess + min_logp": ["head", "excess", "min_logp"],
}
rows = {}
for name, cols in variants.items():
    X = torch.stack([stack(tr_f[c], k_tr) for c in cols], -1)
    w = fit(X, pref, tie)
    Xh = torch.stack([stack(he_f[c], max(c.k for c in held)) for c in cols], -1)
    rows[name] = (w.tolist(), by_flaw(held, Xh @ w))
keys = ["all", "wrong_answer", "no_answer", "padding", "rambling", "rude", "complied", "hallucinated", "refused"]
print("variant".ljust(36), "weights".ljust(28), *[k[:10].rjust(11) for k in keys])
for name, (w, acc) in rows.items():
    print(name.ljust(36), ",".join(f"{x:.3g}" for x in w).ljust(28),
          *[(f"{acc[k][0] / acc[k][1]:.3f}" if acc[k][1] else "-").rjust(11) for k in keys])
print("pairs:", {k: acc[k][1] for k in keys})
print("all flaws:", sorted(((k, v[1]) for k, v in rows["excess"][1].items()), key=lambda kv: -kv[1])[:15])
