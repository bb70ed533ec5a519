"""Reward model: one forward pass per prompt group, and its loss equals the explicit pair mean; the
log π_ref term: its log-likelihoods, its fitted coefficient and how it enters the reward."""

import math

import pytest
import torch

from cherrytop.config import ModelConfig
from cherrytop.data.records import Comparison, Message
from cherrytop.data.tokenizer import render, split_response, train_tokenizer
from cherrytop.model.heads import LOGLIK_KEY, scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.rollout.episodes import response_loglik, reward
from cherrytop.stages.reward import (collate_groups, encode_group, fit_loglik_coef, group_rewards, loglik_features,
                                     rm_step)
from cherrytop.world import grade


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_k_responses_go_through_one_forward_and_loss_matches_pairs(tmp_path, monkeypatch, packed):
    """Every response of a batch in one pass (padded, or padding-free as a well-padded batch goes) and
    the loss of the explicit mean over every pair of each ranking."""
    from cherrytop.rollout import packing
    monkeypatch.setattr(packing, "worth_packing", lambda attn: packed)
    tok = train_tokenizer(["the cat is red .", "i do not know .", "sorry , no ."] * 10, vocab_size=300)
    lm = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), len(tok),
                     tok.pad_token_id, tok.eos_token_id)
    lm.save_pretrained(tmp_path)
    rm = scalar_model_from(tmp_path, tok.pad_token_id)
    prompt = (Message("user", "what color is the cat ?"),)
    comps = [Comparison(prompt, ("red .", "i do not know .", "the cat is red .", "sorry , no ."), (2, 0, 1, 3)),
             Comparison(prompt, ("no .", "red ."), (1, 0))]
    batch = collate_groups([(encode_group(tok, c, 64), c) for c in comps], tok.pad_token_id, 1.0)
    calls = []  # the tokens each pass embeds
    hook = rm.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: calls.append(args[0].numel() if packed else args[0].shape[0]))
    loss_sum, n = rm_step(rm, batch)
    hook.remove()
    # one pass over all 4 + 2 responses, not one per pair: the padded batch's 6 rows, or all their real tokens
    assert calls == [int(batch["attention_mask"].sum()) if packed else 6]
    # reference: score each response alone, then average log σ(r_w − r_l) over every pair
    expected = 0.0
    for c in comps:
        r = []
        for resp in c.responses:
            ids = torch.tensor([encode_group(tok, Comparison(prompt, (resp, resp), (0, 1)), 64)[0]])
            r.append(float(reward(rm, ids, torch.ones_like(ids), normalised=False).detach()))
        pairs = [(c.ranking[i], c.ranking[j]) for i in range(c.k) for j in range(i + 1, c.k)]
        expected += -sum(math.log(1 / (1 + math.exp(-(r[w] - r[l])))) for w, l in pairs) / len(pairs)
    assert int(n) == 2
    assert float(loss_sum.detach()) == pytest.approx(expected, rel=1e-4)  # rm_step returns the sum over prompts


def _tiny_lm(tmp_path, arch="llama"):
    tok = train_tokenizer(["the cat is red .", "i do not know .", "sorry , no .", "what color is the cat ?"] * 10,
                          vocab_size=300)
    lm = build_model(ModelConfig(arch=arch, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), len(tok),
                     tok.pad_token_id, tok.eos_token_id, seed=1).eval()
    lm.save_pretrained(tmp_path / arch)
    return tok, lm


