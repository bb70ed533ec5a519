"""PPO on a programmatic reward: the reward rises while the KL to the reference stays bounded."""

import copy
import math

import pytest
import torch

from cherrytop.config import ModelConfig, PPOConfig
from cherrytop.model.heads import KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, scalar_model_from
from cherrytop.model.load import CheckpointError, build_model
from cherrytop.stages.ppo import RefLogLik, WeightEMA, ref_loglik, rollout, update

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


@pytest.mark.parametrize("excess", [False, True])
def test_the_reward_models_loglik_term_comes_from_the_reference_pass(tmp_path, excess):
    """c · Σ log π_ref(y_t) (+ H_t) read off the rollout's reference pass equals running π_ref on the
    episodes, and `ref_loglik` shares the PPO reference only when it is π_ref at temperature 1."""
    policy = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(tmp_path / "sft")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = scalar_model_from(tmp_path / "sft", PAD)
    rm = scalar_model_from(tmp_path / "sft", PAD)
    setattr(rm.config, LOGLIK_KEY, 0.5)
    setattr(rm.config, REFERENCE_KEY, str(tmp_path / "sft"))
    setattr(rm.config, KIND_KEY, "excess" if excess else "sum")
    p = PPOConfig(batch_size=8, minibatch_size=8, micro_batch_size=8, max_new_tokens=6, temperature=1.0)
    prompts = [[2 + i, 3, 4] for i in range(8)]

    def zero(ids, attn, pos, P):
        return torch.zeros(ids.shape[0])
    shared = ref_loglik(rm, tmp_path / "sft", 1.0, ref)
    assert shared.coef == 0.5 and shared.model is None and shared.excess == excess
    assert ref_loglik(rm, tmp_path / "sft", 0.7, ref).model is ref  # another temperature: run π_ref at T = 1
    runs = []
    for term in (shared, RefLogLik(0.5, copy.deepcopy(ref), excess)):
        batch, stats = rollout(policy, ref, zero, value, Tok, prompts, 0.1, p, torch.Generator().manual_seed(3), term)
        runs.append((batch, stats))
        assert stats["objective/rm_score"] == pytest.approx(0.5 * stats["objective/ref_loglik"], abs=1e-6)
    assert runs[0][1]["objective/rm_score"] == pytest.approx(runs[1][1]["objective/rm_score"], abs=1e-5)
    b = runs[0][0]  # by hand: one plain forward pass of π_ref over the episodes
    P = b.ids.shape[1] - b.mask.shape[1]
    with torch.no_grad():
        logits = ref(input_ids=b.ids, attention_mask=b.attn, position_ids=b.pos).logits[:, P - 1: -1].double()
    lsm = torch.log_softmax(logits, -1)
    f = lsm.gather(-1, b.ids[:, P:, None])[..., 0] - (excess * (lsm.exp() * lsm).sum(-1))
    assert runs[0][1]["objective/ref_loglik"] == pytest.approx(float((f * b.mask).sum(1).mean()), abs=1e-4)
    build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=1) \
        .save_pretrained(tmp_path / "other")
    setattr(rm.config, REFERENCE_KEY, str(tmp_path / "other"))
    assert ref_loglik(rm, tmp_path / "sft", 1.0, ref).model is not None  # another π_ref: loaded and run
    setattr(rm.config, REFERENCE_KEY, str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="not a model folder"):
        ref_loglik(rm, tmp_path / "sft", 1.0, ref)


def test_weight_ema_matches_the_running_average_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema = WeightEMA(model, 0.9)
    assert set(ema.avg) == {"weight", "bias"}  # trainable weights only
    expected = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
            model.bias.sub_(0.5)
        ema.update()
        for n, q in model.named_parameters():
            if n in expected:
                expected[n] = 0.9 * expected[n] + 0.1 * q.detach()
    for n in expected:
        torch.testing.assert_close(ema.avg[n], expected[n])
    live = model.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(model.weight.detach(), expected["weight"])
    torch.testing.assert_close(model.weight.detach(), live)


