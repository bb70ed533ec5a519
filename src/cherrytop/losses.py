"""Every loss and per-token quantity of the recipe, as pure functions of tensors.

Sources: [IG] InstructGPT, Ouyang et al. 2022 · [LHP] openai/lm-human-preferences
· [NB] "The N Implementation Details of RLHF with PPO" · [N+] "The N+ Implementation Details ... TL;DR".

Conventions shared by every function:
- B = batch, T = sequence positions, V = vocabulary, K = responses per prompt.
- A `mask` is bool or 0/1, same shape as the tensor it masks; 1 = a valid (response) token. Masked
  positions are never read (they may hold garbage, even inf/NaN) and come back as 0.
- Means over a mask are over all valid positions of the whole batch (a token mean, not a mean of
  row means); an all-zero mask gives 0, not NaN.
- Reductions that feed a loss are done in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- language modelling


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(tokens[b, t]) under softmax(logits[b, t] / temperature)  [NB: divide by the sampling temperature].

    logits (B, T, V) are already aligned with tokens (B, T): the caller has shifted. Computed in
    float32 as log_softmax(logits / temperature) gathered at the tokens; the gradient is
    d logp / d z = onehot(token) − softmax(z), written into one (B, T, V) buffer (`_TokenLogprobs`;
    autograd through gather − logsumexp builds five (B, T, V) temporaries: the head's forward +
    backward for 32 × 24 tokens, vocabulary 1,536, went from 24-37 to 18-20 ms on one CPU core;
    `cacffbc`, 2026-11-23). Returns (B, T).
    """
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature))


class _TokenLogprobs(torch.autograd.Function):
    """token_logprobs with a hand-written backward: for z = logits / τ and g = dL/dlogp (B, T),
    dL/dlogits = g · (onehot(token) − softmax(z)) / τ. Checked against autograd through the plain
    formula in tests/test_losses.py."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, T, V), float32 or float64
        logp_all = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)  # (B, T, V)
        ctx.save_for_backward(logp_all, tokens)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        logp_all, tokens = ctx.saved_tensors
        g = g.to(logp_all.dtype).unsqueeze(-1)  # (B, T, 1)
        grad = logp_all.exp().mul_(-g)  # (B, T, V) −g · softmax(z)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), g)  # + g at the token
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Causal LM loss −Σ_t log π(y_t | y_<t) over the labelled tokens  [IG §SFT: assistant tokens only].

    logits (B, T, V) come from a forward pass on input ids (B, T); labels (B, T) sit at the same
    positions as the input ids, with `ignore_index` where no loss is taken. The shift happens here:
    logits[:, t] predicts labels[:, t + 1].
    Returns (summed NLL as a float32 scalar, number of counted tokens as an int64 scalar). Divide the
    sum by the token count of the whole global batch (all micro-batches, all ranks), so that
    batch 8 × accumulation 1 gives exactly the loss of batch 2 × accumulation 4.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    nll_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )  # ()
    return nll_sum, (labels != ignore_index).sum()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H_t = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_t,v  (entropy of the next-token distribution, for logging).

    logits (B, T, V) → (B, T), float32.
    """
    logits = logits.float()  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(-1) * logits).sum(-1)  # (B, T)


# ---------------------------------------------------------------- reward model


