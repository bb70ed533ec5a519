"""The real entry point under torchrun: `cherrytop ppo` on 2 CPU processes (gloo) with DDP and with
FSDP2 (and FSDP2 with LoRA; GRPO under both), on a local GPT-2-style model with its own chat template and a reward
model made from it: it finishes with finite metrics, writes a checkpoint (policy = the weight
average, and for PPO `value/`) that plain transformers loads, and a second launch with more episodes resumes
from it; a job killed with SIGKILL resumes to the weights of one never stopped. Slow (torchrun launches)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cherrytop.train import distributed
from cherrytop.train.checkpoint import load_state

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("torchrun_cli", HERE / "test_torchrun_cli.py")
torchrun_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torchrun_cli)
_spec = importlib.util.spec_from_file_location("killed_run", HERE / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cherrytop.cli")
"""What runs `cherrytop` on 2 processes, after the Python interpreter."""


def args(tmp_path: Path, strategy: str, episodes: int, name: str, *flags: str) -> list[str]:
    """`cherrytop ppo`'s arguments for run `name` on the inputs `inputs` wrote."""
    return ["ppo", "--preset", "test", f"--run.out_dir={tmp_path}", f"--run.name={name}", f"--ppo.init={tmp_path / 'base'}",
            f"--ppo.reward_model={tmp_path / 'rm'}", f"--ppo.prompts={tmp_path / 'prompts.jsonl'}",
            f"--ppo.episodes={episodes}", "--ppo.batch_size=4", "--ppo.minibatch_size=4", "--ppo.micro_batch_size=1",
            "--ppo.ppo_epochs=2", "--ppo.max_new_tokens=6", "--ppo.save_every=1", "--ppo.ema=0.9", "--ppo.lr=1e-3",
            f"--dist.strategy={strategy}", *flags]


def ppo(tmp_path: Path, strategy: str, episodes: int, name: str, *flags: str) -> str:
    """Run `cherrytop ppo` under torchrun as run `name`; its stderr (rank 0's console)."""
    r = subprocess.run([sys.executable, *TORCHRUN, *args(tmp_path, strategy, episodes, name, *flags)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def likely_eos(base: Path, shift: float = 3.0) -> None:
    """Raise the model's EOS logit by about `shift` at every position (through the final layer norm's bias,
    the output layer being the tied embeddings), so that some sampled answers end within a few tokens: an
    answer without EOS scores `ppo.no_eos_penalty` whatever it says, and groups of such answers teach GRPO
    nothing."""
    model = AutoModelForCausalLM.from_pretrained(base)
    e = model.lm_head.weight[model.config.eos_token_id].detach()
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(shift * e / e.dot(e))
    model.save_pretrained(base)


def inputs(tmp_path: Path, algorithm: str) -> Path:
    """The policy's start (`base`, returned), a reward model made from it and 8 prompts, under `tmp_path`."""
    base = torchrun_cli.chatml_gpt2(tmp_path)
    if algorithm != "ppo":
        likely_eos(base)
    from cherrytop.model.heads import scalar_model_from
    torch.manual_seed(0)
    scalar_model_from(base, 0).save_pretrained(tmp_path / "rm")  # a reward model: the trunk and a random head
    questions = ["what is 12 plus 3 ?", "what is 3 plus 12 ?", "is it 15 ?", "what is 12 ?"]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions * 2))
    return base


@pytest.mark.slow
@pytest.mark.parametrize("strategy, adapters, algorithm", [("ddp", False, "ppo"), ("fsdp", False, "ppo"),
                                                          ("fsdp", True, "ppo"), ("ddp", False, "grpo"),
                                                          ("fsdp", False, "grpo")],
                         ids=["ddp", "fsdp", "fsdp-lora", "ddp-grpo", "fsdp-grpo"])
