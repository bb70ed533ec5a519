"""`cherrytop dpo` end to end on a small model and a comparisons file the test writes: the policy learns
the rankings (loss falls, held-out implicit reward accuracy rises), each answer is scored once per step
and π_ref once per run, a kill -9 resumes to the weights of a run that never stopped, LoRA's π_ref is
the base with the adapter off, online rounds rank the current policy's answers, and bad input stops
with one line."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cherrytop.cli import main
from cherrytop.config import ModelConfig
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.eval.judge import Judge
from cherrytop.model.heads import scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.stages import dpo

_spec = importlib.util.spec_from_file_location("killed_run", Path(__file__).parents[1] / "distributed" / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)


def dpo_inputs(tmp_path: Path, n: int = 40) -> None:
    """A small causal LM `init` with its tokenizer, and `comps.jsonl`: n sums, each with K = 4 answers
    ranked right sum first, then wrong sums, then a refusal (two wrong sums tied in every fifth)."""
    rng = random.Random(0)
    rows, texts = [], []
    for i in range(n):
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        answers = [f"{a} plus {b} is {a + b} .", f"{a} plus {b} is {a + b + 1} .", f"{a} plus {b} is {a + b + 3} .",
                   "no idea ."]
        order = rng.sample(range(4), 4)
        responses = [answers[j] for j in order]
        ranking = sorted(range(4), key=lambda k: order[k])
        ties = [[ranking[1], ranking[2]]] if i % 5 == 0 else []
        rows.append({"prompt": f"what is {a} plus {b} ?", "responses": responses, "ranking": ranking, "ties": ties})
        texts += [rows[-1]["prompt"], *responses]
    tok = train_tokenizer(texts, 300)
    build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=96), len(tok),
                tok.pad_token_id, tok.eos_token_id).save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    (tmp_path / "comps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def args(tmp_path: Path, *extra: str) -> list[str]:
    return ["dpo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--dpo.train.init={tmp_path / 'init'}",
            f"--dpo.train.data={tmp_path / 'comps.jsonl'}", "--dpo.epochs=0", "--dpo.train.max_steps=24",
            "--dpo.train.lr=3e-3", "--dpo.train.micro_batch_size=4", "--dpo.train.eval_every=8", "--dpo.train.save_every=8",
            *extra]


def logs(tmp_path: Path, name: str = "dpo") -> list[dict]:
    return [json.loads(r) for r in (tmp_path / "runs" / "test" / "logs" / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of `cherrytop dpo` (the DPO loss), counting the answers each pass scores."""
    tmp = tmp_path_factory.mktemp("dpo")
    dpo_inputs(tmp)
    calls = {"policy_rows": [], "ref_rows": [], "loaded": []}
    mp = pytest.MonkeyPatch()
    mp.setattr(dpo, "load_model", lambda *a, f=dpo.load_model, **k: calls["loaded"].append(a[0]) or f(*a, **k))
    real_logp, real_loglik = dpo.response_logp, dpo.response_loglik
    mp.setattr(dpo, "response_logp", lambda m, ids, *a, **k: calls["policy_rows"].append(len(ids)) or real_logp(m, ids, *a, **k))
    mp.setattr(dpo, "response_loglik", lambda lm, p, r, *a, **k: calls["ref_rows"].append(len(p)) or real_loglik(lm, p, r, *a, **k))
    assert main(args(tmp)) == 0
    mp.undo()
    return tmp, calls


def test_dpo_learns_the_rankings_and_saves_a_hugging_face_model(trained):
    tmp, _ = trained
    rows = logs(tmp)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[0] == pytest.approx(0.693, abs=0.01)  # π = π_ref at the start: every pair's loss is log 2
    assert sum(train[-4:]) / 4 < train[0] - 0.1
    evals = [r for r in rows if "eval/reward_accuracy" in r]
    assert evals[-1]["eval/reward_accuracy"] > 0.65 and evals[-1]["eval/margin"] > 0  # 0.5 by chance
    assert {"eval/logp_chosen", "eval/logp_rejected", "eval/ref_logp_chosen"} <= set(evals[-1])
    model = AutoModelForCausalLM.from_pretrained(tmp / "runs" / "test" / "dpo")  # any tool can load it
    assert model.config.vocab_size > 0
    lineage = json.loads((tmp / "runs" / "test" / "lineage.json").read_text())
    assert "dpo" in lineage


def test_each_answer_is_scored_once_per_step_and_the_reference_once_per_run(trained):
    _, calls = trained
    assert calls["ref_rows"] == [36 * 4, 4 * 4]  # every training and held-out answer, once
    assert len(calls["loaded"]) == 1  # π_ref = the policy before its first step: no second copy
    steps, per_step = 24, 4 * 4  # 4 prompts of K = 4 per step: 16 rows, never 2 · C(4, 2) = 12 pairs · 2
    evals = 3 * 2 * 4 * 4  # 3 evaluations of the 4 held-out prompts: their loss, then their pair metrics
    assert sum(calls["policy_rows"]) == steps * per_step + evals


