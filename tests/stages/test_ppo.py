"""PPO on a programmatic reward: the reward rises while the KL to the reference stays bounded."""

import copy

import torch

from cherrytop.config import ModelConfig, PPOConfig
from cherrytop.model.heads import scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.stages.ppo import rollout, update

V, PAD, EOS, TARGET = 24, 0, 1, 7


class Tok:
    pad_token_id, eos_token_id = PAD, EOS


def test_ppo_raises_a_programmatic_reward_with_bounded_kl(tmp_path):
    torch.manual_seed(0)
    policy = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(tmp_path / "init")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = scalar_model_from(tmp_path / "init", PAD)
    p = PPOConfig(batch_size=32, minibatch_size=16, micro_batch_size=8, ppo_epochs=4, lr=1e-2, value_lr=1e-2,
                  kl_coef=0.05, max_new_tokens=8, no_eos_penalty=0.0)
    opt_pi = torch.optim.AdamW(policy.parameters(), lr=p.lr, eps=1e-5)
    opt_v = torch.optim.AdamW(value.parameters(), lr=p.value_lr, eps=1e-5)

    def count_target(ids, attn, pos, P):  # reward = how often TARGET appears in the response
        return ((ids[:, P:] == TARGET) & (attn[:, P:] == 1)).sum(1).float()

    gen = torch.Generator().manual_seed(0)
    prompts = [[2 + (i % 5), 3 + (i % 7), 4] for i in range(32)]
    history = []
    for it in range(15):
        batch, stats = rollout(policy, ref, count_target, value, Tok, prompts, p.kl_coef, p, gen)
        stats.update(update(policy, value, opt_pi, opt_v, batch, p, None, it, 0))
        history.append(stats)
    first, last = history[0], history[-1]
    assert last["objective/score"] > first["objective/score"] + 1.0, (first["objective/score"], last["objective/score"])
    assert 0 < last["objective/kl"] < 20  # the KL penalty keeps the policy near the reference
    assert all(0 <= h["policy/clipfrac"] <= 1 for h in history)