@pytest.mark.parametrize("arch,excess", [("llama", False), ("gpt2", False), ("llama", True)])
def test_response_loglik_equals_one_plain_forward_per_answer(tmp_path, arch, excess):
    tok, lm = _tiny_lm(tmp_path, arch)
    prompts = [[Message("user", "what color is the cat ?")], [Message("user", "hi"), Message("assistant", "no ."),
                                                              Message("user", "sorry , what ?")]]
    answers = ["the cat is red .", "i do not know .", ""]
    items = [([{"role": m.role, "content": m.content} for m in p], a) for p in prompts for a in answers]
    pairs = [split_response(tok, m, a, 64) for m, a in items]
    got = response_loglik(lm, [h for h, _ in pairs], [r for _, r in pairs], tok.pad_token_id, batch_size=4, excess=excess)
    for (m, a), (head, resp), g in zip(items, pairs, got):
        full = tok(render(tok, [*m, {"role": "assistant", "content": a}]), add_special_tokens=False)["input_ids"]
        assert head + resp == full and resp[-1] == tok.eos_token_id  # the answer's tokens end at its EOS
        with torch.no_grad():
            logits = lm(torch.tensor([full])).logits[0]
        ref = 0.0
        for t in range(len(head), len(full)):
            probs = torch.softmax(logits[t - 1].double(), -1)
            ref += math.log(float(probs[full[t]]))
            if excess:  # + the entropy of the step's distribution
                ref -= float((probs * probs.log()).sum())
        assert float(g) == pytest.approx(ref, abs=1e-4)
    head, resp = split_response(tok, items[0][0], items[0][1], 8)  # cut from the left: the answer stays whole
    assert len(head) + len(resp) == 8 and resp == pairs[0][1]


def test_loglik_coefficient_fit_matches_a_grid_search():
    g = torch.Generator().manual_seed(0)
    prompt = (Message("user", "q"),)
    groups, ll = [], []
    for i in range(300):  # Plackett-Luce rankings (Gumbel noise): pairwise Bradley-Terry in c_true · loglik
        k = 4 + i % 3
        x = (torch.rand(k, generator=g) * -20).tolist()
        u = torch.rand(k, generator=g).clamp(1e-6, 1 - 1e-6)
        noisy = [0.3 * xi - float(torch.log(-torch.log(ui))) for xi, ui in zip(x, u)]
        ranking = tuple(sorted(range(k), key=lambda j: -noisy[j]))
        groups.append(([[0]] * k, Comparison(prompt, tuple(str(j) for j in range(k)), ranking, ((0, 1),) if i % 5 == 0 else ())))
        ll.append(x)
    c = fit_loglik_coef(groups, ll, tie_weight=1.0)

    def loss(coef: float) -> float:  # the explicit mean over prompts of the mean over pairs (ties: half each way)
        total = 0.0
        for (_, comp), x in zip(groups, ll):
            ties = {tuple(sorted(t)) for t in comp.ties}
            terms = []
            for a in range(comp.k):
                for b in range(a + 1, comp.k):
                    w, l_ = comp.ranking[a], comp.ranking[b]
                    d = coef * (x[w] - x[l_])
                    if tuple(sorted((w, l_))) in ties:
                        terms.append(0.5 * (math.log1p(math.exp(-d)) + math.log1p(math.exp(d))))
                    else:
                        terms.append(math.log1p(math.exp(-d)))
            total += sum(terms) / len(terms)
        return total / len(groups)
    grid = [i / 200 for i in range(0, 201)]
    best = min(grid, key=loss)
    assert abs(c - best) <= 0.005 + 1e-9 and loss(c) <= loss(best) + 1e-9
    assert 0.2 < c < 0.4  # and it recovers the coefficient the rankings were drawn with


def test_group_rewards_add_the_loglik_term(tmp_path):
    tok, lm = _tiny_lm(tmp_path)
    rm = scalar_model_from(tmp_path / "llama", tok.pad_token_id)
    prompt = (Message("user", "what color is the cat ?"),)
    comp = Comparison(prompt, ("red .", "i do not know .", "the cat is red ."), (2, 0, 1))
    ll = [loglik_features(lm, tok, [([{"role": "user", "content": prompt[0].content}], r) for r in comp.responses], 64)]
    plain = group_rewards(rm, collate_groups([(encode_group(tok, comp, 64), comp)], tok.pad_token_id, 1.0, ll))
    setattr(rm.config, LOGLIK_KEY, 0.5)
    with_term = group_rewards(rm, collate_groups([(encode_group(tok, comp, 64), comp)], tok.pad_token_id, 1.0, ll))
    assert torch.allclose(with_term - plain, 0.5 * torch.tensor(ll), atol=1e-5)


