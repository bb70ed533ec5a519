"""The padding-free PPO passes (rollout.packing, rollout.episodes) against the plain padded forward passes: same
log-probs, values, rewards and gradients; and the sampler's fast draws and entropies against
plain references."""

import pytest
import torch

from cherrytop.config import ModelConfig
from cherrytop.losses import entropy_from_logits, token_logprobs
from cherrytop.model.heads import BIAS_KEY, token_scores
from cherrytop.model.load import build_model
from cherrytop.rollout import packing
from cherrytop.rollout.episodes import (response_logits, response_logp, response_pack, response_scores, response_values,
                                         reward)
from cherrytop.rollout.sampler import _draw, left_pad, sample

EOS, PAD, V = 1, 0, 40


def episodes(model, n=12, new=10, seed=0):
    """A sampled batch laid out as PPO has it: left-padded prompts + responses (attn 0 after EOS)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 14, (n,), generator=g)]
    ids_p, mask_p = left_pad(prompts, PAD)
    s = sample(model, ids_p, mask_p, max_new_tokens=new, eos_id=EOS, pad_id=PAD, temperature=1.5, generator=g)
    ids = torch.cat([ids_p, s.tokens], 1)
    attn = torch.cat([mask_p, s.mask], 1)
    return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), ids_p.shape[1], s


def tiny(arch, seed=3):
    cfg = ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64)
    return build_model(cfg, V, PAD, EOS, seed=seed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_logprobs_and_gradients_equal_the_padded_pass(arch):
    model = tiny(arch)
    ids, attn, pos, P, s = episodes(model.eval())
    assert not s.has_eos.all() and s.has_eos.any()  # both kinds of rows are covered
    mask = s.mask.float()
    pk = packing.pack(ids, attn)
    assert pk.input_ids.shape[0] < ids.shape[0]  # several episodes share a row
    assert pk.input_ids.numel() < ids.numel()

    def padded():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1: -1]
        return token_logprobs(logits, ids[:, P:])

    def packed():
        return token_logprobs(response_logits(model, pk, P, ids.shape[1] - P), ids[:, P:])

    grads = []
    for fn in (padded, packed):
        model.zero_grad()
        logp = fn()
        (logp * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if fn is padded:
            ref = logp.detach()
    torch.testing.assert_close(logp.detach() * mask, ref * mask, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_values_and_rewards_equal_the_padded_pass(tmp_path):
    from cherrytop.model.heads import scalar_model_from
    lm = tiny("llama")
    lm.save_pretrained(tmp_path)
    head = scalar_model_from(tmp_path, PAD).eval()
    setattr(head.config, BIAS_KEY, 0.25)
    ids, attn, pos, P, s = episodes(lm.eval(), seed=1)
    pk = packing.pack(ids, attn)
    with torch.no_grad():
        values = token_scores(head, ids, attn, pos)[:, P - 1: -1]
        torch.testing.assert_close(response_scores(head, pk, P, ids.shape[1] - P) * s.mask, values * s.mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reward(head, ids, attn, packed=True), reward(head, ids, attn, pos), atol=1e-5, rtol=1e-5)


def gqa_llama(seed=5):
    """A Llama with grouped-query attention, biases and a rope_theta the test models don't have, and
    weights large enough (initializer_range 0.2) that attention is far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, max_position_embeddings=64, rope_theta=500.0,
                      pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def lora_llama():
    """The tiny Llama with LoRA adapters on every projection (transformers' add_adapter, as lora.attach
    does), their B matrices made non-zero so the adapters change every layer's output."""
    from peft import LoraConfig
    model = tiny("llama")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"]))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return model


