"""PPO as a practitioner sets it up: out-of-range settings are one-line config errors, a reward model of
another tokenizer is refused, and the logged KL, entropy, clipfrac, approx-KL and PPO-ptx mix are the
numbers a hand computation on a tiny batch gives."""

import copy

import pytest
import torch

from cherrytop import losses as L
from cherrytop.config import ConfigError, ModelConfig, PPOConfig, load_config
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.model.heads import scalar_model_from
from cherrytop.model.load import CheckpointError, build_model
from cherrytop.stages import ppo
from cherrytop.stages.ppo import Rollout, rollout, update

V, PAD, EOS = 24, 0, 1


class Tok:
    pad_token_id, eos_token_id = PAD, EOS


@pytest.mark.parametrize("over,match", [
    (["--ppo.ppo_epochs=0"], "ppo.ppo_epochs: expected a whole number >= 1, got 0"),  # trained nothing, silently
    (["--ppo.minibatch_size=0"], "ppo.minibatch_size: expected a whole number >= 1"),  # ZeroDivisionError
    (["--ppo.micro_batch_size=0"], "ppo.micro_batch_size: expected a whole number >= 1"),
    (["--ppo.batch_size=0"], "ppo.batch_size: expected a whole number >= 1"),
    (["--ppo.temperature=0"], "ppo.temperature: expected a temperature > 0"),  # non-finite gradient at iteration 1
    (["--ppo.temperature=-0.7"], "ppo.temperature: expected a temperature > 0"),  # log-probs of the flipped distribution
    (["--ppo.max_new_tokens=0"], "ppo.max_new_tokens: expected a whole number >= 1, got 0"),  # crashed in packing
    (["--ppo.gamma=1.5"], r"ppo.gamma: expected a number in \[0, 1\], got 1.5"),
    (["--ppo.lam=-0.1"], r"ppo.lam: expected a number in \[0, 1\], got -0.1"),
    (["--ppo.kl_target=-1"], "ppo.kl_target: expected a number >= 0"),
    (["--ppo.kl_target=6", "--ppo.kl_horizon=0"], "ppo.kl_horizon: expected a whole number >= 1"),  # ZeroDivisionError
    (["--ppo.kl_coef=-0.1"], "ppo.kl_coef: expected a number >= 0"),
    (["--ppo.kl_target=6", "--ppo.kl_coef=0"], r"ppo.kl_coef: expected a starting β > 0 with the adaptive KL target"),
    (["--ppo.clip=0"], "ppo.clip: expected a number > 0"),
    (["--ppo.value_clip=-1"], "ppo.value_clip: expected a number > 0"),
    (["--ppo.vf_coef=-1"], "ppo.vf_coef: expected a number >= 0"),
    (["--ppo.ptx_coef=-1"], "ppo.ptx_coef: expected a number >= 0"),
    (["--ppo.ptx_coef=1", "--ppo.ptx_batch_size=0"], "ppo.ptx_batch_size: expected a whole number >= 1"),
    (["--ppo.save_every=0"], "ppo.save_every: expected a whole number >= 1"),  # ZeroDivisionError after iteration 1
    (["--ppo.grad_clip=0"], "ppo.grad_clip: expected a number > 0"),
    (["--ppo.lr=nan"], "ppo.lr: expected a number >= 0, got nan"),
    (["--sample.temperature=-1"], r"sample.temperature: expected a number >= 0 \(0 = greedy\)"),  # silently greedy
    (["--sample.max_new_tokens=0"], "sample.max_new_tokens: expected a whole number >= 1"),
    (["--sample.batch_size=0"], "sample.batch_size: expected a whole number >= 1"),  # "range() arg 3 must not be zero"
    (["--eval.batch_size=0"], "eval.batch_size: expected a whole number >= 1"),
    (["--eval.max_new_tokens=0"], "eval.max_new_tokens: expected a whole number >= 1"),
])
def test_out_of_range_ppo_and_decoding_settings_are_one_line_config_errors(over, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("test", [], over)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over", [[], ["--ppo.kl_target=0"], ["--ppo.kl_target=6"], ["--ppo.gamma=0", "--ppo.lam=1"],
                                  ["--ppo.lr=0"], ["--sample.temperature=0"], ["--ppo.ema=0"],
                                  ["--ppo.kl_coef=0"]])