def test_reference_lm_is_frozen_in_the_frozen_dtype(tmp_path):
    """The π_ref of `rm.ref_loglik` is loaded frozen in `dist.frozen_dtype` (bf16 forced here on CPU; auto
    = fp32 on CPU): no gradients, and its log-likelihoods stay within bf16 rounding of the fp32 ones."""
    from cherrytop.config import load_config
    from cherrytop.stages.reward import _reference_lm
    tok, _ = _tiny_lm(tmp_path)
    pairs = [split_response(tok, [{"role": "user", "content": q}], a, 64)
             for q in ("what color is the cat ?", "hi") for a in ("the cat is red .", "i do not know .")]
    got = {}
    for setting, dtype in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        lm = _reference_lm(tmp_path / "llama", load_config("test", [], [f"--dist.frozen_dtype={setting}"]))
        assert all(q.dtype == dtype and not q.requires_grad for q in lm.parameters()) and not lm.training
        got[setting] = response_loglik(lm, [h for h, _ in pairs], [r for _, r in pairs], tok.pad_token_id, excess=True)
    assert got["bf16"].dtype == torch.float32 and not torch.equal(got["auto"], got["bf16"])
    eps = torch.finfo(torch.bfloat16).eps  # measured: 0.0024 at most
    torch.testing.assert_close(got["bf16"], got["auto"], rtol=0, atol=2 * eps)


def test_accuracy_counts_pairs_with_an_edited_answer_apart(tmp_path):
    """Held-out accuracy: the headline over pairs of sampled answers, `*_edits` over pairs with an
    edited answer, each equal to counting the rewards of `group_rewards` by hand, against the labeler
    and against the world's grader."""
    from cherrytop.stages.reward import accuracy
    from cherrytop.world import Task
    tok, _ = _tiny_lm(tmp_path)
    rm = scalar_model_from(tmp_path / "llama", tok.pad_token_id)
    task = Task(id="t", kind="fact", split="heldout", messages=({"role": "user", "content": "what color is the cat ?"},),
                meta={"answer": "the cat is red .", "facts": [], "world": {}})
    prompt = (Message("user", task.messages[0]["content"]),)
    responses = ("the cat is red .", "red .", "i do not know .", "the cat is is red .")
    comps = [Comparison(prompt, responses, (0, 3, 1, 2), meta={"task": task.to_record(),
                                                               "edits": [{"index": 3, "of": 0, "kind": "repeat"}]}),
             Comparison(prompt, responses[:3], (2, 1, 0), meta={"task": task.to_record()})]
    groups = [(encode_group(tok, c, 64), c) for c in comps]
    got = accuracy(rm, groups, None, tok.pad_token_id)
    r = group_rewards(rm, collate_groups(groups, tok.pad_token_id, 1.0))
    lab, lab_e, true, true_e = [0, 0], [0, 0], [0, 0], [0, 0]
    for m, c in enumerate(comps):
        q = [grade(task, x).quality for x in c.responses]
        for a in range(c.k):
            for b in range(a + 1, c.k):
                w, l_ = c.ranking[a], c.ranking[b]
                (lab_e if 3 in (w, l_) and m == 0 else lab)[0] += int(r[m, w] > r[m, l_])
                (lab_e if 3 in (w, l_) and m == 0 else lab)[1] += 1
        for x in range(c.k):
            for y in range(c.k):
                if q[x] > q[y]:
                    (true_e if 3 in (x, y) and m == 0 else true)[0] += int(r[m, x] > r[m, y])
                    (true_e if 3 in (x, y) and m == 0 else true)[1] += 1
    assert (got["pairs_labelers"], got["pairs_labelers_edits"]) == (lab[1], lab_e[1]) == (6, 3)
    assert (got["pairs_grader"], got["pairs_grader_edits"]) == (true[1], true_e[1])
    assert got["accuracy_labelers"] == pytest.approx(lab[0] / lab[1])
    assert got["accuracy_labelers_edits"] == pytest.approx(lab_e[0] / lab_e[1])
    assert got["accuracy_grader"] == pytest.approx(true[0] / true[1])
    assert got["accuracy_grader_edits"] == pytest.approx(true_e[0] / true_e[1])