@pytest.mark.parametrize("make", [lambda: tiny("llama"), gqa_llama, lora_llama, lambda: tiny("gpt2")])
def test_hidden_at_equals_the_full_trunk_at_those_positions_with_gradients(make):
    """hidden_at runs a Llama's last layer only at the asked positions (and, on a Llama, every other
    layer on the real tokens alone): same states and gradients as the full packed trunk indexed there
    (any real-token positions, repeated ones included; a pad's output is no token's and is never asked
    for — through the RMSNorm of its all-zero state its gradient is ~1e9 on the padded path). In float64,
    where the two paths agree to ~1e-13: in float32 each differs from the float64 gradients by ~1e-5 of
    their scale, by an amount that depends on the CPU's kernels (AVX-512 and AVX2 round differently)."""
    model = make().double().train()
    ids, attn, pos, P, _ = episodes(model.eval(), seed=6)
    model.train()
    pk = packing.pack(ids, attn)
    R, L = pk.input_ids.shape
    g = torch.Generator().manual_seed(0)
    real = packing.real_index(pk)
    flat = real[torch.randint(0, real.shape[0], (7, 5), generator=g)]  # real tokens' positions
    flat[0, :2] = real[3]  # a repeated position
    rows, cols = flat // L, flat % L
    w = torch.randn(7, 5, model.config.hidden_size, generator=g, dtype=torch.float64)
    out = []
    for fn in (lambda: packing.hidden_states(model, pk)[rows, cols], lambda: packing.hidden_at(model, pk, rows, cols)):
        model.zero_grad()
        h = fn()
        (h * w).sum().backward()
        out.append((h.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]))
    (h0, g0), (h1, g1) = out
    assert h1.shape == (7, 5, model.config.hidden_size)
    torch.testing.assert_close(h1, h0, atol=1e-10, rtol=1e-10)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make", [lambda: tiny("llama"), gqa_llama])
