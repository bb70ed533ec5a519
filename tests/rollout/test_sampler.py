"""The KV-cache sampler against Hugging Face `generate` and against a full forward pass."""

import pytest
import torch

from cherrytop.config import ModelConfig
from cherrytop.losses import token_logprobs
from cherrytop.model.load import build_model
from cherrytop.rollout.sampler import left_pad, sample

EOS, PAD = 1, 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_matches_hf_generate(arch):
    model = build_model(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64),
                        vocab_size=50, pad_id=PAD, eos_id=EOS, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 50, (n,), generator=g).tolist() for n in (3, 7, 5)]
    ids, mask = left_pad(prompts, PAD)
    ours = sample(model, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.0)
    for b, p in enumerate(prompts):  # HF generate one prompt at a time (no padding at all)
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                             max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)[0, len(p):].tolist()
        n = int(ours.mask[b].sum())
        assert ours.tokens[b, :n].tolist() == ref[:n]



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_on_a_left_padded_batch_matches_hf_generate_on_it(arch):
    """The same batch through HF generate (left-padded as ours): the same tokens and EOS flags, for
    prompts of 1 to 13 tokens."""
    model = build_model(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64),
                        vocab_size=50, pad_id=PAD, eos_id=EOS, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 50, (n,), generator=g).tolist() for n in (9, 2, 5, 13, 1)]
    ids, mask = left_pad(prompts, PAD)
    ours = sample(model, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=EOS,
                            pad_token_id=PAD)[:, ids.shape[1]:]
    assert len({tuple(r) for r in ours.tokens.tolist()}) > 1  # not one degenerate answer for all
    for b in range(len(prompts)):
        n = int(ours.mask[b].sum())
        assert ours.tokens[b, :n].tolist() == hf[b, :n].tolist()
        assert bool(ours.has_eos[b]) == (EOS in hf[b].tolist())


def test_sampled_logprobs_match_full_forward():
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), 40, PAD, EOS, seed=2).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    ids, mask = left_pad(prompts, PAD)
    s = sample(model, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.7,
               generator=torch.Generator().manual_seed(3))
    full = torch.cat([ids, s.tokens], 1)
    attn = torch.cat([mask, torch.ones_like(s.tokens)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attn, position_ids=pos).logits
    P = ids.shape[1]
    ref = token_logprobs(logits[:, P - 1: -1], s.tokens, temperature=0.7)
    torch.testing.assert_close(s.logprobs * s.mask, ref * s.mask, atol=1e-4, rtol=1e-4)
    # after EOS the mask is 0 and tokens are padding
    for b in range(2):
        if s.has_eos[b]:
            n = int(s.mask[b].sum())
            assert s.tokens[b, n - 1] == EOS and (s.tokens[b, n:] == PAD).all()


def test_top_p_keeps_only_the_nucleus():
    from cherrytop.rollout.sampler import _filter_top_p
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_top_p(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_prefill_equals_the_padded_prompt_pass(arch):
    """The sampler's padding-free prefill gives the padded pass's last-position logits and the same
    keys and values at every real prompt column of the cache."""
    from transformers import DynamicCache
    from cherrytop.rollout.sampler import _prefill
    model = build_model(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64),
                        vocab_size=50, pad_id=PAD, eos_id=EOS, seed=4).eval()
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(8.0)  # attention far from uniform
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, 50, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 9, 2)]
        ids, mask = left_pad(prompts, PAD)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours, plain = DynamicCache(), DynamicCache()
        logits = _prefill(model, ids, mask, mask, pos, ours)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=plain, use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, ref.float(), atol=1e-4, rtol=1e-4)
        real = mask.bool()
        for a, b in zip(ours.layers, plain.layers):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):  # (B, H, P, hd)
                assert x.shape == y.shape
                torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-4, rtol=1e-4)


