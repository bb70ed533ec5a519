"""Issue 26, finding 9: an answer longer than the context window is scored on the tokens reward-model
training keeps (`heads.fit_answer`: the last window tokens of prompt + answer), for the head and the
log π_ref term alike, everywhere an answer is scored, and the cut answers are counted. References are
plain forward passes of the models on the cut row. GPT-2's learned positions raised IndexError before."""

import math

import pytest
import torch

from cherrytop.config import ModelConfig
from cherrytop.data.tokenizer import render, train_tokenizer
from cherrytop.eval.judge import Judge
from cherrytop.model.heads import KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, fit_answer, scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.rollout.episodes import response_logp, response_loglik, reward
from cherrytop.stages.reward import answers_cut, encode_answer, loglik_features

W = 48  # the tiny models' context window
PROMPT = [{"role": "user", "content": "what color is the cat ?"}]
LONG = "the cat is red . " * 40  # ~160 tokens
SHORT = "the cat is red ."


def _models(tmp_path, arch):
    """(tokenizer, π_ref, reward-model folder with the c · log π_ref term, its reward model)."""
    tok = train_tokenizer(["the cat is red .", "i do not know .", "what color is the cat ?"] * 10, vocab_size=300)
    lm = build_model(ModelConfig(arch=arch, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=W), len(tok),
                     tok.pad_token_id, tok.eos_token_id, seed=1).eval()
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    rm = scalar_model_from(tmp_path / "lm", tok.pad_token_id).eval()
    for key, value in ((LOGLIK_KEY, 0.3), (REFERENCE_KEY, str(tmp_path / "lm")), (KIND_KEY, "sum")):
        setattr(rm.config, key, value)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return tok, lm, tmp_path / "rm", rm


def _full(tok, answer):
    return tok(render(tok, [*PROMPT, {"role": "assistant", "content": answer}]), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _plain_loglik(lm, row, first):
    """Σ log π_ref(row[t] | row[:t]) for t ≥ first, from one plain forward pass."""
    logp = torch.log_softmax(lm(torch.tensor([row])).logits[0].double(), -1)
    return sum(float(logp[t - 1, row[t]]) for t in range(first, len(row)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_cuts_the_head_row_and_the_loglik_row_alike(tmp_path, arch):
    tok, lm, _, _ = _models(tmp_path, arch)
    full = _full(tok, LONG)
    assert len(full) > 2 * W
    row = encode_answer(tok, PROMPT, LONG, W)
    assert row == full[-W:]  # the head reads the last W tokens, the answer's EOS last
    got = loglik_features(lm, tok, [(PROMPT, LONG), (PROMPT, SHORT)], W)
    assert got[0] == pytest.approx(_plain_loglik(lm, full[-W:], 1), abs=1e-4)  # every kept token after the first
    short = _full(tok, SHORT)
    head = len(tok(render(tok, PROMPT, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert got[1] == pytest.approx(_plain_loglik(lm, short, head), abs=1e-4)  # what fits is not touched
    assert answers_cut(tok, [(PROMPT, LONG), (PROMPT, SHORT)], W) == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_judge_scores_a_long_answer_on_the_cut_row_and_counts_it(tmp_path, arch):
    tok, lm, rm_dir, rm = _models(tmp_path, arch)
    j = Judge(rm_dir)
    got = j.scores([PROMPT, PROMPT], [LONG, SHORT])
    row = _full(tok, LONG)[-W:]
    with torch.no_grad():
        head = float(reward(rm, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)))
    assert got[0] == pytest.approx(head + 0.3 * _plain_loglik(lm, row, 1), abs=1e-4)
    assert math.isfinite(got[1]) and j.cut == 1 and j.seq_len == W


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ppo_scoring_cuts_episodes_past_the_window(tmp_path, arch, packed):
    """An episode batch wider than the reward model's window (left-padded prompts, right-padded answers,
    as PPO's): the head and log π_ref as on each episode's last W tokens, with a warning."""
    tok, lm, _, rm = _models(tmp_path, arch)
    prompt = [9, 10, 11, 12]
    answers = [list(range(20, 20 + n)) for n in (60, 10)]  # the first runs 16 tokens past the window
    P, N = len(prompt), max(map(len, answers))
    ids = torch.full((2, P + N), tok.pad_token_id)
    attn = torch.zeros((2, P + N), dtype=torch.long)
    for b, a in enumerate(answers):
        ids[b, :P + len(a)] = torch.tensor(prompt + a)
        attn[b, :P + len(a)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), pytest.warns(UserWarning, match=rf"1 of 2 answers longer than its context window of {W}"):
        r = reward(rm, ids, attn, pos, packed=packed)
    with torch.no_grad(), pytest.warns(UserWarning, match="log π_ref: 1 of 2"):
        logp = response_logp(lm if packed else _Plain(lm), ids, attn, pos, P, 1.0)
    for b, a in enumerate(answers):
        row = (prompt + a)[-W:]
        with torch.no_grad():
            ref_r = float(reward(rm, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)))
            lp = torch.log_softmax(lm(torch.tensor([row])).logits[0].double(), -1)
        assert float(r[b]) == pytest.approx(ref_r, abs=1e-4)
        dropped = P + len(a) - len(row)  # tokens cut from the episode's start
        for t in range(len(a)):
            at = P + t - dropped  # the answer token's column in the cut row
            want = float(lp[at - 1, row[at]]) if at >= 1 else 0.0  # a token with nothing kept before it counts 0
            assert float(logp[b, t]) == pytest.approx(want, abs=1e-4)
    fitted = fit_answer(prompt, answers[0], W)
    assert fitted[2] and fitted[0] + fitted[1] == (prompt + answers[0])[-W:]
    assert response_loglik(lm, [prompt], [answers[1]], tok.pad_token_id).shape == (1,)  # fits: no warning


class _Plain(torch.nn.Module):
    """The model behind a wrapper that packing does not look into: the padded forward pass."""

    def __init__(self, lm):
        super().__init__()
        self.module = lm

    def forward(self, **kw):
        return self.module(**kw)


def test_eval_says_how_many_answers_the_judge_cut():
    from cherrytop.eval.evaluate import summary
    lines = summary({"checkpoint": "ppo", "judge": {"checkpoint": "rm", "mean_reward": 0.5, "answers_cut": 2, "window": W}})
    assert f"judge: 2 answers longer than its context window of {W} tokens were scored on their last {W} tokens" in lines