def test_edge_values_that_mean_something_are_accepted(over):
    load_config("test", [], over)
    load_config("tiny", [], over)


def test_max_new_tokens_that_fill_the_context_window_name_the_setting_not_a_negative_prompt_length():
    cfg = load_config("test", [], ["--ppo.max_new_tokens=5000"])
    with pytest.raises(ValueError, match=r"ppo.max_new_tokens \(5000\) leaves no room for a prompt in the policy's "
                                         r"context window of 192 tokens") as e:
        ppo.encode_prompts(cfg, None, 192)
    assert "-4808" not in str(e.value)


def _policy_and_rm(folder, tok, seed=0):
    """A tiny policy with `tok`'s vocabulary, saved with it, and a reward model (scalar head) from it."""
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=64), len(tok),
                        tok.pad_token_id, tok.eos_token_id, seed=seed)
    model.save_pretrained(folder / "sft")
    tok.save_pretrained(folder / "sft")
    rm = scalar_model_from(folder / "sft", tok.pad_token_id)
    rm.save_pretrained(folder / "rm")
    tok.save_pretrained(folder / "rm")


def test_a_reward_model_of_another_tokenizer_is_refused_before_training(tmp_path):
    """The policy's vocabulary is a prefix of the reward model's (same corpus, more merges): before, PPO
    trained against the reward model's reading of other tokens, without a word."""
    texts = [f"the {w} of {v} is {n} ." for w in ("cat", "dog", "river", "hill", "town") for v in ("ann", "bo", "cy")
             for n in range(12)]
    small, big = train_tokenizer(texts, 280, min_frequency=1), train_tokenizer(texts, 300, min_frequency=1)
    assert len(small) < len(big)
    _policy_and_rm(tmp_path / "a", small)
    _policy_and_rm(tmp_path / "b", big)
    cfg = load_config("test", [], [f"--run.out_dir={tmp_path}", "--ppo.episodes=16", "--ppo.batch_size=16",
                                   f"--ppo.init={tmp_path / 'a' / 'sft'}", f"--ppo.reward_model={tmp_path / 'b' / 'rm'}"])
    with pytest.raises(CheckpointError, match=r"has another tokenizer than the policy .*vocabularies of "
                                              rf"{len(small)} and {len(big)} tokens"):
        ppo.run(cfg)
    assert not (tmp_path / "test" / "ppo").exists()
    ppo.check_reward_tokenizer(small, tmp_path / "a" / "sft", tmp_path / "a" / "rm")  # its own reward model: fine


def _setup(tmp_path, T=0.7):
    policy = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(tmp_path / "init")
    ref = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS,
                      seed=5).eval().requires_grad_(False)
    value = scalar_model_from(tmp_path / "init", PAD)
    return policy, ref, value


def _hand_logp(model, b: Rollout, T: float) -> torch.Tensor:
    """(B, N, V) float64 log-softmax(logits / T) at the positions that predict the response, one plain padded pass."""
    P = b.ids.shape[1] - b.mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=b.ids, attention_mask=b.attn, position_ids=b.pos).logits[:, P - 1: -1].double()
    return torch.log_softmax(logits / T, -1)


