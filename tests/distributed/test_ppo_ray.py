"""PPO with its models as Ray actors on this machine (a local Ray instance, CPU actors): the same
curve as the single-process stage 6 on the same seed (so rollouts, scoring, both updates and the
trainer -> rollout-worker weight sync are right), and (slow) with LoRA, no reference actor: the
first rollout's KL to the reference (the policy with its adapter off) is exactly 0."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cherrytop.cli import main
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model.heads import KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, scalar_model_from

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("lora_tests", HERE / "test_lora.py")
lora_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_tests)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


def rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "logs/ppo.jsonl").read_text().splitlines()]


def setup(tmp_path, kind: str = "sum") -> list[str]:
    """A local Llama-style policy with its own template, a reward model from it (with a c · log π_ref
    term of `kind`, π_ref = the policy's start), prompts; the PPO flags."""
    base = lora_tests.chatml_llama(tmp_path)
    tok = load_tokenizer(base)
    rm = scalar_model_from(base, tok.pad_token_id)
    rm.config.update({LOGLIK_KEY: 0.3, REFERENCE_KEY: str(Path(base).resolve()), KIND_KEY: kind})
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["what is 12 plus 3 ?", "no idea ?"] * 8))
    common = ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={base}",
              f"--ppo.reward_model={tmp_path / 'rm'}", f"--ppo.prompts={prompts}", "--ppo.lr=0.01", "--ppo.value_lr=0.01",
              "--ppo.temperature=1"]  # Ray takes the c · log π_ref term from π_ref at T = 1 only
    return common


@pytest.mark.slow  # ~120 s on the shared 2 cores (Ray start-up and five actor processes); run with -m slow
def test_ppo_on_ray_matches_the_single_process_stage(tmp_path, ray_session):
    common = setup(tmp_path)
    assert main(["ppo", *common, "--run.name=single"]) == 0
    assert main(["ppo", *common, "--run.name=ray", "--ray.enabled=true"]) == 0
    a, b = rows(tmp_path / "runs/single"), rows(tmp_path / "runs/ray")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [16, 32]
    for ra, rb in zip(a, b):
        for k in ("objective/score", "objective/ref_loglik", "objective/kl", "objective/entropy", "rollout/length", "loss/policy",
                  "loss/value", "policy/clipfrac", "value/explained_variance"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    assert b[1]["objective/kl"] != 0.0  # iteration 2 sampled with the synced, trained weights
    assert a[0]["objective/ref_loglik"] < 0  # both added the reward model's log π_ref term
    ray_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/ray/ppo")
    single = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "runs/single/ppo").named_parameters())
    for n, q in ray_policy.named_parameters():  # both saved the weight average (ppo.ema, on by default)
        assert torch.allclose(q, single[n], atol=1e-5), n
    base = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "base").named_parameters())
    assert any(not torch.equal(q, base[n]) for n, q in ray_policy.named_parameters())
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "runs/ray/ppo/value")


@pytest.mark.slow
def test_lora_ppo_on_ray_has_no_reference_actor(tmp_path, ray_session):
    common = setup(tmp_path, kind="excess")  # the term's entropies come from the policy with its adapter off
    assert main(["ppo", *common, "--run.name=ray_lora", "--ray.enabled=true", "--lora.r=4"]) == 0
    c = rows(tmp_path / "runs/ray_lora")
    assert c[0]["objective/ref_loglik"] != 0
    assert abs(c[0]["objective/kl"]) < 1e-4 < abs(c[1]["objective/kl"])
    assert (tmp_path / "runs/ray_lora/ppo/adapter/adapter_model.safetensors").is_file()


def test_ray_scorers_hold_the_frozen_models_in_frozen_dtype(tmp_path):
    """The reward and reference actors' class (called here without Ray, which it does not start):
    with `dist.frozen_dtype=bf16` their weights are bf16 without gradients, and their scores and
    log-probs are the fp32 ones up to bf16 rounding (2 eps, as tests/stages/test_ppo.py argues)."""
    from cherrytop.config import DistConfig
    from cherrytop.stages.ppo_ray import Scorer
    setup(tmp_path)
    tok = load_tokenizer(tmp_path / "base")
    enc = tok(["what is 12 plus 3 ? it is 15 .", "what is 12 plus 3 ? no idea ."], padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]  # (2, T) right-padded
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = {}
    for dtype in ("fp32", "bf16"):
        rm, ref = (Scorer(kind, str(tmp_path / folder), tok.pad_token_id, 1.0, DistConfig(frozen_dtype=dtype))
                   for kind, folder in (("reward", "rm"), ("reference", "base")))
        want = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert all(q.dtype == want and not q.requires_grad for s in (rm, ref) for q in s.model.parameters())
        out[dtype] = (rm.score(ids, attn, pos), ref.logp(ids, attn, pos, 4))
    import ray
    assert not ray.is_initialized()
    eps = torch.finfo(torch.bfloat16).eps
    for a, b in zip(out["fp32"], out["bf16"]):
        assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(b, a, rtol=2 * eps, atol=2 * eps)