def ranking_pairs(ranking: list[int], ties: list[tuple[int, int]] | None, k_max: int) -> tuple[Tensor, Tensor]:
    """One prompt's (k_max, k_max) bool `pref` and `tie` matrices from a labeler's ranking  [IG §3.5].

    ranking: the K response indices from best to worst, a permutation of range(K), K ≤ k_max.
    ties: unordered pairs (i, j) of response indices the labeler marked as tied. A tied pair is a
    tie pair only, never also a strict pair (whatever order the ranking happens to list it in);
    ties are not closed transitively. Slots K..k_max-1 (padding) are in no pair.
    pref[i, j] is True iff i is ranked above j; tie is symmetric. Strict + tie pairs = C(K, 2).
    """
    k = len(ranking)
    if k > k_max:
        raise ValueError(f"ranking has {k} responses but k_max is {k_max}")
    if sorted(int(r) for r in ranking) != list(range(k)):
        raise ValueError(f"ranking {list(ranking)} is not a permutation of range({k})")
    pref = torch.zeros(k_max, k_max, dtype=torch.bool)  # (K, K)
    tie = torch.zeros(k_max, k_max, dtype=torch.bool)  # (K, K)
    for a in range(k):
        for b in range(a + 1, k):
            pref[ranking[a], ranking[b]] = True
    for i, j in ties or []:
        if not (0 <= i < k and 0 <= j < k) or i == j:
            raise ValueError(f"tie pair ({i}, {j}) is not two distinct response indices in range({k})")
        tie[i, j] = tie[j, i] = True
        pref[i, j] = pref[j, i] = False
    return pref, tie


def ranking_loss(rewards: Tensor, pref: Tensor, tie: Tensor | None = None, tie_weight: float = 1.0,
                 weight: Tensor | None = None) -> Tensor:
    """Reward-model loss over K-way rankings  [IG eq. 1], all C(K, 2) pairs of a prompt in one batch element.

    Per prompt b:
        loss_b = −1/n_b · [ Σ_{i≻j} log σ(r_i − r_j)
                            + tie_weight · Σ_{i~j, i<j} ½ (log σ(r_i − r_j) + log σ(r_j − r_i)) ]
    with n_b = #strict pairs + #unordered tie pairs (= C(K_b, 2) for a full ranking). [IG] encourages
    ties but does not say how they enter the loss; our choice: Bradley–Terry with a tie counted as
    half a win each way (as Chatbot Arena counts them), which pulls the two rewards together and is
    minimal at r_i = r_j. Returns the mean of loss_b over prompts with at least one pair (0, still
    attached to the graph, if none has any). With `weight` (B, K, K), symmetric and ≥ 0, each pair's
    term and its count in n_b are scaled by w_ij: a weighted mean over the prompt's pairs (all ones =
    the plain loss; a prompt whose pairs all weigh 0 is left out like one without pairs).

    rewards (B, K) with K padded to the batch maximum; pref (B, K, K) bool, pref[b, i, j] iff i is
    ranked above j; tie (B, K, K) bool symmetric or None. Padded slots must be in no pair; their
    rewards are never read (zero gradient, even if they hold NaN). pref and tie must be disjoint
    (ranking_pairs makes them so).
    """
    rewards = rewards.float()  # (B, K)
    pref = pref.bool()  # (B, K, K)
    tie = torch.zeros_like(pref) if tie is None else tie.bool()  # (B, K, K)
    w = torch.ones_like(pref, dtype=rewards.dtype) if weight is None else weight.to(rewards)  # (B, K, K)
    used = pref | tie  # (B, K, K)
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K) r_i − r_j
    logsig = w * F.logsigmoid(torch.where(used, diff, 0.0))  # (B, K, K)
    strict = torch.where(pref, logsig, 0.0).sum((1, 2))  # (B,)
    tied = 0.5 * torch.where(tie, logsig, 0.0).sum((1, 2))  # (B,) each unordered pair appears as (i,j) and (j,i)
    n_pairs = torch.where(pref, w, 0.0).sum((1, 2)) + torch.where(tie, w, 0.0).sum((1, 2)) / 2  # (B,)
    has = n_pairs > 0  # (B,)
    per_prompt = -(strict + tie_weight * tied) / torch.where(has, n_pairs, 1.0)  # (B,)
    return torch.where(has, per_prompt, 0.0).sum() / has.sum().clamp_min(1)


@torch.no_grad()
def ranking_accuracy(rewards: Tensor, pref: Tensor) -> tuple[Tensor, Tensor]:
    """(number of strict pairs i≻j with r_i > r_j, number of strict pairs); ties are not counted.

    rewards (B, K), pref (B, K, K) bool. Sum both over batches/ranks, then divide.
    """
    pref = pref.bool()  # (B, K, K)
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K)
    return ((diff > 0) & pref).sum(), pref.sum()


