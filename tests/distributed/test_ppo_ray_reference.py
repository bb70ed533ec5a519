"""`--ppo.reference` on Ray: the reference actor holds that folder's model (with LoRA too, where a
reference other than `--ppo.init` cannot be the policy with its adapter off), and a reward model
whose c · log π_ref term names another π_ref stops in one line naming both models and the fix,
before Ray starts. The actors are built here without Ray (`ray.remote` stands in for a local call);
(slow) a real Ray run's first KL is to the other model."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cherrytop.cli import main
from cherrytop.config import load_config
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model.heads import KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, scalar_model_from

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("lora_tests", HERE / "test_lora.py")
lora_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_tests)


def models(tmp_path: Path, rm_ref: str = "base") -> list[str]:
    """base (the policy's start), other (base with its weights moved: the reference), a reward model
    from base whose c · log π_ref term names `rm_ref`; the PPO flags for them."""
    base = lora_tests.chatml_llama(tmp_path)
    tok = load_tokenizer(base)
    other = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.2 * torch.randn_like(q))
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    rm = scalar_model_from(base, tok.pad_token_id)
    rm.config.update({LOGLIK_KEY: 0.3, REFERENCE_KEY: str((tmp_path / rm_ref).resolve()), KIND_KEY: "sum"})
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["what is 12 plus 3 ?", "no idea ?"] * 8))
    return ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={base}",
            f"--ppo.reward_model={tmp_path / 'rm'}", f"--ppo.prompts={prompts}", "--ppo.temperature=1", "--ray.enabled=true"]


class Local:
    """`ray.remote(cls).options(...).remote(*args)` made a local call: the actor object itself."""

    def __init__(self, cls):
        self.cls = cls

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.cls(*args)


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_the_reference_actor_holds_ppo_reference(tmp_path, monkeypatch, adapters):
    import ray

    from cherrytop.stages import ppo_ray
    models(tmp_path)
    monkeypatch.setattr(ray, "remote", Local)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "127.0.0.1",
                                                "Resources": {"CPU": 16.0}}])
    cfg = load_config("test", [], ["--ray.enabled=true", *(["--lora.r=2"] if adapters else [])])
    base, other = tmp_path / "base", tmp_path / "other"
    pad = load_tokenizer(base).pad_token_id
    actors = ppo_ray.start_actors(cfg, str(base), str(tmp_path / "rm"), pad, str(other))
    want = dict(AutoModelForCausalLM.from_pretrained(other).named_parameters())
    got = dict(actors.reference.model.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # the reference = the policy's start: with LoRA no actor (the policy with its adapter off)
    same = ppo_ray.start_actors(cfg, str(base), str(tmp_path / "rm"), pad, str(base))
    assert (same.reference is None) == adapters
    assert not ray.is_initialized()


def test_a_reward_model_with_another_pi_ref_than_the_reference_is_one_line(tmp_path, capsys):
    import ray
    common = models(tmp_path, rm_ref="base")
    capsys.readouterr()  # the models' setup progress bars
    assert main(["ppo", *common, "--run.name=mis", f"--ppo.reference={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"π_ref = {(tmp_path / 'base').resolve()}, but PPO's KL reference is {tmp_path / 'other'}" in err
    assert f"pass --ppo.reference={(tmp_path / 'base').resolve()}," in err and "--ppo.temperature" not in err
    assert not ray.is_initialized()  # refused before Ray started


@pytest.mark.slow  # ~60 s on the shared 2 cores (Ray start-up, two runs of six actors); run with -m slow
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_ppo_on_ray_takes_its_kl_to_ppo_reference(tmp_path, adapters):
    """The reward model's π_ref is the reference (allowed); the first rollout samples from base, so its
    KL is to `other` (not 0, as it would be to base), and LoRA's run gives the same first iteration."""
    ray = pytest.importorskip("ray")
    common = models(tmp_path, rm_ref="other")
    try:
        assert main(["ppo", *common, "--run.name=r", f"--ppo.reference={tmp_path / 'other'}",
                     *(["--lora.r=2"] if adapters else [])]) == 0
    finally:
        ray.shutdown()
    rows = [json.loads(r) for r in (tmp_path / "runs/r/logs/ppo.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] > 1e-3 and rows[0]["objective/ref_loglik"] < 0