def test_logged_kl_entropy_clipfrac_and_approx_kl_match_a_hand_computation(tmp_path):
    """On 8 episodes of different lengths split in micro-batches of 4: the rollout's KL (Σ_t over each
    response of log π − log π_ref at temperature T, mean over responses) and entropy (token mean), and the
    update's clipfrac and approx-KL as token means over the minibatch. Before, the update logged the
    plain mean of the micro-batches' own means, which over-weights the shorter responses."""
    T = 0.7
    policy, ref, value = _setup(tmp_path, T)
    p = PPOConfig(batch_size=8, minibatch_size=8, micro_batch_size=4, ppo_epochs=1, max_new_tokens=6, temperature=T,
                  lr=0.0, value_lr=0.0, grad_clip=1e9)
    prompts = [[2 + i, 3, 4][: 1 + i % 3] for i in range(8)]
    batch, stats = rollout(policy, ref, lambda ids, attn, pos, P: torch.zeros(ids.shape[0]), value, Tok, prompts, 0.1,
                           p, torch.Generator().manual_seed(3))
    m = batch.mask.bool()
    lengths = batch.mask.sum(1)
    assert lengths[:4].sum() != lengths[4:].sum()  # micro-batches of unequal token counts
    P = batch.ids.shape[1] - batch.mask.shape[1]
    a, r = _hand_logp(policy, batch, T), _hand_logp(ref, batch, T)
    at = batch.ids[:, P:, None]
    la, lr_ = a.gather(-1, at)[..., 0], r.gather(-1, at)[..., 0]
    assert stats["objective/kl"] == pytest.approx(float(((la - lr_) * batch.mask).sum(1).mean()), abs=1e-5)
    assert stats["objective/entropy"] == pytest.approx(float((-(a.exp() * a).sum(-1))[m].mean()), abs=1e-5)
    assert stats["rollout/length"] == pytest.approx(float(lengths.mean()))

    # the update on a batch whose π_old is the policy's own log-probs shifted by known noise (lr 0: the policy stays)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch.mask.shape, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(batch.mask.shape, generator=g) * batch.mask
    old = ((la + noise) * batch.mask).float()
    b2 = Rollout(batch.ids, batch.attn, batch.pos, batch.mask, old, batch.ref_logp, batch.old_values, adv, batch.returns)
    st = update(policy, value, torch.optim.AdamW(policy.parameters(), lr=0.0), torch.optim.AdamW(value.parameters(), lr=0.0),
                b2, p, None, 0, 0)
    ratio = torch.exp(-noise)  # π / π_old
    clipped = ((adv > 0) & (ratio > 1 + p.clip)) | ((adv < 0) & (ratio < 1 - p.clip))
    assert 0 < float(clipped[m].double().mean()) < 1
    assert st["policy/clipfrac"] == pytest.approx(float(clipped[m].double().mean()), abs=1e-6)
    assert st["policy/approx_kl"] == pytest.approx(float((0.5 * noise[m] ** 2).mean()), abs=1e-5)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - p.clip, 1 + p.clip))
    assert st["loss/policy"] == pytest.approx(float(pg[m].mean()), abs=1e-5)


class Recorder:
    """An optimizer that keeps each step's gradients and changes nothing."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([q.grad.clone() for q in self.params])

    def zero_grad(self, set_to_none=True):
        for q in self.params:
            q.grad = None


def test_ppo_ptx_mixes_gamma_times_the_pretraining_loss_into_the_policy_step_and_logs_it(tmp_path):
    """[IG eq. 2]: the policy's gradient is that of the clipped surrogate plus γ · the mean LM loss of
    the step's pretraining windows, and `loss/ptx` is that LM loss (nats per token)."""
    gamma, T = 2.5, 1.0
    policy, ref, value = _setup(tmp_path, T)
    p = PPOConfig(batch_size=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1, max_new_tokens=5, temperature=T,
                  ptx_coef=gamma, ptx_batch_size=3, grad_clip=1e9)
    batch, _ = rollout(policy, ref, lambda ids, attn, pos, P: torch.ones(ids.shape[0]), value, Tok,
                       [[2, 3, 4], [5, 6], [7], [8, 9, 10, 11]], 0.1, p, torch.Generator().manual_seed(0))
    windows = torch.randint(2, V, (3, 10), generator=torch.Generator().manual_seed(2))  # all 3 are the step's
    opt_pi = Recorder(policy.parameters())
    st = update(policy, value, opt_pi, Recorder(value.parameters()), batch, p, windows, 0, 0)
    assert len(opt_pi.grads) == 1

    hand = copy.deepcopy(policy)
    P = batch.ids.shape[1] - batch.mask.shape[1]
    logits = hand(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.pos).logits[:, P - 1: -1]
    logp = torch.log_softmax(logits.double() / T, -1).gather(-1, batch.ids[:, P:, None])[..., 0]
    pg, _ = L.ppo_policy_loss(logp, batch.old_logp.double(), batch.advantages.double(), batch.mask, p.clip)
    lm = torch.nn.functional.cross_entropy(hand(input_ids=windows).logits[:, :-1].reshape(-1, V).double(),
                                           windows[:, 1:].reshape(-1))
    (pg + gamma * lm).backward()
    assert st["loss/ptx"] == pytest.approx(float(lm.detach()), abs=1e-5)
    for got, q in zip(opt_pi.grads[0], hand.parameters()):
        torch.testing.assert_close(got, q.grad, atol=2e-5, rtol=1e-4)