def test_ppo_under_torchrun_trains_saves_and_resumes(tmp_path, strategy, adapters, algorithm):
    """PPO, and GRPO (2 answers per prompt, one group per process; no value model, so no `value/`)."""
    base = inputs(tmp_path, algorithm)
    name = strategy + "-lora" * adapters + f"-{algorithm}"
    flags = (["--lora.r=4", "--lora.alpha=8"] if adapters else []) + (
        [f"--rl.algorithm={algorithm}", "--rl.group_size=2"] if algorithm != "ppo" else [])
    log = tmp_path / name / "logs/ppo.jsonl"
    assert "resuming" not in ppo(tmp_path, strategy, 8, name, *flags)  # 2 iterations of 4 episodes, 2 per process
    ckpt = tmp_path / name / "ppo"
    first, first_rows = load_state(ckpt), log.read_text().splitlines()
    assert first["iteration"] == 2 and len(first_rows) == 2
    assert "resuming at iteration 2 of 3" in ppo(tmp_path, strategy, 12, name, *flags)
    state = load_state(ckpt)
    assert state["iteration"] == 3
    rows = log.read_text().splitlines()
    assert rows[:2] == first_rows  # kept as they were (timings included): not trained again
    rows = [json.loads(r) for r in rows]
    assert [r["step"] for r in rows] == [4, 8, 12]  # rank 0 alone logs, by episode
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert 0 <= r["rollout/eos_rate"] <= 1 and r["rollout/length"] > 0
    assert distributed.has_shards(ckpt) == (strategy == "fsdp")
    policy = AutoModelForCausalLM.from_pretrained(ckpt)  # the weight average, a plain HF folder
    if algorithm == "ppo":
        AutoModelForSequenceClassification.from_pretrained(ckpt / "value")
    else:  # no value model trained, none saved (nor sharded beside the policy's)
        assert not (ckpt / "value").exists() and not list(ckpt.parent.glob(".*value-staged*"))
        assert all("loss/kl" in r and "rollout/equal_groups" in r and not any(k.startswith("value/") for k in r)
                   for r in rows)
    sft = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    moved = [n for n, q in policy.named_parameters() if not torch.equal(q.detach(), sft[n].detach())]
    assert moved  # trained (with LoRA: the adapters, merged)
    if adapters:
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    if strategy == "ddp":  # the live weights sit in the trainer state, trained on after the resume
        assert any(not torch.equal(first["live_policy"][n], state["live_policy"][n]) for n in first["live_policy"])


@pytest.mark.slow  # three 2-process launches each, ~30 s on 2 cores
@pytest.mark.parametrize("strategy, algorithm", [("ddp", "ppo"), ("ddp", "grpo"), ("fsdp", "ppo")])
def test_a_job_killed_mid_run_resumes_to_the_weights_of_one_never_stopped(tmp_path, strategy, algorithm):
    """2 processes, kill -9 of torchrun and both ranks after the checkpoint of iteration 1 (of 3, one
    every iteration), then launched again: the saved policy (the weight average), its live weights (DDP:
    in the trainer state) and the value model are those of a job that never stopped, bit for bit. Each
    rank samples from a stream of its own, so this holds only if every rank's stream is saved and put
    back, not rank 0's alone."""
    from safetensors.torch import load_file
    inputs(tmp_path, algorithm)
    flags = [f"--rl.algorithm={algorithm}", "--rl.group_size=2"] if algorithm != "ppo" else []
    ppo(tmp_path, strategy, 12, "whole", *flags)
    killed = tmp_path / "killed" / "ppo"
    killed_run.kill_after_checkpoint(args(tmp_path, strategy, 12, "killed", *flags), killed, least=1, launcher=TORCHRUN)
    assert load_state(killed)["iteration"] < 3  # killed mid-run
    assert "resuming at iteration" in ppo(tmp_path, strategy, 12, "killed", *flags)
    whole = tmp_path / "whole" / "ppo"
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(whole), load_state(killed)
    assert sa["iteration"] == sb["iteration"] == 3
    if strategy == "ddp":
        assert all(torch.equal(sa["live_policy"][k], sb["live_policy"][k]) for k in sa["live_policy"])
    if algorithm == "ppo":
        a, b = load_file(whole / "value" / "model.safetensors"), load_file(killed / "value" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