def test_accuracy_line_names_the_grader_only_where_there_is_one(tmp_path):
    """Comparisons of your own (`cherrytop label export`) have no grader: the stage says so instead of
    printing `nan vs the noise-free grader`."""
    from cherrytop.stages.reward import accuracy, accuracy_line
    tok, _ = _tiny_lm(tmp_path)
    rm = scalar_model_from(tmp_path / "llama", tok.pad_token_id)
    prompt = (Message("user", "what color is the cat ?"),)
    mine = Comparison(prompt, ("red .", "i do not know ."), (0, 1))  # no `task`: no grader
    got = accuracy(rm, [(encode_group(tok, mine, 64), mine)], None, tok.pad_token_id)
    line = accuracy_line({**got, "reward_bias": 0.0})
    assert got["pairs_grader"] == 0 and "nan" not in line and "(no grader for these prompts)" in line
    world = {"accuracy_labelers": 0.75, "accuracy_grader": 0.5, "pairs_labelers": 4, "pairs_grader": 2,
             "reward_bias": -0.1, "accuracy_labelers_edits": 1.0, "accuracy_grader_edits": 0.0,
             "pairs_labelers_edits": 1, "pairs_grader_edits": 1}
    assert accuracy_line(world) == ("rm: held-out accuracy 0.750 vs labelers, 0.500 vs the noise-free grader; "
                                    "bias -0.100; on edited answers 1.000 / 0.000")


def test_edit_weight_scales_the_pairs_with_an_edited_answer(tmp_path):
    """`rm.edit_weight` w: the collated loss equals the weighted mean over the prompt's pairs, counted
    by hand (a pair with the edited answer weighs w, the others 1); w = 1 is the plain loss."""
    tok, _ = _tiny_lm(tmp_path)
    rm = scalar_model_from(tmp_path / "llama", tok.pad_token_id)
    prompt = (Message("user", "what color is the cat ?"),)
    comp = Comparison(prompt, ("the cat is red .", "red .", "i do not know .", "the cat is is red ."), (0, 3, 1, 2),
                      meta={"edits": [{"index": 3, "of": 0, "kind": "repeat"}]})
    groups = [(encode_group(tok, comp, 64), comp)]
    r = group_rewards(rm, collate_groups(groups, tok.pad_token_id, 1.0))[0].tolist()
    for w in (1.0, 0.25, 0.0):
        b = collate_groups(groups, tok.pad_token_id, 1.0, edit_weight=w)
        got, n = rm_step(rm, b)
        terms = [((w if 3 in (i, j) else 1.0), math.log(1 / (1 + math.exp(r[j] - r[i]))))
                 for a, i in enumerate(comp.ranking) for j in comp.ranking[a + 1:]]
        want = -sum(x * t for x, t in terms) / sum(x for x, _ in terms)
        assert n == 1 and float(got) == pytest.approx(want, rel=1e-5)


def test_loglik_coefficient_is_fitted_on_sampled_answers_only():
    """An edited answer (`compare.edits`) is in no pair of the c fit: adding one per ranking, with a
    log-likelihood that contradicts its rank, leaves c as fitted without it."""
    g = torch.Generator().manual_seed(1)
    prompt = (Message("user", "q"),)
    plain, with_edit, ll, ll_edit = [], [], [], []
    for i in range(100):
        x = (torch.rand(4, generator=g) * -20).tolist()
        ranking = tuple(sorted(range(4), key=lambda j: -x[j] + 8 * float(torch.rand(1, generator=g))))
        plain.append(([[0]] * 4, Comparison(prompt, tuple("abcd"), ranking)))
        with_edit.append(([[0]] * 5, Comparison(prompt, tuple("abcde"), ranking + (4,),
                                                meta={"edits": [{"index": 4, "of": ranking[0], "kind": "drop"}]})))
        ll.append(x)
        ll_edit.append(x + [50.0])  # ranked last, yet the likeliest answer by far
    c = fit_loglik_coef(plain, ll, tie_weight=1.0)
    assert c > 0.05
    assert fit_loglik_coef(with_edit, ll_edit, tie_weight=1.0) == pytest.approx(c, rel=1e-6)
    unmarked = [(ids, Comparison(comp.prompt, comp.responses, comp.ranking)) for ids, comp in with_edit]
    assert fit_loglik_coef(unmarked, ll_edit, tie_weight=1.0) < c / 2  # counted as a sample, it would pull c down