def test_fused_adamw_takes_the_same_ppo_steps_as_the_default_one(tmp_path):
    """run() uses AdamW's fused kernel on CPU (_fused_adam); one PPO update with it ends at the same
    weights as with torch's default (foreach) AdamW."""
    from cherrytop.stages.ppo import _fused_adam
    torch.manual_seed(0)
    policy = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(tmp_path / "init")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = scalar_model_from(tmp_path / "init", PAD)
    assert _fused_adam(policy) and _fused_adam(value)
    p = PPOConfig(batch_size=16, minibatch_size=8, micro_batch_size=4, ppo_epochs=2, lr=1e-2, value_lr=1e-2, max_new_tokens=6)
    prompts = [[2 + (i % 5), 3 + (i % 7), 4] for i in range(16)]
    batch, _ = rollout(policy, ref, lambda ids, attn, pos, P: attn[:, P:].sum(1).float(), value, Tok, prompts, 0.1, p,
                       torch.Generator().manual_seed(0))
    ends = []
    for fused in (None, True):
        pi, v = copy.deepcopy(policy), copy.deepcopy(value)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.0, fused=fused) for m in (pi, v)]
        update(pi, v, *opts, batch, p, None, 0, 0)
        ends.append([q.detach().clone() for m in (pi, v) for q in m.parameters()])
    for a, b in zip(*ends):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(ends[0], [q for m in (policy, value) for q in m.parameters()]))


def test_bf16_runs_every_ppo_forward_pass_under_autocast(tmp_path, monkeypatch):
    """With `bf16` every model pass of a rollout (sampling, reference, value, reward model, the reward
    model's π_ref) and of an update (policy, value, ptx, the explained-variance pass) runs inside
    `lora.autocast`, here made to autocast on CPU (the real one acts on GPU only): their linear layers
    compute in bf16, the batch and losses stay float32 and the models still train. Without it no pass
    is autocast."""
    import contextlib

    from cherrytop.model import lora
    from cherrytop.stages.ppo import reward_score

    @contextlib.contextmanager
    def on_cpu(device, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            yield
    monkeypatch.setattr(lora, "autocast", on_cpu)
    policy = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    policy.save_pretrained(tmp_path / "init")
    ref, pi_ref = (copy.deepcopy(policy).eval().requires_grad_(False) for _ in range(2))
    value = scalar_model_from(tmp_path / "init", PAD)
    rm = scalar_model_from(tmp_path / "init", PAD).eval().requires_grad_(False)
    models = {"policy": policy, "reference": ref, "value": value, "reward": rm, "pi_ref": pi_ref}
    seen: dict[str, set] = {}
    for name, m in models.items():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, set()).add(out.dtype))
    p = PPOConfig(batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=1, lr=1e-2, value_lr=1e-2,
                  max_new_tokens=6, ptx_coef=0.5, ptx_batch_size=2)
    prompts = [[2 + (i % 5), 3 + (i % 7), 4] for i in range(8)]
    windows = torch.randint(2, V, (4, 10), generator=torch.Generator().manual_seed(1))
    for bf16 in (False, True):
        seen.clear()
        start = [q.detach().clone() for m in (policy, value) for q in m.parameters()]
        batch, stats = rollout(policy, ref, reward_score(rm), value, Tok, prompts, 0.1, p, torch.Generator().manual_seed(0),
                               RefLogLik(0.5, pi_ref), bf16=bf16)
        assert all(t.dtype in (torch.float32, torch.long) for t in vars(batch).values())
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (policy, value)]
        stats.update(update(policy, value, *opts, batch, p, windows, 0, 0, bf16=bf16))
        assert seen == {name: {torch.bfloat16 if bf16 else torch.float32} for name in models}
        assert all(math.isfinite(v) for v in stats.values()) and "loss/ptx" in stats
        moved = [not torch.equal(a, q) for a, q in zip(start, (q for m in (policy, value) for q in m.parameters()))]
        assert all(moved)


def test_frozen_dtype_is_bf16_on_gpu_and_fp32_on_cpu_by_default():
    from cherrytop.model.load import frozen_dtype
    assert frozen_dtype("auto", torch.device("cpu")) == torch.float32  # CPU numbers unchanged
    assert frozen_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert frozen_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert frozen_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    from cherrytop.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="frozen_dtype"):
        load_config("test", [], ["--dist.frozen_dtype=fp16"])