def test_all_stopped_keeps_decoding_padding_until_every_process_has_stopped():
    """`all_stopped` (FSDP: every process makes as many forward passes): rows that have stopped stay
    stopped, the samples are those of a plain run, followed by padding up to when all processes stop."""
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), 40, PAD, EOS, seed=2).eval()
    with torch.no_grad():  # EOS likely: the rows stop before the budget
        model.lm_head.weight[EOS] += 3 * model.lm_head.weight.norm(dim=1).max()
    ids, mask = left_pad([[5, 6, 7], [8, 9]], PAD)
    kw = dict(max_new_tokens=16, eos_id=EOS, pad_id=PAD, temperature=1.0)
    plain = sample(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    n = plain.mask.shape[1]
    assert plain.has_eos.all() and n + 3 < 16
    calls = []

    def others_stop_later(stopped: bool) -> bool:  # another process still has rows alive until step n + 3
        calls.append(stopped)
        return stopped and len(calls) >= n + 3
    synced = sample(model, ids, mask, generator=torch.Generator().manual_seed(0), all_stopped=others_stop_later, **kw)
    assert synced.tokens.shape[1] == n + 3 == len(calls) and calls[n - 1:] == [True] * 4 and not any(calls[: n - 1])
    for f in ("tokens", "logprobs", "mask", "entropy"):
        torch.testing.assert_close(getattr(synced, f)[:, :n], getattr(plain, f), rtol=0, atol=0)
    assert (synced.tokens[:, n:] == PAD).all() and not synced.mask[:, n:].any() and not synced.logprobs[:, n:].any()
    assert torch.equal(synced.has_eos, plain.has_eos)


def _stopping_model():
    """A model over 6 tokens: EOS is drawn often enough that every row stops well before the budget."""
    return build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), 6, PAD, EOS, seed=4).eval()


def test_a_deferred_stop_check_gives_the_same_samples(monkeypatch):
    """On a GPU the sampler reads "every row has stopped" one step late (no host stall per token); it
    runs one all-padding step more and drops it. Forced on CPU, the samples are the immediate check's."""
    import cherrytop.rollout.sampler as S
    model = _stopping_model()
    ids, mask = left_pad([[2, 3, 4], [5, 2], [3, 3, 3, 4], [4]], PAD)

    def draw():
        return sample(model, ids, mask, max_new_tokens=40, eos_id=EOS, pad_id=PAD, temperature=1.0,
                      generator=torch.Generator().manual_seed(5))
    now = draw()
    assert now.has_eos.all() and now.tokens.shape[1] < 40  # every row stopped early: the exit is tested
    steps = []

    class Deferred(S.StopCheck):
        def __init__(self, device, deferred=None):
            super().__init__(device, deferred=True)

        def __call__(self, alive):
            steps.append(bool(alive.any()))
            return super().__call__(alive)
    monkeypatch.setattr(S, "StopCheck", Deferred)
    late = draw()
    assert len(steps) == now.tokens.shape[1] + 1  # one decoding step more than the immediate check
    for f in ("tokens", "logprobs", "mask", "has_eos", "entropy"):
        assert torch.equal(getattr(now, f), getattr(late, f)), f


def test_under_autocast_the_cache_is_preallocated_in_the_autocast_dtype(monkeypatch):
    """bf16 autocast: keys (float32 after the rotary) and values (bf16) are stored in one bf16
    preallocated cache; the samples are those of the cache that keeps the float32 keys (a DynamicCache),
    up to the rounding of a different attention length in bf16."""
    import cherrytop.rollout.sampler as S
    from transformers import DynamicCache
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), 40, PAD, EOS, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 7, 5, 9)], PAD)
    made = []

    def draw():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(model, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.8,
                          generator=torch.Generator().manual_seed(1))
    cache = S._cache
    monkeypatch.setattr(S, "_cache", lambda *a, **k: made.append(cache(*a, **k)) or made[-1])
    static = draw()
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in made[0].layers)
    monkeypatch.setattr(S, "_cache", lambda *a, **k: DynamicCache())
    dynamic = draw()
    assert torch.equal(static.tokens, dynamic.tokens)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_compiled_decoding_step_gives_the_same_tokens_and_compiles_once(bf16):
    """`compiled=True` (transformers' torch.compile'd call; inductor on CPU, CUDA graphs on a GPU): the
    greedy tokens of the eager path and its log-probs up to rounding; prompts of another length reuse
    the compiled step (they are padded to a multiple of 64), so nothing compiles again. `bf16`: under
    bf16 autocast, as PPO's rollout runs on a GPU (the one-dtype cache; log-probs up to bf16 rounding
    of attention over another number of padded keys)."""
    import contextlib

    import torch._dynamo
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=160), 40, PAD, EOS, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    batches = [left_pad([torch.randint(2, 40, (n,), generator=g).tolist() for n in lengths], PAD)
               for lengths in ((3, 7, 5), (11, 2, 6))]
    torch._dynamo.reset()
    caches = []
    for i, (ids, mask) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            eager = sample(model, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                fast = sample(model, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0, compiled=True)
        caches.append(model._decode_cache[1])
        assert torch.equal(fast.prompt_ids, ids) and torch.equal(fast.tokens, eager.tokens)
        torch.testing.assert_close(fast.logprobs, eager.logprobs, atol=1e-2 if bf16 else 1e-5, rtol=1e-5)
    assert caches[0] is caches[1]  # the second batch decoded on the first one's cache, zeroed
    assert all(layer.keys.dtype == (torch.bfloat16 if bf16 else torch.float32) for layer in caches[0].layers)