# ---------------------------------------------------------------- direct preference optimisation

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


def preference_loss(x: Tensor, pref: Tensor, tie: Tensor | None = None, kind: str = "dpo", beta: float = 0.1,
                    label_smoothing: float = 0.0, margin: float = 0.0, tie_weight: float = 1.0) -> Tensor:
    """Direct preference loss over all C(K, 2) pairs of each prompt's ranking, one prompt = one batch
    element, each answer's score computed once  [DPO, IPO, SimPO].

    x (B, K): DPO / IPO: h = Σ_t log π(y_t) − Σ_t log π_ref(y_t) per answer; SimPO: (1/|y|) Σ_t log π(y_t).
    With Δ = x_i − x_j, a strict pair i≻j costs
        dpo:   −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)     (ε = label_smoothing: conservative DPO)
        ipo:   (Δ − 1/(2β))²                         (β is IPO's τ)
        simpo: −log σ(βΔ − γ)                         (γ = margin)
    and a tied pair (a tie is half a win each way, as in `ranking_loss`), times tie_weight,
        dpo / simpo: −½ (log σ(βΔ) + log σ(−βΔ));   ipo: Δ².
    Per prompt the mean over its strict + tie pairs; the mean over prompts with a pair is returned (0,
    still attached to the graph, if none has one). With ε = 0, dpo = `ranking_loss(β x, ...)`.
    pref (B, K, K) bool (pref[b, i, j] iff i is ranked above j), tie (B, K, K) bool symmetric or None,
    disjoint (`ranking_pairs`); padded slots are in no pair and never read.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    x = x.float()  # (B, K)
    pref = pref.bool()  # (B, K, K)
    tie = torch.zeros_like(pref) if tie is None else tie.bool()  # (B, K, K)
    used = pref | tie  # (B, K, K)
    diff = torch.where(used, x.unsqueeze(2) - x.unsqueeze(1), 0.0)  # (B, K, K) Δ = x_i − x_j on pairs only
    if kind == "ipo":
        strict_cost = (diff - 1.0 / (2.0 * beta)) ** 2  # (B, K, K)
        tie_cost = diff ** 2  # (B, K, K)
    else:
        z = beta * diff - (margin if kind == "simpo" else 0.0)  # (B, K, K)
        eps = label_smoothing if kind == "dpo" else 0.0
        strict_cost = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # (B, K, K)
        tie_cost = -0.5 * (F.logsigmoid(beta * diff) + F.logsigmoid(-beta * diff))  # (B, K, K)
    strict = torch.where(pref, strict_cost, 0.0).sum((1, 2))  # (B,)
    tied = 0.5 * torch.where(tie, tie_cost, 0.0).sum((1, 2))  # (B,) each unordered tie appears twice
    n_pairs = pref.sum((1, 2)) + tie.sum((1, 2)) / 2  # (B,)
    has = n_pairs > 0  # (B,)
    per_prompt = (strict + tie_weight * tied) / torch.where(has, n_pairs, 1.0)  # (B,)
    return torch.where(has, per_prompt, 0.0).sum() / has.sum().clamp_min(1)


def plackett_luce_loss(x: Tensor, pref: Tensor, tie: Tensor | None = None, beta: float = 0.1) -> Tensor:
    """Plackett–Luce negative log-likelihood of each prompt's ranking under scores β·x  [DPO App. A.3]:
        loss_b = −1/n_b · Σ_k ( β x_k − log Σ_{j ∈ R_k} exp(β x_j) ),
    R_k = the prompt's answers not ranked strictly above k (k itself and answers tied with it: Breslow's
    risk set, so a tie block shares its denominator; without ties, the answers at or below k's place),
    n_b = the answers whose R_k holds another answer (the last place adds nothing). Mean over prompts
    with a pair. x (B, K) as in `preference_loss`; pref / tie (B, K, K) as there; padded slots (in no
    pair) are never read.
    """
    x = x.float()  # (B, K)
    pref = pref.bool()  # (B, K, K)
    tie = torch.zeros_like(pref) if tie is None else tie.bool()  # (B, K, K)
    used = pref | tie  # (B, K, K)
    valid = used.any(2) | used.any(1)  # (B, K) an answer is in some pair
    s = torch.where(valid, beta * x, float("-inf"))  # (B, K)
    risk = valid.unsqueeze(1) & ~pref.transpose(1, 2)  # (B, K, K) risk[b, k, j]: valid j not ranked above k
    denom = torch.logsumexp(torch.where(risk, s.unsqueeze(1), float("-inf")), dim=2)  # (B, K)
    counts = (risk.sum(2) > 1) & valid  # (B, K) places that carry a choice
    terms = torch.where(counts, s - denom, 0.0)  # (B, K)
    n = counts.sum(1)  # (B,)
    has = n > 0  # (B,)
    per_prompt = -terms.sum(1) / n.clamp_min(1)  # (B,)
    return torch.where(has, per_prompt, 0.0).sum() / has.sum().clamp_min(1)


# ---------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ mask·x / Σ mask over `dim` (all dims if None)  [LHP]. Masked entries of x are never read; empty → 0."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp_min(1)
    return x.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False, mean=masked_mean) -> Tensor:
    """Variance over all valid positions: mean((x − mean)²), population by default  [LHP].

    unbiased=True multiplies by n / (n − 1) (Bessel). Returns a 0-d tensor. mean(x, mask): the mean
    to use (data-parallel: over every rank's positions).
    """
    centered = x - mean(x, mask)
    var = mean(centered * centered, mask)
    if unbiased:
        n = mask.bool().sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, mean=masked_mean, var=masked_var) -> Tensor:
    """whiten(x) = (x − mean)·rsqrt(var + 1e-8), population statistics over all valid positions  [LHP].

    shift_mean=False adds the mean back (rewards keep their mean; advantages are fully whitened).
    Shape of x is kept; masked positions are 0. mean / var (x, mask): the statistics to use
    (data-parallel: over every rank's positions).
    """
    mean, var = mean(x, mask), var(x, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, 0.0)


# ---------------------------------------------------------------- PPO rewards and advantages


def per_token_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """kl_t = log π(y_t) − log π_ref(y_t)  ("k1", unbiased, can be negative)  [LHP]. (B, T), 0 where masked."""
    return torch.where(mask.bool(), logp - ref_logp, 0.0)  # (B, T)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3_t = (e^{d} − 1) − d with d = log π_ref − log π: non-negative, low-variance KL estimate for logging  [NB].

    (B, T), 0 where masked.
    """
    d = torch.where(mask.bool(), ref_logp - logp, 0.0)  # (B, T)
    return torch.expm1(d) - d  # (B, T)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(π‖π_ref) estimate from samples of π, with ℓ = log π − log π_ref  [KL]:
    k1 = ℓ (unbiased, can be negative), k2 = ½ ℓ², k3 = e^{−ℓ} − 1 + ℓ (unbiased, ≥ 0).

    Differentiable in `logp`: as a loss term on-policy, ∇E[k2] is the gradient of the reverse
    KL(π‖π_ref), while ∇E[k3] is that of the *forward* KL(π_ref‖π) [KLG] (GRPO's default). (B, T), 0 where masked.
    """
    if kind == "k1":
        return per_token_kl(logp, ref_logp, mask)
    log_ratio = torch.where(mask.bool(), logp - ref_logp, 0.0)  # (B, T) ℓ
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def apply_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """score_b if response b ended with EOS, else the fixed `penalty` (e.g. −1.0) instead  [LHP, N+]. (B,)."""
    return torch.where(has_eos.bool(), scores, torch.as_tensor(penalty, dtype=scores.dtype, device=scores.device))


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float, dense: Tensor | None = None) -> Tensor:
    """reward_t = −β·kl_t (+ dense_t) on valid tokens, plus the sequence score at the last valid token
    [LHP, IG eq. 2]. `dense` is the per-token part of a reward model's score (cherrytop's c · log π_ref(y_t)
    term), given where it is earned instead of all at the end.

    scores (B,), kl (B, T), mask (B, T), dense (B, T) or None. "Last valid token" is the highest index
    with mask 1, so right padding is the usual case; a row with an all-zero mask gets no score (all
    zeros). (B, T).
    """
    mask = mask.bool()
    rewards = torch.where(mask, -beta * kl + (0.0 if dense is None else dense), 0.0)  # (B, T)
    pos = torch.arange(mask.size(1), device=mask.device)  # (T,)
    last = torch.where(mask, pos, -1).max(dim=1).values  # (B,)
    at_last = (pos == last.unsqueeze(1)) & mask  # (B, T)
    return rewards + torch.where(at_last, scores.to(rewards.dtype).unsqueeze(1), 0.0)  # (B, T)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation  [LHP]; γ = 1, λ = 0.95 are the [LHP] defaults.

        δ_t = r_t + γ V_{t+1} − V_t   (V after the last valid token = 0)
        A_t = δ_t + γ λ A_{t+1};   returns_t = A_t + V_t
    rewards, values, mask (B, T). Masked positions are skipped (t+1 means the next *valid* token, so
    right padding and holes both work) and come back as 0. Inputs are detached: the results are
    targets. Returns (advantages (B, T), returns (B, T)).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.detach(), 0.0)  # (B, T)
    values = torch.where(mask, values.detach(), 0.0)  # (B, T)
    next_v = torch.zeros_like(values[:, 0])  # (B,)
    next_a = torch.zeros_like(values[:, 0])  # (B,)
    adv = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # (B,)
        a = delta + gamma * lam * next_a  # (B,)
        m = mask[:, t]  # (B,)
        adv[:, t] = torch.where(m, a, 0.0)
        next_a = torch.where(m, a, next_a)
        next_v = torch.where(m, values[:, t], next_v)
    returns = torch.where(mask, adv + values, 0.0)  # (B, T)
    return adv, returns


# ---------------------------------------------------------------- critic-free advantages


def group_advantages(scores: Tensor, group_size: int, kind: str, eps: float = 1e-6) -> Tensor:
    """One advantage per answer from the rewards of its prompt's group of G answers  [GRPO, DrG, RLOO].

    scores (B,) with B = n_prompts · G, each group contiguous (rows g·G .. g·G + G − 1). kind:
    `grpo`:    (r_i − mean(r)) / (std(r) + eps), std with Bessel's correction (as verl and OpenRLHF);
    `dr_grpo`: r_i − mean(r) (no std division: it favours prompts whose answers barely differ);
    `rloo`:    r_i − mean of the other G − 1 rewards = G/(G−1) · (r_i − mean(r));
    `mean`:    r_i − mean(r), the group-mean baseline of REINFORCE++-baseline (before batch whitening).
    A group whose rewards are all equal gets 0 for each of its answers. Returns (B,) float32.
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (at least 2)")
    r = scores.float().view(-1, group_size)  # (n_prompts, G)
    centered = r - r.mean(1, keepdim=True)  # (n_prompts, G)
    if kind == "grpo":
        adv = centered / (r.std(1, keepdim=True) + eps)
    elif kind in ("dr_grpo", "mean"):
        adv = centered
    elif kind == "rloo":
        adv = centered * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group advantage {kind!r}; expected grpo, dr_grpo, rloo or mean")
    return adv.reshape(-1)  # (B,)


@torch.no_grad()
def equal_groups(scores: Tensor, group_size: int) -> Tensor:
    """Share of groups whose G rewards are all equal (zero advantage: no learning signal). 0-d float."""
    r = scores.float().view(-1, group_size)  # (n_prompts, G)
    return (r == r[:, :1]).all(1).float().mean()


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{k ≥ t} γ^{k−t} r_k over valid tokens (REINFORCE++'s return: no critic)  [R++].

    rewards, mask (B, T); masked positions are skipped like GAE's and come back as 0. (B, T).
    Equals gae(rewards, 0, mask, gamma, lam=1).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.detach(), 0.0)  # (B, T)
    out = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]  # (B,)
        g = rewards[:, t] + gamma * running  # (B,)
        out[:, t] = torch.where(m, g, 0.0)
        running = torch.where(m, g, running)
    return out


# ---------------------------------------------------------------- PPO losses

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(x: Tensor, mask: Tensor, kind: str = "token_mean", norm: float = 1.0) -> Tensor:
    """A per-token loss (B, T) as one number, by the algorithm's rule:
    `token_mean`:              Σ_bt m·x / Σ_bt m — every token of the batch weighs the same  [LHP] (PPO, RLOO, REINFORCE++);
    `seq_mean_token_mean`:     (1/B) Σ_b (Σ_t m·x / Σ_t m) — each answer's token mean, then the mean over answers [GRPO];
    `seq_mean_token_sum_norm`: (1/B) Σ_b Σ_t m·x / norm — token sums over a constant (the most tokens an answer
                               may have), no length normalisation [DrG].
    Over micro-batches the sum of w · aggregate(part) is the minibatch's value with w = the part's share of
    the minibatch's tokens (token_mean) or of its answers (the two others): `rl.update.micro_batches`. 0-d."""
    if kind == "token_mean":
        return masked_mean(x, mask)
    if kind == "seq_mean_token_mean":
        return masked_mean(x, mask, dim=1).mean()  # (B,) -> ()
    if kind == "seq_mean_token_sum_norm":
        return torch.where(mask.bool(), x, 0.0).sum(1).mean() / norm  # (B,) -> ()
    raise ValueError(f"unknown loss aggregation {kind!r}; expected one of {', '.join(AGGREGATIONS)}")


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
    agg: str = "token_mean", norm: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate  [LHP]: ρ = exp(logπ − logπ_old); loss = agg_t max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)).

    All inputs (B, T); aggregated by `aggregate(·, mask, agg, norm)` (default: the token mean over valid
    positions). Stats (detached 0-d tensors, token means whatever `agg`): `clipfrac` (share of tokens where
    the clipped term is the max), `approx_kl` (mean ½(logπ − logπ_old)²), `ratio_mean`.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_plain = -advantages * ratio  # (B, T)
    pg_clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)  # (B, T)
    loss = aggregate(torch.maximum(pg_plain, pg_clipped), mask, agg, norm)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_plain).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss  [LHP]: 0.5 · mean_t max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²).

    All inputs (B, T); token mean over valid positions. Stats: `vf_clipfrac` (share of tokens where
    the clipped term is the max).
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, T)
    vf_plain = (values - returns) ** 2  # (B, T)
    vf_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_plain, vf_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_clipped > vf_plain).float(), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, var=masked_var) -> Tensor:
    """1 − Var(R − V) / Var(R) over valid positions (population variances); 0 when Var(R) = 0. 0-d tensor.
    var(x, mask): the variance to use (data-parallel: over every rank's positions)."""
    var_r = var(returns, mask)
    var_res = var(returns - values, mask)
    return torch.where(var_r > 0, 1.0 - var_res / torch.where(var_r > 0, var_r, 1.0), 0.0)


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Adaptive KL controller  [LHP]: e = clip(kl / target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps / horizon).

    kl: batch mean of the per-sequence summed KL; n_steps: episodes in the batch. Plain floats.
    """
    error = min(max(float(kl) / float(target) - 1.0, -0.2), 0.2)
    return float(beta) * (1.0 + error * float(n_steps) / float(horizon))