def _frozen_setup(tmp_path):
    """A policy folder `init`, another causal LM `piref` and a reward model whose c · log π_ref term
    (excess) reads `piref`: three frozen models for `frozen_models` to load."""
    for seed, name in ((0, "init"), (1, "piref")):
        build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS,
                    seed=seed).save_pretrained(tmp_path / name)
    torch.manual_seed(0)
    rm = scalar_model_from(tmp_path / "init", PAD)
    rm.config.update({LOGLIK_KEY: 0.5, REFERENCE_KEY: str(tmp_path / "piref"), KIND_KEY: "excess"})
    rm.save_pretrained(tmp_path / "rm")


def test_frozen_models_in_bf16_score_the_rollout_like_fp32(tmp_path):
    """`dist.frozen_dtype=bf16` (forced here on CPU): the reference, the reward model and the reward
    model's own π_ref hold bf16 weights and no gradients, the policy and value model stay fp32, and
    the rollout's reference log-probs, reward scores and log π_ref term are those of fp32 models up
    to bf16 rounding. bf16 keeps 8 significant bits (torch.finfo(bfloat16).eps = 2^-7), so after a
    few roundings per layer we allow 2 eps relative + 2 eps absolute (~0.07 on log-probs of ~-3.6,
    ~0.045 on scores of ~1.8; measured: 0.002 and 0.012), and require a difference (bf16 really ran).
    `auto` on CPU is fp32, bit for bit."""
    from cherrytop.config import load_config
    from cherrytop.model.load import load_model
    from cherrytop.stages.ppo import frozen_models, reward_score
    _frozen_setup(tmp_path)
    policy, value = load_model(tmp_path / "init"), scalar_model_from(tmp_path / "rm", PAD)
    p = PPOConfig(batch_size=16, minibatch_size=8, micro_batch_size=8, max_new_tokens=8, temperature=0.7)
    prompts = [[2 + (i % 5), 3 + (i % 7), 4] for i in range(16)]
    out = {}
    for setting in ("fp32", "auto", "bf16"):
        cfg = load_config("test", [], [f"--dist.frozen_dtype={setting}", "--ppo.temperature=0.7"])
        ref, rm, loglik = frozen_models(cfg, tmp_path / "init", tmp_path / "rm", PAD, policy, torch.device("cpu"))
        assert loglik.model is not None and loglik.model is not ref  # π_ref of its own: the third frozen model
        want = torch.bfloat16 if setting == "bf16" else torch.float32
        for m in (ref, rm, loglik.model):
            assert all(q.dtype == want and not q.requires_grad for q in m.parameters())
            assert not m.training
        batch, stats = rollout(policy, ref, reward_score(rm), value, Tok, prompts, 0.1, p,
                               torch.Generator().manual_seed(0), loglik)
        P = batch.ids.shape[1] - batch.mask.shape[1]
        with torch.no_grad():
            scores = reward_score(rm)(batch.ids, batch.attn, batch.pos, P)  # (B,)
            term = loglik(batch.ids, batch.attn, batch.pos, P, None, None, batch.mask)  # (B, N)
        out[setting] = (batch, scores, term)
        assert all(q.dtype == torch.float32 for m in (policy, value) for q in m.parameters())
        assert all(t.dtype in (torch.float32, torch.long) for t in vars(batch).values())
    (a, sa, fa), (b, sb, fb) = out["fp32"], out["bf16"]
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(out["auto"][0]).values()))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.old_logp, b.old_logp)  # the fp32 policy sampled both
    tol = dict(rtol=2 * torch.finfo(torch.bfloat16).eps, atol=2 * torch.finfo(torch.bfloat16).eps)
    torch.testing.assert_close(b.ref_logp, a.ref_logp, **tol)
    torch.testing.assert_close(sb, sa, **tol)
    torch.testing.assert_close(fb, fa, **tol)
    assert not torch.equal(b.ref_logp, a.ref_logp) and not torch.equal(sb, sa) and not torch.equal(fb, fa)