def test_plackett_luce_ipo_and_simpo_learn_too(tmp_path):
    dpo_inputs(tmp_path)
    for i, extra in enumerate((["--dpo.pairs=plackett_luce"], ["--dpo.loss=ipo"], ["--dpo.loss=simpo"])):
        assert main(args(tmp_path, f"--run.name=r{i}", "--dpo.train.max_steps=12", *extra)) == 0
        rows = [json.loads(r) for r in (tmp_path / "runs" / f"r{i}" / "logs" / "dpo.jsonl").read_text().splitlines()]
        assert rows[-1]["eval/reward_accuracy"] > 0.6, extra


def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_one_that_never_stopped(tmp_path):
    dpo_inputs(tmp_path)
    assert main(args(tmp_path, "--run.name=whole", "--dpo.train.max_steps=16")) == 0
    killed = args(tmp_path, "--run.name=killed", "--dpo.train.max_steps=16", "--dpo.train.save_every=4")
    killed_run.kill_after_checkpoint(killed, tmp_path / "runs" / "killed" / "dpo", least=8)
    assert main(killed) == 0
    whole = load_file(tmp_path / "runs" / "whole" / "dpo" / "model.safetensors")
    resumed = load_file(tmp_path / "runs" / "killed" / "dpo" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_lora_trains_the_adapter_against_the_base_with_no_second_copy(tmp_path, monkeypatch):
    dpo_inputs(tmp_path)
    loaded = []
    monkeypatch.setattr(dpo, "load_model", lambda *a, f=dpo.load_model, **k: loaded.append(a[0]) or f(*a, **k))
    seen = {}
    real = dpo.reference_logps
    monkeypatch.setattr(dpo, "reference_logps", lambda m, e, *a: seen.setdefault(len(seen), real(m, e, *a)))
    assert main(args(tmp_path, "--lora.r=4", "--dpo.train.max_steps=8")) == 0
    assert len(loaded) == 1  # the policy alone: π_ref is its base with the adapter off
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    enc = dpo.encode(dpo.load_tokenizer(tmp_path / "init"), dpo.read_comparisons(tmp_path / "comps.jsonl")[:3], 160,
                     [(tmp_path / "comps.jsonl", i) for i in range(3)])
    want = real(base, enc, base.config.pad_token_id, 160)
    got = [ref for ref in seen[0] + seen[1]]
    assert any(torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-5) for g in got for w in want)
    ckpt = tmp_path / "runs" / "test" / "dpo"
    assert (ckpt / "adapter").is_dir()
    trained = load_file(ckpt / "model.safetensors")
    first = load_file(tmp_path / "init" / "model.safetensors")
    assert any(not torch.equal(trained[k], first[k]) for k in first)  # the merged adapter moved the weights


def test_online_rounds_rank_the_current_policys_answers_with_the_reward_model(tmp_path, capsys):
    dpo_inputs(tmp_path, n=12)
    torch.manual_seed(0)
    scalar_model_from(tmp_path / "init", 0).save_pretrained(tmp_path / "rm")
    dpo.load_tokenizer(tmp_path / "init").save_pretrained(tmp_path / "rm")
    assert main(args(tmp_path, "--dpo.rounds=2", "--dpo.ranker=reward_model", f"--dpo.reward_model={tmp_path / 'rm'}",
                     "--dpo.train.max_steps=4", "--compare.k=3", "--compare.max_new_tokens=6")) == 0
    run = tmp_path / "runs" / "test"
    rows = [json.loads(r) for r in (run / "data" / "dpo_round2.jsonl").read_text().splitlines()]
    assert len(rows) == 11 and all(len(r["responses"]) == 3 for r in rows)  # every training prompt, K = compare.k
    assert {r["policy"] for r in rows} == {str(run / "dpo_round1")}  # sampled from round 1's policy
    scores = Judge(tmp_path / "rm").scores([r["prompt"]["messages"] for r in rows[:3] for _ in range(3)],
                                           [a for r in rows[:3] for a in r["responses"]])
    for n, r in enumerate(rows[:3]):  # best first by the reward model
        s = scores[3 * n: 3 * n + 3]
        assert [s[i] for i in r["ranking"]] == sorted(s, reverse=True)
    last, out = load_file(run / "dpo_round2" / "model.safetensors"), load_file(run / "dpo" / "model.safetensors")
    assert all(torch.equal(last[k], out[k]) for k in last)  # the stage's output is the last round
    capsys.readouterr()
    assert main(args(tmp_path, "--run.name=lab", "--dpo.rounds=2", "--dpo.ranker=labelers")) == 2
    assert "rank online rounds with --dpo.ranker=reward_model" in capsys.readouterr().err


def test_bad_comparisons_stop_with_one_line_naming_file_and_line(tmp_path, capsys):
    dpo_inputs(tmp_path, n=4)
    lines = (tmp_path / "comps.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]})
    (tmp_path / "comps.jsonl").write_text("\n".join(lines) + "\n")
    assert main(args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comps.jsonl" in err[0] and ":3" in err[0], err
