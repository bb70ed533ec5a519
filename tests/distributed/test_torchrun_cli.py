"""The real entry point under torchrun: `cherrytop sft` (FSDP2) and `cherrytop rm` (DDP) on 2 CPU
processes (gloo) with a local GPT-2-style model and its own chat template give the single process's
loss curve, and a final checkpoint plain transformers loads. Slow (two torchrun launches)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


HERE = Path(__file__).parent


def chatml_gpt2(tmp_path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cherrytop.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "it is 15 .", "no idea ."] * 30, 320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout draws differ per rank
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def losses(run: Path, stage: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "logs" / f"{stage}.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_sft_fsdp_and_rm_ddp_under_torchrun(tmp_path):
    base = chatml_gpt2(tmp_path)
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    answers = ["12 plus 3 is 15 .", "it is 15 .", "no idea .", "12 plus 3 is 12 ."]
    demos, comps = tmp_path / "demos.jsonl", tmp_path / "comps.jsonl"
    demos.write_text("".join(json.dumps({"messages": q + [{"role": "assistant", "content": a}]}) + "\n" for a in answers * 6))
    comps.write_text("".join(json.dumps({"prompt": {"messages": q}, "responses": answers, "ranking": r}) + "\n"
                             for r in ([0, 1, 3, 2], [1, 0, 2, 3]) * 8))
    args = {"sft": ["sft", f"--model.path={base}", f"--sft.data={demos}", "--sft.max_steps=4", "--sft.save_every=2",
                    "--sft.micro_batch_size=2", "--sft.lr=0.01"],
            "rm": ["rm", f"--rm.train.data={comps}", "--rm.epochs=0", "--rm.train.micro_batch_size=2"]}
    for name, strategy in (("single", None), ("multi", "fsdp")):
        common = ["--preset", "test", f"--run.out_dir={tmp_path}", f"--run.name={name}"]
        for stage in ("sft", "rm"):  # fresh processes both ways (the reward head's init draws from the global RNG)
            launcher = [sys.executable]
            extra = []
            if strategy is not None:
                launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                extra = [f"--dist.strategy={'fsdp' if stage == 'sft' else 'ddp'}"]
            cmd = [*launcher, "-m", "cherrytop.cli", *args[stage][:1], *common, *args[stage][1:], *extra]
            r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
            assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("sft", "rm"):
        a, b = losses(tmp_path / "single", stage), losses(tmp_path / "multi", stage)
        assert sorted(a) == sorted(b) and a
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), (stage, step)
    AutoModelForCausalLM.from_pretrained(tmp_path / "multi/sft")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "multi/rm")


@pytest.mark.slow
def test_rm_with_lora_under_torchrun_keeps_its_adapter(tmp_path):
    """Rank 0 rewrites the reward model's checkpoint from its plain weights after training (the bias,
    the held-out accuracy); the LoRA adapter the loop wrote, with the trained head, stays in it."""
    import torch
    from peft import PeftModel

    from cherrytop.cli import main
    from cherrytop.model.heads import scalar_model_from
    base = chatml_gpt2(tmp_path)
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    answers = ["12 plus 3 is 15 .", "it is 15 .", "no idea .", "12 plus 3 is 12 ."]
    comps = tmp_path / "comps.jsonl"
    comps.write_text("".join(json.dumps({"prompt": {"messages": q}, "responses": answers, "ranking": [0, 1, 3, 2]}) + "\n"
                             for _ in range(8)))
    common = ["--preset", "test", f"--run.out_dir={tmp_path}", "--run.name=lora", "--lora.r=4"]
    assert main(["sft", *common, f"--model.path={base}", "--sft.max_steps=1"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cherrytop.cli",
           "rm", *common, f"--rm.train.data={comps}", "--rm.epochs=0", "--rm.train.micro_batch_size=2", "--dist.strategy=ddp"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rm = tmp_path / "lora/rm"
    served = PeftModel.from_pretrained(scalar_model_from(tmp_path / "lora/sft", 0), rm / "adapter").eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 2, 30]])
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits,
                                   AutoModelForSequenceClassification.from_pretrained(rm)(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_under_torchrun_gives_the_single_process_loss_curve(tmp_path, strategy):
    """`cherrytop dpo` on 2 gloo processes: each rank scores its share of the prompts' K answers; the
    global loss per step equals one process's, and the final checkpoint loads in plain transformers."""
    base = chatml_gpt2(tmp_path)
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    answers = ["12 plus 3 is 15 .", "it is 15 .", "no idea .", "12 plus 3 is 12 ."]
    comps = tmp_path / "comps.jsonl"
    comps.write_text("".join(json.dumps({"prompt": {"messages": q}, "responses": answers, "ranking": r, "ties": t}) + "\n"
                             for r, t in (([0, 1, 3, 2], []), ([1, 0, 2, 3], [[2, 3]])) * 8))
    for name, launcher in (("single", [sys.executable]),
                           ("multi", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        cmd = [*launcher, "-m", "cherrytop.cli", "dpo", "--preset", "test", f"--run.out_dir={tmp_path}", f"--run.name={name}",
               f"--dpo.train.init={base}", f"--dpo.train.data={comps}", "--dpo.epochs=0", "--dpo.train.max_steps=4",
               "--dpo.train.lr=0.01", *([f"--dist.strategy={strategy}"] if name == "multi" else [])]
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "single", "dpo"), losses(tmp_path / "multi", "dpo")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert a[4] < a[1]
    AutoModelForCausalLM.from_pretrained(tmp_path / "multi/dpo")