def ppo_inputs(tmp_path, prompts: list[str], n_layers: int) -> None:
    """What `cherrytop ppo` needs, made small under tmp_path: a policy `init` with its tokenizer, a
    reward model `rm` with a fresh head, and `prompts.jsonl`."""
    import json

    from cherrytop.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "no idea ."] * 20, 300)
    build_model(ModelConfig(n_layers=n_layers, d_model=32, n_heads=2, d_ff=64, max_seq_len=96), len(tok),
                tok.pad_token_id, tok.eos_token_id).save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    torch.manual_seed(0)
    scalar_model_from(tmp_path / "init", tok.pad_token_id).save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))


def test_ppo_run_gives_frozen_models_no_optimizer_state(tmp_path, monkeypatch):
    """`cherrytop ppo --dist.frozen_dtype=bf16` end to end: the two optimizers it makes hold the fp32
    policy and value model only; the frozen models' bf16 weights are in neither, never get a gradient
    nor optimizer state; the checkpoint's policy and value model are fp32."""

    from safetensors import safe_open

    from cherrytop.cli import main
    from cherrytop.stages import ppo
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?"] * 16, n_layers=2)
    made, frozen = [], []
    monkeypatch.setattr(ppo, "adamw", lambda model, lr, f=ppo.adamw: made.append(f(model, lr)) or made[-1])
    monkeypatch.setattr(ppo, "frozen_models", lambda *a, f=ppo.frozen_models: frozen.append(f(*a)) or frozen[-1])
    assert main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={tmp_path / 'init'}",
                 f"--ppo.reward_model={tmp_path / 'rm'}", f"--ppo.prompts={tmp_path / 'prompts.jsonl'}",
                 "--dist.frozen_dtype=bf16"]) == 0
    ref, rm, _ = frozen[0]
    held = {id(q) for m in (ref, rm) for q in m.parameters()}
    assert all(q.dtype == torch.bfloat16 and q.grad is None for m in (ref, rm) for q in m.parameters())
    assert len(made) == 2
    for opt in made:
        params = [q for g in opt.param_groups for q in g["params"]]
        assert params and all(q.dtype == torch.float32 for q in params) and not held & {id(q) for q in params}
        assert opt.state and all(id(q) not in held for q in opt.state)  # state only for the trained weights
    for f in ("runs/test/ppo/model.safetensors", "runs/test/ppo/value/model.safetensors"):
        with safe_open(tmp_path / f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}


