"""Any local Hugging Face causal LM with its own chat template works: a Qwen2-style model with a
ChatML template and a GPT-2-style model, built locally, go through SFT, generation and eval; and
what such models bring is handled: an EOS that is not the template's end of turn, a short context
window, a tokenizer with added tokens, a template that refuses a conversation."""

import json

import pytest
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

from cherrytop.cli import main
from cherrytop.data.records import Comparison, Message
from cherrytop.data.tokenizer import encode_conversation, train_tokenizer
from cherrytop.stages.reward import encode_group

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_model(tmp_path, arch, eos="<|im_end|>"):
    """A model folder with a ChatML template; `eos="<|endoftext|>"` makes it a base model's tokenizer,
    whose EOS is not the token that ends a turn (as Qwen's base models ship)."""
    tok = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "reverse the words : a b ."] * 30, 320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.eos_token = eos
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


def test_a_base_models_eos_becomes_the_templates_end_of_turn(tmp_path):
    path, _ = chatml_model(tmp_path, "qwen2", eos="<|endoftext|>")
    demos = tmp_path / "demos.jsonl"
    demo = {"messages": [{"role": "user", "content": "what is 12 plus 3 ?"}, {"role": "assistant", "content": "15 ."}]}
    demos.write_text((json.dumps(demo) + "\n") * 16)
    assert main(["sft", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--model.path={path}",
                 f"--sft.data={demos}", "--sft.max_steps=1"]) == 0
    ckpt = tmp_path / "runs" / "test" / "sft"
    tok = AutoTokenizer.from_pretrained(ckpt)  # what serve, PPO and plain transformers read back
    assert tok.eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(ckpt).generation_config.eos_token_id == tok.eos_token_id


def test_reward_model_reads_each_answer_at_its_eos(tmp_path):
    # ChatML puts "\n" after <|im_end|>: the head must be read at <|im_end|>, where PPO's samples end
    _, tok = chatml_model(tmp_path, "qwen2")
    comp = Comparison((Message("user", "what is 12 plus 3 ?"),), ("12 plus 3 is 15 .", "i do not know ."), (0, 1))
    for ids, answer in zip(encode_group(tok, comp, 64), comp.responses):
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids).endswith(answer + "<|im_end|>")


def test_a_short_context_model_gets_rows_that_fit_it(tmp_path, capsys):
    """GPT-2 style, 32 positions, a tokenizer without chat template or pad: every stage keeps its rows
    within the 32 positions, and a PPO prompt too long for them is named in one line."""
    backend = train_tokenizer(["what is 12 plus 3 ?", "12 plus 3 is 15 .", "i do not know ."] * 30, 320).backend_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                       eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    long = " ".join(["what is 12 plus 3 ?"] * 4)
    demos, comps, prompts = tmp_path / "demos.jsonl", tmp_path / "comps.jsonl", tmp_path / "prompts.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": "12 plus 3 is 15 ."}]}) + "\n"
                             for q in ["what is 12 plus 3 ?", long] * 8))
    comps.write_text("".join(json.dumps({"prompt": q, "chosen": "12 plus 3 is 15 .", "rejected": "i do not know ."}) + "\n"
                             for q in ["what is 12 plus 3 ?", long] * 8))
    prompts.write_text(json.dumps({"prompt": "what is 12 plus 3 ?"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    (tmp_path / "corpus.txt").write_text("\n\n".join([long] * 64))
    common = ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--model.path={tmp_path / 'gpt2'}"]
    assert main(["pretrain", *common, f"--pretrain.data={tmp_path / 'corpus.txt'}", "--pretrain.seq_len=64",
                 "--pretrain.max_steps=1"]) == 0
    assert main(["sft", *common, f"--sft.data={demos}", "--sft.seq_len=160", "--sft.max_steps=1"]) == 0
    assert main(["rm", *common, f"--rm.train.data={comps}", "--rm.train.seq_len=160", "--rm.epochs=0",
                 "--rm.train.max_steps=1"]) == 0
    capsys.readouterr()
    assert main(["ppo", *common, f"--ppo.prompts={prompts}", "--ppo.max_new_tokens=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}:2: prompt of ") and "\n" not in err
    assert err.endswith("too long for the model's context window of 32 with ppo.max_new_tokens=10; "
                        "expected prompts of at most 22 tokens")


def test_a_tokenizer_with_added_tokens_grows_the_embeddings(tmp_path):
    path, tok = chatml_model(tmp_path, "qwen2")
    tok.add_tokens(["zorvan", "quux"])
    tok.save_pretrained(tmp_path / "tok")
    demos = tmp_path / "demos.jsonl"
    demo = {"messages": [{"role": "user", "content": "who is zorvan ?"}, {"role": "assistant", "content": "zorvan is quux ."}]}
    demos.write_text((json.dumps(demo) + "\n") * 16)
    assert main(["sft", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--model.path={path}",
                 f"--tokenizer.path={tmp_path / 'tok'}", f"--sft.data={demos}", "--sft.max_steps=1"]) == 0
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "test" / "sft")
    assert sft.get_input_embeddings().num_embeddings == len(tok)


def test_a_conversation_the_chat_template_refuses_is_named_by_its_line(tmp_path, capsys):
    path, tok = chatml_model(tmp_path, "qwen2")
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHATML)  # as Gemma's template does
    tok.save_pretrained(path)
    demo = {"messages": [{"role": "user", "content": "what is 12 plus 3 ?"}, {"role": "assistant", "content": "15 ."}]}
    with_system = {"messages": [{"role": "system", "content": "be brief"}, *demo["messages"]]}
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps(d) for d in [demo, demo, with_system, demo]) + "\n")
    assert main(["sft", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--model.path={path}",
                 f"--sft.data={demos}", "--sft.max_steps=1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {demos}:3: the chat template refuses a conversation of system, user, assistant: System role not "
        "supported; expected conversations the model's chat template accepts")
