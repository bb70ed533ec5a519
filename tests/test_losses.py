"""Each function of cherrytop.losses against a plain reference: Python loops over scalars."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cherrytop import losses as L


def ragged_mask(lengths, T):
    return torch.tensor([[t < n for t in range(T)] for n in lengths])


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- language modelling


def test_token_logprobs_with_temperature():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    for temp in (1.0, 0.7):
        got = L.token_logprobs(logits, tokens, temperature=temp)
        ref = torch.zeros(2, 5)
        for b in range(2):
            for t in range(5):
                z = [logits[b, t, v].item() / temp for v in range(7)]
                ref[b, t] = z[tokens[b, t]] - math.log(sum(math.exp(x) for x in z))
        assert got.shape == (2, 5)
        assert_close(got, ref)
        assert_close(got, torch.log_softmax(logits / temp, -1).gather(-1, tokens[..., None])[..., 0])


def test_token_logprobs_gradient_matches_autograd_through_the_plain_formula():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 4))
    for temp in (1.0, 0.7):
        logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: L.token_logprobs(z, tokens, temp), (logits,))
        g = torch.randn(3, 4, dtype=torch.float64)
        (L.token_logprobs(logits, tokens, temp) * g).sum().backward()
        ref = logits.detach().clone().requires_grad_()
        z = ref / temp
        ((z.gather(-1, tokens[..., None])[..., 0] - torch.logsumexp(z, -1)) * g).sum().backward()
        assert_close(logits.grad, ref.grad)
    half = torch.randn(3, 4, 11).bfloat16().requires_grad_()  # bf16 logits (GPU autocast): float32 math, bf16 grad
    L.token_logprobs(half, tokens).sum().backward()
    assert half.grad.dtype == torch.bfloat16
    assert_close(half.grad.float(), F.one_hot(tokens, 11) - torch.softmax(half.detach().float(), -1), atol=1e-2, rtol=0)


def test_lm_loss_matches_loop_and_sum_count_split_is_batch_invariant():
    torch.manual_seed(0)
    B, T, V = 8, 6, 11
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    labels[labels % 3 == 0] = -100  # ragged supervision
    labels[0] = -100  # a row with nothing to learn
    total, count = L.lm_loss(logits, labels)
    ref_sum, ref_n = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            ref_sum += F.cross_entropy(logits[b, t][None], torch.tensor([y])).item()
            ref_n += 1
    assert total.dtype == torch.float32 and total.dim() == 0 and count.dim() == 0
    assert count.item() == ref_n
    assert_close(total, torch.tensor(ref_sum))
    # batch 8 x accumulation 1 == batch 2 x accumulation 4 once divided by the global token count
    parts = [L.lm_loss(logits[i : i + 2], labels[i : i + 2]) for i in range(0, B, 2)]
    n_global = sum(n for _, n in parts)
    assert_close(sum(s for s, _ in parts) / n_global, total / count)


def test_entropy_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    ref = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            z = [math.exp(logits[b, t, v].item()) for v in range(5)]
            p = [x / sum(z) for x in z]
            ref[b, t] = -sum(q * math.log(q) for q in p)
    assert_close(L.entropy_from_logits(logits), ref)


# ---------------------------------------------------------------- reward model


def test_ranking_pairs_gives_all_pairs_and_ties_replace_strict():
    pref, tie = L.ranking_pairs([2, 0, 3, 1], None, k_max=6)
    assert pref.shape == tie.shape == (6, 6)
    assert pref.sum().item() == math.comb(4, 2) and tie.sum().item() == 0
    assert pref[2, 0] and pref[2, 1] and pref[0, 3] and pref[3, 1] and not pref[0, 2]
    assert not pref[4:].any() and not pref[:, 4:].any()
    pref, tie = L.ranking_pairs([2, 0, 3, 1], [(0, 3)], k_max=4)
    assert not pref[0, 3] and not pref[3, 0] and tie[0, 3] and tie[3, 0]
    assert pref.sum().item() + tie.sum().item() // 2 == math.comb(4, 2)
    assert not (pref & tie).any()


@pytest.mark.parametrize(
    "ranking, ties, k_max",
    [([0, 1, 1], None, 4), ([0, 2], None, 4), ([1, 2, 3], None, 4), ([0, 1, 2], None, 2),
     ([0, 1, 2], [(0, 3)], 4), ([0, 1, 2], [(1, 1)], 4), ([0, 1, 2], [(-1, 0)], 4)],
)
def test_ranking_pairs_rejects_bad_input(ranking, ties, k_max):
    with pytest.raises(ValueError):
        L.ranking_pairs(ranking, ties, k_max)


def _ranking_batch(with_ties):
    torch.manual_seed(0)
    k_max = 9
    rankings = [torch.randperm(4).tolist(), torch.randperm(9).tolist(), [0], torch.randperm(3).tolist()]
    ties = [[(1, 3)], [(0, 5), (2, 7), (5, 8)], [], []] if with_ties else [None] * 4
    mats = [L.ranking_pairs(r, t, k_max) for r, t in zip(rankings, ties)]
    pref = torch.stack([p for p, _ in mats])
    tie = torch.stack([t for _, t in mats])
    rewards = torch.randn(4, k_max)
    for b, r in enumerate(rankings):
        rewards[b, len(r):] = float("nan")  # padded slots must never be read
    return rewards, pref, tie, rankings, ties


@pytest.mark.parametrize("with_ties, weighted", [(False, False), (True, False), (True, True)])
def test_ranking_loss_is_mean_over_every_pair_of_each_prompt(with_ties, weighted):
    rewards, pref, tie, rankings, ties = _ranking_batch(with_ties)
    tie_weight = 0.5
    # per-response weights; a pair weighs the product (as rm.edit_weight makes them: 1, or w for an edit)
    resp_w = torch.rand(rewards.shape) + 0.1 if weighted else torch.ones(rewards.shape)  # (B, K)
    per_prompt = []
    for b, (rank, tp) in enumerate(zip(rankings, ties)):
        tied = {frozenset(p) for p in tp or []}
        r, rw = rewards[b].tolist(), resp_w[b].tolist()
        terms, total = [], 0.0
        for a in range(len(rank)):
            for c in range(a + 1, len(rank)):
                i, j = rank[a], rank[c]
                w = rw[i] * rw[j]
                if frozenset((i, j)) in tied:
                    terms.append(w * tie_weight * 0.5 * (logsig(r[i] - r[j]) + logsig(r[j] - r[i])))
                else:
                    terms.append(w * logsig(r[i] - r[j]))
                total += w
        assert len(terms) == math.comb(len(rank), 2)
        if terms:
            per_prompt.append(-sum(terms) / total)
    assert len(per_prompt) == 3  # the K=1 prompt has no pair and is left out of the mean
    weight = resp_w.unsqueeze(2) * resp_w.unsqueeze(1) if weighted else None  # (B, K, K)
    got = L.ranking_loss(rewards, pref, tie if with_ties else None, tie_weight=tie_weight, weight=weight)
    assert_close(got, torch.tensor(sum(per_prompt) / len(per_prompt)))


def test_ranking_loss_leaves_out_a_prompt_whose_pairs_all_weigh_zero():
    rewards, pref, tie, _, _ = _ranking_batch(True)
    weight = torch.ones(pref.shape)
    weight[1] = 0.0
    kept = [0, 3]  # prompt 2 (K = 1) has no pair either
    want = L.ranking_loss(rewards[kept], pref[kept], tie[kept])
    assert_close(L.ranking_loss(rewards, pref, tie, weight=weight), want)


def test_ranking_loss_gradients_reach_every_real_response_and_no_padding():
    rewards, pref, tie, rankings, _ = _ranking_batch(True)
    rewards = torch.nan_to_num(rewards, nan=0.0).requires_grad_()
    L.ranking_loss(rewards, pref, tie).backward()
    for b, r in enumerate(rankings):
        k = len(r) if len(r) > 1 else 0  # a lone response (K = 1) is in no pair: no gradient
        assert (rewards.grad[b, :k] != 0).all()
        assert (rewards.grad[b, k:] == 0).all()
    assert torch.isfinite(rewards.grad).all()


def test_ranking_loss_tie_pulls_rewards_together_and_empty_batch_is_zero():
    r = torch.tensor([[2.0, -1.0]], requires_grad=True)
    pref, tie = L.ranking_pairs([0, 1], [(0, 1)], 2)
    L.ranking_loss(r, pref[None], tie[None]).backward()
    assert r.grad[0, 0] > 0 and r.grad[0, 1] < 0  # gradient descent moves them toward each other
    empty = torch.zeros(2, 3, 3, dtype=torch.bool)
    assert L.ranking_loss(torch.randn(2, 3), empty).item() == 0.0


@pytest.mark.parametrize("kind, eps", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0), ("simpo", 0.0)])
def test_preference_loss_is_mean_over_every_pair_of_each_prompt(kind, eps):
    x, pref, tie, rankings, ties = _ranking_batch(True)
    beta, gamma, tie_weight = 0.7, 0.3, 0.5
    per_prompt = []
    for b, (rank, tp) in enumerate(zip(rankings, ties)):
        tied = {frozenset(p) for p in tp or []}
        r, terms = x[b].tolist(), []
        for a in range(len(rank)):
            for c in range(a + 1, len(rank)):
                i, j = rank[a], rank[c]
                d = r[i] - r[j]
                if frozenset((i, j)) in tied:
                    terms.append(tie_weight * (d * d if kind == "ipo" else -0.5 * (logsig(beta * d) + logsig(-beta * d))))
                elif kind == "ipo":
                    terms.append((d - 1 / (2 * beta)) ** 2)
                elif kind == "simpo":
                    terms.append(-logsig(beta * d - gamma))
                else:
                    terms.append(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    got = L.preference_loss(x, pref, tie, kind, beta=beta, label_smoothing=eps, margin=gamma, tie_weight=tie_weight)
    assert_close(got, torch.tensor(sum(per_prompt) / len(per_prompt)))


def test_dpo_loss_is_the_ranking_loss_of_beta_times_the_log_ratios():
    x, pref, tie, _, _ = _ranking_batch(True)
    assert_close(L.preference_loss(x, pref, tie, "dpo", beta=0.3, tie_weight=0.5),
                 L.ranking_loss(0.3 * x, pref, tie, tie_weight=0.5))


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "plackett_luce"])
def test_preference_gradients_reach_every_real_answer_and_no_padding(kind):
    x, pref, tie, rankings, _ = _ranking_batch(True)
    x = torch.nan_to_num(x, nan=0.0).requires_grad_()
    loss = L.plackett_luce_loss(x, pref, tie, 0.5) if kind == "plackett_luce" else L.preference_loss(x, pref, tie, kind)
    loss.backward()
    for b, r in enumerate(rankings):
        k = len(r) if len(r) > 1 else 0
        assert (x.grad[b, :k] != 0).all() and (x.grad[b, k:] == 0).all()
    with pytest.raises(ValueError, match="unknown preference loss"):
        L.preference_loss(x, pref, tie, "kto")


@pytest.mark.parametrize("with_ties", [False, True])
def test_plackett_luce_against_a_loop_over_places(with_ties):
    x, pref, tie, rankings, ties = _ranking_batch(with_ties)
    beta = 0.8
    per_prompt = []
    for b, (rank, tp) in enumerate(zip(rankings, ties)):
        tied = {frozenset(p) for p in tp or []}
        s = [beta * v for v in x[b].tolist()]
        terms = []
        for place, k in enumerate(rank):
            above = {rank[a] for a in range(place) if frozenset((rank[a], k)) not in tied}
            risk = [j for j in rank if j not in above]  # k, the answers below it, and those tied with it
            if len(risk) > 1:
                terms.append(s[k] - math.log(sum(math.exp(s[j]) for j in risk)))
        if terms:
            per_prompt.append(-sum(terms) / len(terms))
    got = L.plackett_luce_loss(x, pref, tie if with_ties else None, beta)
    assert_close(got, torch.tensor(sum(per_prompt) / len(per_prompt)))


def test_plackett_luce_of_a_pair_is_dpo():
    x = torch.tensor([[0.4, -1.3], [2.0, 0.5]])
    pref = torch.stack([L.ranking_pairs([0, 1], None, 2)[0], L.ranking_pairs([1, 0], None, 2)[0]])
    assert_close(L.plackett_luce_loss(x, pref, None, 0.2), L.preference_loss(x, pref, None, "dpo", beta=0.2))


def test_ranking_accuracy():
    rewards, pref, tie, rankings, _ = _ranking_batch(True)
    rewards = torch.nan_to_num(rewards, nan=0.0)
    correct, total = L.ranking_accuracy(rewards, pref)
    c = n = 0
    for b in range(4):
        for i in range(9):
            for j in range(9):
                if pref[b, i, j]:
                    n += 1
                    c += rewards[b, i].item() > rewards[b, j].item()
    assert (correct.item(), total.item()) == (c, n)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_var_whiten_against_numpy():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 7), ragged_mask([7, 3, 5], 7)
    x_garbage = x.masked_fill(~mask, float("inf"))
    vals = np.array([x[b, t].item() for b in range(3) for t in range(7) if mask[b, t]], dtype=np.float64)
    assert_close(L.masked_mean(x_garbage, mask), torch.tensor(vals.mean(), dtype=torch.float32))
    assert_close(L.masked_var(x_garbage, mask), torch.tensor(vals.var(), dtype=torch.float32))
    assert_close(L.masked_var(x, mask, unbiased=True), torch.tensor(vals.var(ddof=1), dtype=torch.float32))
    row_means = torch.tensor([x[b, : n].mean().item() for b, n in enumerate([7, 3, 5])])
    assert_close(L.masked_mean(x_garbage, mask, dim=1), row_means)
    for shift_mean in (True, False):
        got = L.masked_whiten(x_garbage, mask, shift_mean=shift_mean)
        ref = torch.zeros(3, 7)
        for b in range(3):
            for t in range(7):
                if mask[b, t]:
                    w = (x[b, t].item() - vals.mean()) / math.sqrt(vals.var() + 1e-8)
                    ref[b, t] = w if shift_mean else w + vals.mean()
        assert_close(got, ref)
    assert L.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- PPO rewards and advantages


def test_kl_estimators_eos_penalty_and_shaped_rewards():
    torch.manual_seed(0)
    lengths = [5, 2, 0, 4]
    logp, ref_logp, mask = -torch.rand(4, 5) * 3, -torch.rand(4, 5) * 3, ragged_mask(lengths, 5)
    kl, k3 = L.per_token_kl(logp, ref_logp, mask), L.kl_k3(logp, ref_logp, mask)
    scores = torch.tensor([1.5, -0.3, 2.0, 0.7])
    has_eos = torch.tensor([True, False, True, True])
    final = L.apply_eos_penalty(scores, has_eos, -1.0)
    assert_close(final, torch.tensor([1.5, -1.0, 2.0, 0.7]))
    beta = 0.05
    shaped = L.shaped_rewards(final, kl, mask, beta)
    for b, n in enumerate(lengths):
        for t in range(5):
            d = logp[b, t].item() - ref_logp[b, t].item()
            e = ref_logp[b, t].item() - logp[b, t].item()
            want_kl = d if t < n else 0.0
            want_k3 = (math.exp(e) - 1 - e) if t < n else 0.0
            want_r = -beta * want_kl + (final[b].item() if t == n - 1 else 0.0)
            assert math.isclose(kl[b, t].item(), want_kl, abs_tol=1e-6)
            assert math.isclose(k3[b, t].item(), want_k3, abs_tol=1e-6) and k3[b, t] >= 0
            assert math.isclose(shaped[b, t].item(), want_r, abs_tol=1e-6)
    assert (shaped[2] == 0).all()  # empty response: no score anywhere
    dense = torch.randn(4, 5)
    with_dense = L.shaped_rewards(final, kl, mask, beta, dense)
    for b, n in enumerate(lengths):
        for t in range(5):
            want = shaped[b, t].item() + (dense[b, t].item() if t < n else 0.0)
            assert math.isclose(with_dense[b, t].item(), want, abs_tol=1e-6)


def test_gae_against_per_row_loop():
    torch.manual_seed(0)
    lengths, T, gamma, lam = [6, 1, 4, 0], 6, 0.9, 0.8
    rewards, values, mask = torch.randn(4, T), torch.randn(4, T), ragged_mask(lengths, T)
    adv, ret = L.gae(rewards.masked_fill(~mask, float("nan")), values, mask, gamma, lam)
    ref_adv, ref_ret = torch.zeros(4, T), torch.zeros(4, T)
    for b, n in enumerate(lengths):
        next_v = next_a = 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t].item()
            ref_adv[b, t], ref_ret[b, t] = next_a, next_a + next_v
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_kl_estimate_k1_k2_k3_values_and_gradients_by_hand():
    torch.manual_seed(0)
    lengths = [4, 1, 0]
    logp, ref_logp, mask = -torch.rand(3, 4) * 3, -torch.rand(3, 4) * 3, ragged_mask(lengths, 4)
    logp = logp.double().requires_grad_()
    for kind in L.KL_ESTIMATORS:
        got = L.kl_estimate(logp, ref_logp.double(), mask, kind)
        got.sum().backward()
        for b, n in enumerate(lengths):
            for t in range(4):
                l = logp[b, t].item() - ref_logp[b, t].item()
                want, dwant = {"k1": (l, 1.0), "k2": (0.5 * l * l, l),
                               "k3": (math.exp(-l) - 1 + l, 1 - math.exp(-l))}[kind]
                if t >= n:
                    want = dwant = 0.0
                assert math.isclose(got[b, t].item(), want, abs_tol=1e-9), (kind, b, t)
                assert math.isclose(logp.grad[b, t].item(), dwant, abs_tol=1e-9), (kind, b, t)
        logp.grad = None
    assert_close(L.kl_estimate(logp, ref_logp.double(), mask, "k3"), L.kl_k3(logp, ref_logp.double(), mask))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        L.kl_estimate(logp, ref_logp, mask, "k4")


def test_group_advantages_against_per_group_loops():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0])
    G = 4
    for kind in ("grpo", "dr_grpo", "rloo", "mean"):
        got = L.group_advantages(scores, G, kind)
        for g in range(3):
            r = [scores[g * G + i].item() for i in range(G)]
            mean = sum(r) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
            for i in range(G):
                others = (sum(r) - r[i]) / (G - 1)
                want = {"grpo": (r[i] - mean) / (std + 1e-6), "dr_grpo": r[i] - mean, "mean": r[i] - mean,
                        "rloo": r[i] - others}[kind]
                assert math.isclose(got[g * G + i].item(), want, abs_tol=1e-5), (kind, g, i)
        assert (got[4:8] == 0).all()  # a group of equal rewards: no signal
    assert math.isclose(L.equal_groups(scores, G).item(), 1 / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="groups of 5"):
        L.group_advantages(scores, 5, "grpo")
    with pytest.raises(ValueError, match="unknown group advantage"):
        L.group_advantages(scores, G, "ppo")


def test_reward_to_go_against_loop_and_gae_without_values():
    torch.manual_seed(0)
    lengths, T, gamma = [5, 1, 3, 0], 5, 0.9
    rewards, mask = torch.randn(4, T), ragged_mask(lengths, T)
    mask[0, 2] = False  # a hole: skipped, the next valid token follows
    got = L.reward_to_go(rewards.masked_fill(~mask, float("nan")), mask, gamma)
    ref = torch.zeros(4, T)
    for b in range(4):
        running = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                running = rewards[b, t].item() + gamma * running
                ref[b, t] = running
    assert_close(got, ref)
    assert_close(got, L.gae(rewards, torch.zeros(4, T), mask, gamma, 1.0)[0])


# ---------------------------------------------------------------- PPO losses


def test_ppo_policy_loss_against_loop():
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    mask = ragged_mask(lengths, 5)
    old = -torch.rand(3, 5) * 2
    logp = (old + torch.randn(3, 5) * 0.4).requires_grad_()
    adv = torch.randn(3, 5)
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    terms, clipped, kls, ratios = [], [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            lr = logp[b, t].item() - old[b, t].item()
            rho, a = math.exp(lr), adv[b, t].item()
            plain, clip_term = -a * rho, -a * min(max(rho, 0.8), 1.2)
            terms.append(max(plain, clip_term))
            clipped.append(float(clip_term > plain))
            kls.append(0.5 * lr * lr)
            ratios.append(rho)
    assert_close(loss, torch.tensor(sum(terms) / len(terms)))
    assert_close(stats["clipfrac"], torch.tensor(sum(clipped) / len(clipped)))
    assert_close(stats["approx_kl"], torch.tensor(sum(kls) / len(kls)))
    assert_close(stats["ratio_mean"], torch.tensor(sum(ratios) / len(ratios)))
    assert 0 < stats["clipfrac"].item() < 1
    loss.backward()
    assert (logp.grad[~mask] == 0).all()


def test_aggregations_and_the_grpo_dr_grpo_policy_losses_against_loops():
    """token_mean (PPO), seq_mean_token_mean (GRPO: each answer's token mean, then the mean over answers),
    seq_mean_token_sum_norm (Dr. GRPO: token sums over a constant); the clipped surrogate takes the same rule."""
    torch.manual_seed(1)
    lengths, T, norm = [5, 1, 3, 4], 5, 7.0
    mask = ragged_mask(lengths, T)
    x = torch.randn(4, T).masked_fill(~mask, float("nan"))  # masked entries are never read
    per_answer = [[x[b, t].item() for t in range(n)] for b, n in enumerate(lengths)]
    flat = [v for row in per_answer for v in row]
    want = {"token_mean": sum(flat) / len(flat),
            "seq_mean_token_mean": sum(sum(r) / len(r) for r in per_answer) / 4,
            "seq_mean_token_sum_norm": sum(sum(r) / norm for r in per_answer) / 4}
    for kind, w in want.items():
        assert math.isclose(L.aggregate(x, mask, kind, norm).item(), w, rel_tol=1e-6), kind
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        L.aggregate(x, mask, "seq_sum")
    old = -torch.rand(4, T) * 2
    logp = old + torch.randn(4, T) * 0.4
    adv = torch.randn(4, T)
    for kind in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss, _ = L.ppo_policy_loss(logp, old, adv, mask, 0.2, kind, norm)
        rows = [[max(-adv[b, t].item() * math.exp(logp[b, t].item() - old[b, t].item()),
                     -adv[b, t].item() * min(max(math.exp(logp[b, t].item() - old[b, t].item()), 0.8), 1.2))
                 for t in range(n)] for b, n in enumerate(lengths)]
        w = (sum(sum(r) / len(r) for r in rows) / 4 if kind == "seq_mean_token_mean"
             else sum(sum(r) for r in rows) / norm / 4)
        assert math.isclose(loss.item(), w, rel_tol=1e-5), kind


def test_ppo_value_loss_against_loop():
    torch.manual_seed(0)
    lengths = [5, 2, 4]
    mask = ragged_mask(lengths, 5)
    old_v, returns = torch.randn(3, 5), torch.randn(3, 5)
    values = old_v + torch.randn(3, 5) * 0.4
    loss, stats = L.ppo_value_loss(values, old_v, returns, mask, clip=0.2)
    terms, clipped = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            v, vo, r = values[b, t].item(), old_v[b, t].item(), returns[b, t].item()
            vc = min(max(v, vo - 0.2), vo + 0.2)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped.append(float((vc - r) ** 2 > (v - r) ** 2))
    assert_close(loss, torch.tensor(0.5 * sum(terms) / len(terms)))
    assert_close(stats["vf_clipfrac"], torch.tensor(sum(clipped) / len(clipped)))
    assert 0 < stats["vf_clipfrac"].item() < 1


def test_explained_variance():
    torch.manual_seed(0)
    mask = ragged_mask([4, 2, 3], 4)
    values, returns = torch.randn(3, 4), torch.randn(3, 4)
    v = np.array([values[b, t].item() for b in range(3) for t in range(4) if mask[b, t]])
    r = np.array([returns[b, t].item() for b in range(3) for t in range(4) if mask[b, t]])
    got = L.explained_variance(values, returns, mask)
    assert got.dim() == 0
    assert_close(got, torch.tensor(1 - np.var(r - v) / np.var(r), dtype=torch.float32))
    assert L.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert L.explained_variance(values, torch.ones(3, 4), mask).item() == 0.0  # Var(R) = 0


def test_adaptive_kl_beta_by_hand():
    assert L.adaptive_kl_beta(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert L.adaptive_kl_beta(0.1, 6.6, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert L.adaptive_kl_beta(0.1, 0.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    assert isinstance(L.adaptive_kl_beta(0.1, 9.0, 6.0, 10000, 64), float)
