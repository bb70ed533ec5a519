"""Any local Hugging Face causal LM with its own chat template works: a Qwen2-style model with a
ChatML template and a GPT-2-style model, built locally, go through SFT, generation and eval."""

import json

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from cherrytop.cli import main
from cherrytop.data.tokenizer import encode_conversation, train_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_model(tmp_path, arch):
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "reverse the words : a b ."] * 30, 320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    out = tmp_path / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_local_model_with_its_own_template(tmp_path, arch, capsys):
    path, tok = chatml_model(tmp_path, arch)
    msgs = [{"role": "user", "content": "what is 12 plus 3 ?"}, {"role": "assistant", "content": "12 plus 3 is 15 ."}]
    ids, labels = encode_conversation(tok, msgs, 128)
    assert tok.decode([t for t in labels if t != -100]).startswith("12 plus 3 is 15 .<|im_end|>")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(16)) + "\n")
    common = ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}"]
    assert main(["sft", *common, f"--model.path={path}", f"--sft.data={demos}", "--sft.max_steps=3", "--sft.lr=0.01"]) == 0
    ckpt = tmp_path / "runs" / "test" / "sft"
    AutoModelForCausalLM.from_pretrained(ckpt)
    losses = [json.loads(r)["train/loss"] for r in (tmp_path / "runs/test/logs/sft.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert main(["generate", *common, "--checkpoint", str(ckpt), "--prompt", "what is 12 plus 3 ?"]) == 0
    assert "> what is 12 plus 3 ?" in capsys.readouterr().out
