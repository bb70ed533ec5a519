"""LoRA: the PPO reference (the policy with its adapter off) is the base model exactly; the merged
checkpoint (and peft's own loading of `adapter/`) gives the adapted model's outputs, for Llama and
GPT-2 (Conv1D) layouts and a reward model's score head; a LoRA run resumes on the same curve; and
SFT -> RM -> PPO run with LoRA through the real entry point on a local model with its own template."""

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cherrytop.cli import main
from cherrytop.config import load_config
from cherrytop.model import lora
from cherrytop.model.heads import scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.rollout.episodes import reward
from cherrytop.train import loop

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("dp_worker", HERE / "worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def lora_cfg(arch="llama", **over):
    return load_config("test", [], [f"--model.arch={arch}", "--lora.r=4", "--lora.alpha=8"] + [f"--{k}={v}" for k, v in over.items()])


def tiny_mixtral():
    """A mixture-of-experts model: its experts are stacked 3-D parameters, not linear layers."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=64))


def adapted(arch):
    cfg = lora_cfg("llama" if arch == "mixtral" else arch)
    base = (tiny_mixtral() if arch == "mixtral" else build_model(cfg.model, 40, 0, 1, seed=0)).eval()
    policy = lora.attach(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)  # a trained adapter (a fresh one is zero)
    return base, policy.eval()


IDS = torch.tensor([[3, 7, 11, 5, 9, 2, 30], [4, 4, 8, 15, 16, 23, 39]])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_reference_is_the_base_model_exactly(arch):
    base, policy = adapted(arch)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    ref = lora.Reference(policy).eval().requires_grad_(False)
    with torch.no_grad():
        want = base(input_ids=IDS).logits
        adapted_logits = policy(input_ids=IDS).logits
        assert torch.equal(ref(input_ids=IDS).logits, want)  # bit-exact: the adapter branch is skipped
        assert not torch.allclose(adapted_logits, want, atol=1e-3)
        assert torch.equal(policy(input_ids=IDS).logits, adapted_logits)  # adapter back on afterwards
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_merged_checkpoint_gives_the_adapted_logits(tmp_path, arch):
    base, policy = adapted(arch)
    if arch == "mixtral":  # peft adapts the stacked experts (and the router) too: they must merge like linear layers
        assert any(".experts." in n and ".lora_" in n for n, _ in policy.named_parameters())
    lora.save_merged(policy, tmp_path)
    with torch.no_grad():
        want = policy(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=1e-4, atol=1e-5)
        served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / lora.ADAPTER).eval()  # peft's own loader
        torch.testing.assert_close(served(input_ids=IDS).logits, want, rtol=1e-4, atol=1e-5)
    sd = policy.state_dict()  # `cherrytop convert` merges shards with the meta written to adapter/: the same weights
    for k, v in lora.merge_state_dict(sd, lora._adapter_meta(policy)).items():
        assert torch.equal(lora.merge_state_dict(sd, tmp_path / lora.ADAPTER)[k], v), k


def test_lora_on_a_layer_that_cannot_merge_stops_before_training():
    base = build_model(lora_cfg().model, 40, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"model.embed_tokens \(Embedding\) cannot be merged"):
        lora.attach(base, lora_cfg(**{"lora.targets": '["embed_tokens"]'}))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = lora_cfg(**{"dist.grad_checkpointing": "true", "lora.r": 0})
    plain = build_model(cfg.model, 40, 0, 1, seed=0)
    ckpt = lora.prepare(copy.deepcopy(plain), cfg, "sft")
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for m in (plain, ckpt):
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_reward_model_with_lora_keeps_its_trained_head(tmp_path):
    cfg = lora_cfg()
    build_model(cfg.model, 40, 0, 1, seed=0).save_pretrained(tmp_path / "sft")
    rm = lora.prepare(scalar_model_from(tmp_path / "sft", 0), cfg, "rm", heads=("score",))
    assert rm.score.weight.requires_grad and not any(".lora_" in n for n, _ in rm.score.named_parameters())
    with torch.no_grad():
        rm.score.weight.add_(1.0)
        for n, p in rm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    lora.save_merged(rm, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    served = PeftModel.from_pretrained(scalar_model_from(tmp_path / "sft", 0), tmp_path / "rm" / lora.ADAPTER).eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        want = reward(rm.eval(), IDS, mask)
        torch.testing.assert_close(reward(plain, IDS, mask), want, rtol=1e-4, atol=1e-5)
        # peft's own loader on the SFT model gives the trained head too (saved as `modules_to_save`)
        torch.testing.assert_close(served(input_ids=IDS).logits, rm(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
    again = lora.prepare(scalar_model_from(tmp_path / "sft", 0), cfg, "rm", heads=("score",))
    lora.load_adapter(again, tmp_path / "rm")  # resume: adapter + head
    for (n, p), q in zip(again.named_parameters(), rm.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_lora_run_resumes_on_the_same_curve(tmp_path):
    def stage(cfg, fail_at=None):
        s = worker.make_stage(cfg, fail_at)
        s.model = lora.prepare(s.model, cfg, "sft")
        return s
    full = with_lora(worker.make_cfg(tmp_path / "full", "none"))
    loop.run(stage(full), full)
    killed = with_lora(worker.make_cfg(tmp_path / "killed", "none"))
    with pytest.raises(KeyboardInterrupt):
        loop.run(stage(killed, fail_at=3), killed)
    resumed = stage(killed)
    loop.run(resumed, killed)
    a, b = worker.curve(tmp_path / "full"), worker.curve(tmp_path / "killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-6)
    assert a[4]["train/loss"] < a[1]["train/loss"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "killed/t/sft").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, resumed.model.eval()(input_ids=IDS).logits,
                                   rtol=1e-4, atol=1e-5)


def with_lora(cfg):
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=4), sft=dataclasses.replace(cfg.sft, lr=0.05))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_llama(tmp_path):
    """A Llama-style model folder with its own tokenizer and ChatML template, built locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cherrytop.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "it is 15 .", "no idea ."] * 30, 320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    out = tmp_path / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_sft_rm_ppo_with_lora_on_a_local_model(tmp_path):
    base = chatml_llama(tmp_path)
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    answers = ["12 plus 3 is 15 .", "it is 15 .", "no idea .", "12 plus 3 is 12 ."]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps({"messages": q + [{"role": "assistant", "content": answers[0]}]}) + "\n"
                                                  for _ in range(16)))
    (tmp_path / "comps.jsonl").write_text("".join(json.dumps({"prompt": {"messages": q}, "responses": answers,
                                                              "ranking": [0, 1, 3, 2]}) + "\n" for _ in range(12)))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": "what is 12 plus 3 ?"}) + "\n" for _ in range(16)))
    common = ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", "--lora.r=4", "--lora.alpha=8"]
    run = tmp_path / "runs/test"
    assert main(["sft", *common, f"--model.path={base}", f"--sft.data={tmp_path / 'demos.jsonl'}", "--sft.max_steps=3",
                 "--sft.lr=0.02"]) == 0
    sft = AutoModelForCausalLM.from_pretrained(run / "sft")
    start = AutoModelForCausalLM.from_pretrained(base)
    assert torch.equal(sft.model.embed_tokens.weight, start.model.embed_tokens.weight)  # frozen base
    assert not torch.equal(sft.model.layers[0].self_attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)
    assert (run / "sft" / lora.ADAPTER / "adapter_model.safetensors").is_file()
    assert main(["rm", *common, f"--rm.train.data={tmp_path / 'comps.jsonl'}", "--rm.epochs=0"]) == 0
    AutoModelForSequenceClassification.from_pretrained(run / "rm")
    assert main(["ppo", *common, f"--ppo.prompts={tmp_path / 'prompts.jsonl'}", "--ppo.lr=0.01"]) == 0
    rows = [json.loads(r) for r in (run / "logs/ppo.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert abs(rows[0]["objective/kl"]) < 1e-4  # first rollout: adapter zero, so policy = reference (adapter off)
    assert rows[1]["objective/kl"] != 0.0  # the adapter trained
    ppo = AutoModelForCausalLM.from_pretrained(run / "ppo")
    assert torch.equal(ppo.model.embed_tokens.weight, start.model.embed_tokens.weight)
    AutoModelForSequenceClassification.from_pretrained(run / "ppo" / "value")