def test_response_pack_without_last_tokens_gives_the_same_logprobs_and_values(make, tmp_path):
    """Leaving out each episode's last token (response_pack) changes no log-prob or value that is read;
    both against the plain padded forward pass."""
    from cherrytop.model.heads import scalar_model_from
    model = make().eval()
    model.save_pretrained(tmp_path)
    head = scalar_model_from(tmp_path, PAD).eval()
    ids, attn, pos, P, s = episodes(model, seed=7)
    pk = response_pack(ids, attn)
    assert torch.equal(pk.length, attn.sum(1) - 1)
    m = s.mask.float()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1: -1]
        values = token_scores(head, ids, attn, pos)[:, P - 1: -1]
        logp, ent = response_logp(model, ids, attn, pos, P, 1.0, with_entropy=True, pk=pk)
        torch.testing.assert_close(logp * m, token_logprobs(logits, ids[:, P:]) * m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent * m, entropy_from_logits(logits) * m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(response_values(head, ids, attn, pos, P, pk=pk) * m, values * m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reward(head, ids, attn, packed=True), reward(head, ids, attn, pos),
                                   atol=1e-5, rtol=1e-5)


def test_pack_keeps_each_episode_whole_with_its_own_positions_and_mask():
    lm = tiny("llama")
    ids, attn, pos, P, _ = episodes(lm.eval(), n=9, seed=2)
    pk = packing.pack(ids, attn)
    R, L = pk.input_ids.shape
    seen = torch.zeros(R, L, dtype=torch.bool)
    for b in range(ids.shape[0]):
        real = ids[b][attn[b].bool()]
        n = len(real)
        r, o = int(pk.row[b]), int(pk.offset[b])
        assert torch.equal(pk.input_ids[r, o: o + n], real)
        assert torch.equal(pk.position_ids[r, o: o + n], torch.arange(n))
        assert not seen[r, o: o + n].any()  # no two sequences share a position
        seen[r, o: o + n] = True
        block = pk.mask[r, 0, o: o + n]  # the sequence's queries see exactly its own earlier tokens
        assert torch.equal(block[:, o: o + n], torch.ones(n, n, dtype=torch.bool).tril())
        assert int(block.sum()) == n * (n + 1) // 2
    assert int(seen.sum()) == int(attn.sum())
    lengths = attn.sum(1)
    # nothing else is visible: each sequence's triangle, and each pad sees only itself
    assert int(pk.mask.sum()) == int((lengths * (lengths + 1) // 2).sum()) + (R * L - int(lengths.sum()))


def test_sampler_logprobs_and_entropy_match_a_full_forward():
    model = tiny("llama").eval()
    ids, attn, pos, P, s = episodes(model, seed=4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1: -1] / 1.5
    m = s.mask.float()
    torch.testing.assert_close(s.logprobs * m, token_logprobs(logits, s.tokens) * m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.entropy * m, entropy_from_logits(logits) * m, atol=1e-4, rtol=1e-4)


def test_draw_samples_the_categorical_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 40000
    tok = _draw(probs.expand(n, -1) * 3.0, g)  # unnormalised is fine
    freq = torch.bincount(tok, minlength=6).float() / n
    assert freq[1] == 0 and freq[5] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_ppo_rollout_keeps_the_samplers_greedy_tokens_and_log_probs(tmp_path):
    """PPO's rollout takes log π_old from the sampler (no second policy pass) and scores ref / value /
    reward padding-free: at temperature ~0 its tokens are the greedy ones, and its old and reference
    log-probs equal the plain padded full pass's."""
    from cherrytop.config import PPOConfig
    from cherrytop.model.heads import scalar_model_from
    from cherrytop.stages.ppo import rollout

    class Tok:
        pad_token_id, eos_token_id = PAD, EOS
    policy = tiny("llama").eval()
    policy.save_pretrained(tmp_path)
    value = scalar_model_from(tmp_path, PAD).eval()
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9], [10], [11, 12]]
    ids_p, mask_p = left_pad(prompts, PAD)
    greedy = sample(policy, ids_p, mask_p, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.0)
    p = PPOConfig(max_new_tokens=6, temperature=1e-3, batch_size=4, minibatch_size=4, micro_batch_size=4)
    batch, _ = rollout(policy, policy, lambda ids, attn, pos, P: attn[:, P:].sum(1).float(), value, Tok, prompts, 0.1, p,
                       torch.Generator().manual_seed(0))
    P, n = ids_p.shape[1], greedy.tokens.shape[1]
    assert torch.equal(batch.ids[:, P: P + n] * greedy.mask, greedy.tokens * greedy.mask)
    with torch.no_grad():
        logits = policy(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.pos).logits[:, P - 1: -1]
        values = token_scores(value, batch.ids, batch.attn, batch.pos)[:, P - 1: -1]
    ref = token_logprobs(logits, batch.ids[:, P:], temperature=1e-3) * batch.mask
    torch.testing.assert_close(batch.old_logp, ref, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(batch.ref_logp, ref, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(batch.old_values, values * batch.mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_free_lm_step_equals_the_padded_loss_and_gradients(arch):
    from cherrytop.data.collate import pad_batch
    from cherrytop.losses import lm_loss
    from cherrytop.train.lm import lm_count, lm_step
    model = tiny(arch, seed=7)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, k in ((9, 4), (23, 10), (5, 2), (14, 14), (30, 3)):  # (length, assistant tokens at the end): 46 % padding
        ids = torch.randint(2, V, (n,), generator=g).tolist()
        examples.append((ids, [-100] * (n - k) + ids[n - k:]))
    batch = pad_batch(examples, PAD)
    assert packing.worth_packing(batch["attention_mask"])
    results = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            s, c = lm_step(model, batch)
        else:
            s, c = lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        s.backward()
        results.append((s.detach(), int(c), [p.grad.clone() for p in model.parameters()]))
    (s0, c0, g0), (s1, c1, g1) = results
    assert c0 == c1 == lm_count(batch)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_wrapped_or_softcapped_models_take_the_padded_path():
    model = tiny("llama")

    class Wrapper(torch.nn.Module):  # DDP, peft and LoRA reference views look like this to packing
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):
            return self.inner(**kw)
    assert packing.supports_packing(model)
    assert not packing.supports_packing(Wrapper(model))
    model.config.final_logit_softcapping = 30.0
    assert not packing.supports_packing(model)
    # the padded path gives the same numbers
    ids, attn, pos, P, s = episodes(tiny("llama").eval(), seed=5)
    plain = tiny("llama").eval()
    with torch.no_grad():
        a = response_logp(plain, ids, attn, pos, P, 1.0)
        b = response_logp(Wrapper(plain), ids, attn, pos, P, 1.0)
    torch.testing.assert_close(a * s.mask, b * s.mask, atol=1e-5, rtol=1e-5)
