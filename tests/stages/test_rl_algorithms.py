"""`--rl.algorithm`: the critic-free methods (GRPO, Dr. GRPO, RLOO, REINFORCE++, REINFORCE++-baseline) and
the KL penalty in the reward or in the loss. Advantages and losses against hand computations; micro-batching
exact for every aggregation; end-to-end runs on the test preset that hold no value model, with LoRA train only
the adapters, and resume (after a clean stop, and after kill -9) to the weights of a run that never stopped."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from cherrytop.config import ModelConfig, PPOConfig, RLConfig
from cherrytop.model.load import build_model
from cherrytop.rl.experience import PPO, Method, Rollout, advantages, method
from cherrytop.rl.update import policy_objective, train
from cherrytop.rollout.episodes import response_logp

from .test_ppo import ppo_inputs

_spec = importlib.util.spec_from_file_location("killed_run", Path(__file__).parents[1] / "distributed" / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)

CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def test_auto_picks_each_papers_kl_and_aggregation():
    assert method(RLConfig()) == PPO and PPO.critic and PPO.group_size == 1
    grpo = method(RLConfig(algorithm="grpo", group_size=8))
    assert (grpo.group_size, grpo.kl_estimator, grpo.kl_in, grpo.agg) == (8, "k3", "loss", "seq_mean_token_mean")
    assert method(RLConfig(algorithm="dr_grpo")).agg == "seq_mean_token_sum_norm"
    for a in ("rloo", "reinforce_pp", "reinforce_pp_baseline"):
        m = method(RLConfig(algorithm=a))
        assert (m.kl_estimator, m.kl_in, m.agg, m.critic) == ("k1", "reward", "token_mean", False)
    assert method(RLConfig(algorithm="reinforce_pp", group_size=4)).group_size == 1  # one answer per prompt
    m = method(RLConfig(algorithm="ppo", kl_estimator="k2", kl_in="loss"))
    assert (m.kl_estimator, m.kl_in, m.critic) == ("k2", "loss", True)


def _episodes():
    """Three groups of two answers: answer 2 has no EOS (its score is the penalty), group 3's scores are equal."""
    torch.manual_seed(3)
    lengths, N = [4, 2, 3, 1, 2, 4], 4
    mask = torch.tensor([[float(t < n) for t in range(N)] for n in lengths])
    head = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.5, 1.5])
    has_eos = torch.tensor([True, True, False, True, True, True])
    f = 0.1 * torch.randn(6, N) * mask
    f[4:] = 0
    old_logp, ref_logp = -torch.rand(6, N) * 2 * mask, -torch.rand(6, N) * 2 * mask
    return lengths, mask, head, has_eos, f, old_logp, ref_logp


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_advantages_of_each_critic_free_algorithm_by_hand(algorithm):
    lengths, mask, head, has_eos, f, old_logp, ref_logp = _episodes()
    beta, G, p = 0.3, 2, PPOConfig(no_eos_penalty=-1.0, gamma=1.0)
    m = method(RLConfig(algorithm=algorithm, group_size=G))
    adv, _, stats = advantages(head, f, old_logp, ref_logp, torch.zeros_like(mask), torch.zeros_like(mask), mask,
                               has_eos, beta, p, 0.5, m=m)
    B = len(lengths)
    score = [head[b].item() if has_eos[b] else -1.0 for b in range(B)]
    dense = [[f[b, t].item() * has_eos[b].item() for t in range(n)] for b, n in enumerate(lengths)]
    total = [score[b] + sum(dense[b]) for b in range(B)]  # the score with the reward model's dense term
    k1 = [[old_logp[b, t].item() - ref_logp[b, t].item() for t in range(n)] for b, n in enumerate(lengths)]
    beta_r = 0.0 if algorithm in ("grpo", "dr_grpo") else beta  # GRPO's KL is in the loss
    want = torch.zeros_like(mask)
    if algorithm in ("grpo", "dr_grpo", "rloo"):
        r = [total[b] - beta_r * sum(k1[b]) for b in range(B)]
        for g in range(B // G):
            grp = r[g * G:(g + 1) * G]
            mean = sum(grp) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
            for i in range(G):
                a = {"grpo": (grp[i] - mean) / (std + 1e-6), "dr_grpo": grp[i] - mean,
                     "rloo": grp[i] - (sum(grp) - grp[i]) / (G - 1)}[algorithm]
                want[g * G + i, :lengths[g * G + i]] = a
    else:
        returns = []
        for b, n in enumerate(lengths):
            last = score[b]
            if algorithm == "reinforce_pp_baseline":
                g = b // G
                last -= sum(total[g * G:(g + 1) * G]) / G
            rew = [-beta * k1[b][t] + dense[b][t] + (last if t == n - 1 else 0.0) for t in range(n)]
            returns.append([sum(rew[t:]) for t in range(n)])
        flat = [x for row in returns for x in row]
        mean = sum(flat) / len(flat)
        var = sum((x - mean) ** 2 for x in flat) / len(flat)
        for b, row in enumerate(returns):
            for t, x in enumerate(row):
                want[b, t] = (x - mean) / math.sqrt(var + 1e-8)
    assert_close(adv, want, rtol=1e-5, atol=1e-5)
    if algorithm == "reinforce_pp":
        assert "rollout/equal_groups" not in stats
    else:
        assert stats["rollout/equal_groups"] == pytest.approx(1 / 3)  # group 3: equal scores, zero advantage
    if algorithm in ("grpo", "dr_grpo"):  # the KL is in their loss: equal scores, zero advantage
        assert (adv[4:] == 0).all()
    assert stats["objective/kl"] == pytest.approx(sum(map(sum, k1)) / B, rel=1e-5)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_the_loss_by_hand_with_its_gradient_through_logp(kind):
    """GRPO's loss: the mean over answers of each answer's token mean of the clipped surrogate, + β · the
    same mean of k(logp, ref_logp); with zero advantages only the KL term moves logp, by β·k'(ℓ)/(B·|o_b|)."""
    lengths, mask, *_ , ref_logp = _episodes()
    beta, B = 0.04, len(lengths)
    logp = (ref_logp + 0.3 * torch.randn_like(mask)).requires_grad_()
    part = Rollout(*(torch.zeros(B, 2) for _ in range(3)), mask, logp.detach().clone(), ref_logp,
                   torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask))
    m = Method("grpo", 2, kind, "loss", "seq_mean_token_mean")
    loss, stats = policy_objective(logp, part, PPOConfig(max_new_tokens=4), m, beta)
    est = {"k1": lambda l: l, "k2": lambda l: 0.5 * l * l, "k3": lambda l: math.exp(-l) - 1 + l}[kind]
    slope = {"k1": lambda l: 1.0, "k2": lambda l: l, "k3": lambda l: 1 - math.exp(-l)}[kind]
    ell = [[logp[b, t].item() - ref_logp[b, t].item() for t in range(n)] for b, n in enumerate(lengths)]
    kl = sum(sum(est(x) for x in row) / len(row) for row in ell) / B
    assert stats["loss/kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(beta * kl, rel=1e-5)  # the surrogate is 0 with zero advantages
    loss.backward()
    want = torch.zeros_like(mask)
    for b, row in enumerate(ell):
        for t, x in enumerate(row):
            want[b, t] = beta * slope(x) / (B * len(row))
    assert_close(logp.grad, want, rtol=1e-5, atol=1e-7)


def _update_inputs():
    """A tiny policy and 8 episodes of unequal lengths (prompt 3 tokens, response up to 5)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32), 24, 0, 1, seed=0)
    P, N, lengths = 3, 5, [5, 1, 3, 2, 5, 4, 1, 2]
    ids = torch.randint(2, 24, (8, P + N))
    mask = torch.tensor([[float(t < n) for t in range(N)] for n in lengths])
    attn = torch.cat([torch.ones(8, P), mask], 1).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logp = response_logp(model, ids, attn, pos, P, 1.0) * mask
    old = (logp + 0.05 * torch.randn_like(mask)) * mask
    ref = (logp + 0.2 * torch.randn_like(mask)) * mask
    batch = Rollout(ids, attn, pos, mask, old, ref, torch.zeros_like(mask), torch.randn(8, N) * mask, torch.zeros_like(mask))
    return model, batch, P


def _one_step(model, batch, P, micro: int, m: Method, weights: str) -> dict[str, torch.Tensor]:
    import copy
    model = copy.deepcopy(model)
    p = PPOConfig(batch_size=8, minibatch_size=8, micro_batch_size=micro, ppo_epochs=1, max_new_tokens=5, grad_clip=1e9)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def loss(part):
        return policy_objective(response_logp(model, part.ids, part.attn, part.pos, P, 1.0), part, p, m, 0.5)
    train(model, opt, batch, p, 0, 0, loss, "policy", agg=weights)
    return {n: q.detach().clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_one_micro_batch_of_8_takes_the_step_of_8_micro_batches_of_1(agg):
    """Each aggregation's micro-batch weights (token share, answer share) keep the minibatch's loss exact,
    KL term included; weighting a per-answer loss by tokens would not."""
    model, batch, P = _update_inputs()
    m = Method("grpo", 2, "k3", "loss", agg)
    whole, parts = _one_step(model, batch, P, 8, m, agg), _one_step(model, batch, P, 1, m, agg)
    start = dict(model.named_parameters())
    assert any(not torch.equal(whole[n], start[n]) for n in whole)
    for n in whole:
        assert_close(parts[n], whole[n], rtol=1e-5, atol=1e-6)
    if agg != "token_mean":
        wrong = _one_step(model, batch, P, 1, m, "token_mean")
        assert any(not torch.allclose(wrong[n], whole[n], rtol=1e-4, atol=1e-5) for n in whole)


def _args(tmp_path, name: str, *over: str) -> list[str]:
    """`cherrytop ppo`'s arguments for run `name` on the test preset with `ppo_inputs`."""
    return ["ppo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--run.name={name}",
            f"--ppo.init={tmp_path / 'init'}", f"--ppo.reward_model={tmp_path / 'rm'}",
            f"--ppo.prompts={tmp_path / 'prompts.jsonl'}", "--ppo.temperature=1", *over]


def _ppo(tmp_path, name: str, *over: str) -> int:
    from cherrytop.cli import main
    return main(_args(tmp_path, name, *over))


def _logs(run) -> list[dict]:
    return [{k: v for k, v in json.loads(r).items() if not k.startswith("perf/") and k != "time"}
            for r in (run / "logs" / "ppo.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_each_critic_free_algorithm_trains_without_a_value_model(tmp_path, monkeypatch, capsys, algorithm):
    """`cherrytop ppo --rl.algorithm=X` on the test preset: one optimizer (the policy's), no value pass, no
    `value/` folder, the policy moves, the group statistics and (GRPO) the KL loss term are logged."""
    from safetensors.torch import load_file

    from cherrytop.stages import ppo
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?", "what is 3 plus 3 ?", "12 plus 3 ?"] * 4, n_layers=1)
    made = []
    monkeypatch.setattr(ppo, "adamw", lambda model, lr, f=ppo.adamw: made.append(f(model, lr)) or made[-1])
    monkeypatch.setattr(ppo, "response_values", lambda *a, **k: pytest.fail("a value pass without a critic"))
    assert _ppo(tmp_path, algorithm, f"--rl.algorithm={algorithm}") == 0
    assert f"rl.algorithm={algorithm}" in capsys.readouterr().err.replace("\n", "")
    run = tmp_path / "runs" / algorithm
    assert len(made) == 1 and not (run / "ppo" / "value").exists()
    logs = _logs(run)
    assert len(logs) == 2 and all(math.isfinite(v) for row in logs for v in row.values())
    assert not any(k.startswith("value/") or k == "policy/vf_clipfrac" for k in logs[-1])
    assert ("rollout/equal_groups" in logs[-1]) == (algorithm != "reinforce_pp")
    assert ("loss/kl" in logs[-1]) == (algorithm in ("grpo", "dr_grpo"))
    a, b = load_file(tmp_path / "init" / "model.safetensors"), load_file(run / "ppo" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_grpo_run_resumes_to_the_same_weights_and_refuses_another_algorithm(tmp_path, capsys):
    """Stopped after 2 of 4 iterations and started again, GRPO ends with the weights and logs of a run that
    never stopped; its checkpoint is not resumed under another algorithm (nor one under GRPO's)."""
    from safetensors.torch import load_file
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?"] * 8, n_layers=1)
    grpo = ("--rl.algorithm=grpo", "--ppo.save_every=1")
    assert _ppo(tmp_path, "whole", *grpo, "--ppo.episodes=64") == 0
    assert _ppo(tmp_path, "stopped", *grpo, "--ppo.episodes=32") == 0
    assert _ppo(tmp_path, "stopped", "--rl.algorithm=rloo", "--ppo.episodes=64") == 2
    assert "rl.algorithm: 'grpo' -> 'rloo'" in capsys.readouterr().err.replace("\n", "")
    assert _ppo(tmp_path, "stopped", *grpo, "--ppo.episodes=64") == 0
    runs = tmp_path / "runs"
    a, b = load_file(runs / "whole/ppo/model.safetensors"), load_file(runs / "stopped/ppo/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(_logs(runs / "whole")) == 4 and _logs(runs / "whole") == _logs(runs / "stopped")
    assert not (runs / "stopped/ppo/value").exists()


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_each_critic_free_algorithm_trains_only_lora_adapters(tmp_path, monkeypatch, algorithm):
    """`--lora.r=4`: the policy's adapters train and nothing else (the saved folder is the start's weights
    but for the adapted layers, merged; `adapter/` holds adapters only, trained off zero), and the only
    scalar model loaded is the reward model: no value model, no value pass, no `value/`."""
    from safetensors.torch import load_file

    from cherrytop.stages import ppo
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?", "what is 3 plus 3 ?", "12 plus 3 ?"] * 4, n_layers=1)
    loaded = []
    monkeypatch.setattr(ppo, "scalar_model_from", lambda path, *a, f=ppo.scalar_model_from, **k: loaded.append(path)
                        or f(path, *a, **k))
    monkeypatch.setattr(ppo, "response_values", lambda *a, **k: pytest.fail("a value pass without a critic"))
    assert _ppo(tmp_path, algorithm, f"--rl.algorithm={algorithm}", "--lora.r=4", "--lora.alpha=8", "--ppo.lr=0.01") == 0
    assert [str(x) for x in loaded] == [str(tmp_path / "rm")]
    out = tmp_path / "runs" / algorithm / "ppo"
    assert not (out / "value").exists()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # no trained head or other weight
    assert all(adapter[k].any() for k in adapter if ".lora_B." in k)  # every adapter trained (B starts at zero)
    adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in adapter}
    start, saved = load_file(tmp_path / "init" / "model.safetensors"), load_file(out / "model.safetensors")
    assert start.keys() == saved.keys() and adapted <= start.keys()
    assert {k for k in start if not torch.equal(start[k], saved[k])} == adapted  # the base itself unchanged
    logs = _logs(tmp_path / "runs" / algorithm)
    assert abs(logs[0]["objective/kl"]) < 1e-5 and logs[1]["objective/kl"] != 0  # policy = reference until trained


@pytest.mark.slow  # ~10-20 s per algorithm on the shared 2 cores (a CLI process, two runs of 6 iterations); -m slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_critic_free_run_killed_mid_run_resumes_to_the_same_weights_and_logs(tmp_path, algorithm):
    """kill -9 after the checkpoint of iteration 2 (of 6, one every iteration), then started again: the
    weights (the saved average and its live weights) and logs of a run that never stopped; what the
    killed process left half written is gone."""
    from safetensors.torch import load_file

    from cherrytop.train.checkpoint import load_state
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?", "what is 3 plus 3 ?", "12 plus 3 ?"] * 4, n_layers=1)
    flags = (f"--rl.algorithm={algorithm}", "--ppo.save_every=1", "--ppo.episodes=96", "--ppo.kl_target=1")
    runs = tmp_path / "runs"
    assert _ppo(tmp_path, "whole", *flags) == 0
    killed_run.kill_after_checkpoint(_args(tmp_path, "killed", *flags), runs / "killed" / "ppo")
    assert load_state(runs / "killed" / "ppo")["iteration"] < 6  # killed mid-run
    assert _ppo(tmp_path, "killed", *flags) == 0
    a, b = load_file(runs / "whole/ppo/model.safetensors"), load_file(runs / "killed/ppo/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(runs / "whole/ppo"), load_state(runs / "killed/ppo")
    assert sa["iteration"] == sb["iteration"] == 6
    assert all(torch.equal(sa["live_policy"][k], sb["live_policy"][k]) for k in sa["live_policy"])
    assert len(_logs(runs / "whole")) == 6 and _logs(runs / "whole") == _logs(runs / "killed")
    assert len({r["objective/beta"] for r in _logs(runs / "whole")}) > 1  # β adapts: resumed too
    assert sorted(p.name for p in (runs / "killed").iterdir() if p.name.startswith(".")) == []
    assert not (runs / "killed/ppo/value").exists()


def test_a_run_that_turns_non_finite_says_which_checkpoint_is_left(tmp_path, monkeypatch, capsys):
    """NaN at iteration 2 after a save at 1: the message names that checkpoint; NaN before any save (and no
    earlier run): it says none was saved, instead of a "last good checkpoint" that does not exist."""
    from cherrytop.stages import ppo
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?", "no idea ?"] * 8, n_layers=1)
    real, calls = ppo.update, []

    def update(*a, **k):  # the second update of the run reports a NaN loss
        calls.append(1)
        out = real(*a, **k)
        return {**out, "loss/policy": float("nan")} if len(calls) == 2 else out
    monkeypatch.setattr(ppo, "update", update)
    assert _ppo(tmp_path, "saved", "--ppo.save_every=1") == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "non-finite loss/policy at iteration 2" in err
    assert f"the last good checkpoint (step 1) is in {tmp_path / 'runs' / 'saved' / 'ppo'}" in err
    calls.clear()
    assert _ppo(tmp_path, "unsaved", "--ppo.save_every=100", "--ppo.episodes=64") == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "non-finite loss/policy at iteration 2" in err and "no checkpoint was saved" in err