def test_the_kl_reference_is_ppo_reference_when_set(tmp_path):
    """`ppo.reference` (a second round started from round 1's policy keeps its KL to the SFT model): the
    reference PPO runs is that folder's model, with LoRA too (then a copy of its own, not the policy with
    its adapter off); unset, it is `ppo.init`. A reference of another tokenizer is refused."""
    from cherrytop.config import load_config
    from cherrytop.data.tokenizer import train_tokenizer
    from cherrytop.model import lora
    from cherrytop.stages import ppo
    from cherrytop.stages.ppo import check_reward_tokenizer, frozen_models, reference_path
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 ."] * 20, 300)
    small = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64)
    for name, seed in (("policy", 0), ("sft", 1)):
        build_model(small, len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    scalar_model_from(tmp_path / "sft", tok.pad_token_id).save_pretrained(tmp_path / "rm")
    sft_weights = build_model(small, len(tok), tok.pad_token_id, tok.eos_token_id, seed=1).state_dict()
    init = tmp_path / "policy"

    def ref_of(*over):
        cfg = load_config("test", [], [f"--run.out_dir={tmp_path}", *over])
        policy = lora.prepare(ppo.load_model(init), cfg, "ppo")
        return reference_path(cfg, init), frozen_models(cfg, init, tmp_path / "rm", tok.pad_token_id, policy,
                                                        torch.device("cpu"))[0]
    path, ref = ref_of()
    assert path == init and torch.equal(ref.state_dict()["model.embed_tokens.weight"],
                                        ppo.load_model(init).state_dict()["model.embed_tokens.weight"])
    for over in ([], ["--lora.r=2"]):
        path, ref = ref_of(f"--ppo.reference={tmp_path / 'sft'}", *over)
        assert path == tmp_path / "sft" and not isinstance(ref, lora.Reference)
        assert all(torch.equal(ref.state_dict()[k], v) for k, v in sft_weights.items())
    assert isinstance(ref_of("--lora.r=2")[1], lora.Reference)  # reference = init: the adapter-off policy
    other = train_tokenizer(["a b c d e f g"] * 20, 280)
    other.save_pretrained(tmp_path / "sft")
    with pytest.raises(CheckpointError, match=r"the reference .*sft has another tokenizer than the policy .*expected the policy's SFT model"):
        check_reward_tokenizer(tok, init, tmp_path / "sft", "reference")


def test_ppo_stopped_half_way_resumes_to_the_same_weights(tmp_path):
    """A PPO run that stops after 2 of 4 iterations and is started again (`ppo.episodes` may grow on a
    checkpoint) ends with the very weights and logs of a run that never stopped: the sampler's random
    stream is saved with the checkpoint and resumed where it was (it used to be seeded again from the
    iteration, so the resumed run sampled other episodes)."""
    import json

    from safetensors.torch import load_file

    from cherrytop.cli import main
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?"] * 8, n_layers=1)

    def ppo(name, episodes):
        assert main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--run.name={name}",
                     f"--ppo.init={tmp_path / 'init'}", f"--ppo.reward_model={tmp_path / 'rm'}",
                     f"--ppo.prompts={tmp_path / 'prompts.jsonl'}", f"--ppo.episodes={episodes}", "--ppo.save_every=1",
                     "--ppo.temperature=1"]) == 0
    ppo("whole", 64)
    ppo("stopped", 32)
    ppo("stopped", 64)
    runs = tmp_path / "runs"
    for f in ("ppo/model.safetensors", "ppo/value/model.safetensors"):
        a, b = load_file(runs / "whole" / f), load_file(runs / "stopped" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    logs = [[{k: v for k, v in json.loads(r).items() if not k.startswith("perf/") and k != "time"}
             for r in (runs / n / "logs" / "ppo.jsonl").read_text().splitlines()] for n in ("whole", "stopped")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]


def test_each_rank_resumes_its_own_random_streams_and_another_world_size_starts_afresh(capsys):
    """`restore_rng` on a checkpoint's per-rank lists: rank 1 of 2 takes rank 1's global state and
    sampler stream; a checkpoint from before the lists (one tensor of each) still resumes one process
    where it was; on another number of processes the sampler keeps its fresh seed and rank 0 says the
    resume is not bit-exact."""
    from cherrytop.stages.ppo import restore_rng, rng_states
    from cherrytop.train.distributed import SOLO, Dist

    def stream(seed: int, skip: int) -> torch.Generator:  # a generator `skip` draws into its stream
        g = torch.Generator().manual_seed(seed)
        torch.rand(skip, generator=g)
        return g
    torch.manual_seed(1)
    rank0 = rng_states(stream(10, 3), SOLO)
    torch.manual_seed(2)
    rank1 = rng_states(stream(11, 5), SOLO)
    saved = {k: rank0[k] + rank1[k] for k in rank0}  # as two processes write it
    gen = torch.Generator().manual_seed(99)
    restore_rng(saved, gen, Dist(1, 2, 1, torch.device("cpu")), 2)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=stream(11, 5)))
    assert torch.equal(torch.get_rng_state(), rank1["rng"][0])

    old = {"rng": rank0["rng"][0], "sampler_rng": rank0["sampler_rng"][0]}  # one tensor each
    gen = torch.Generator().manual_seed(99)
    restore_rng(old, gen, SOLO, 2)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=stream(10, 3)))
    assert "not bit-exact" not in capsys.readouterr().err

    gen = torch.Generator().manual_seed(99)
    restore_rng(saved, gen, SOLO, 2)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=torch.Generator().manual_seed(99)))
    assert torch.equal(torch.get_rng_state(), rank0["rng"][0])
    err = " ".join(capsys.readouterr().err.split())
    assert "not bit-exact" in err and "2 process(es) and this job has 1" in err
