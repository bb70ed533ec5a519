"""Tokenizer round trip, chat template, and the assistant-only mask against a plain reference."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cherrytop.data.tokenizer import (CHAT_TEMPLATE, EOS, TemplateError, encode_conversation, encode_prompt,
                                      load_tokenizer, split_response, train_tokenizer)

TEXTS = ["the pet of zorvan is a cat .", "34 plus 5 is 39 .", "the reverse of cat tree moon is moon tree cat .",
         "i do not know .", "sorry , i can not help with that ."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400, min_frequency=2)


def test_round_trip_and_digits(tok, tmp_path):
    for text in ["the pet of zorvan is a cat .", "what is 1234 plus 56 ?", "Unseen wörds ünïcode ✓ 7"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == " " + text  # the prepended space (see train_tokenizer)
    digits = tok.tokenize("12345")
    assert digits == ["Ġ", *"12345"]  # one token per digit (after the prepended space)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers loads it
    assert again("34 plus 5", add_special_tokens=False)["input_ids"] == tok("34 plus 5", add_special_tokens=False)["input_ids"]
    assert again.eos_token == EOS and again.chat_template == CHAT_TEMPLATE


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello ."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|system|>be kind .<|end|><|user|>hi<|end|><|assistant|>hello .<|end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    alone = tok("be kind .", add_special_tokens=False)["input_ids"]
    inside = tok("zz be kind .", add_special_tokens=False)["input_ids"][-len(alone):]
    assert ids[1: 1 + len(alone)] == alone == inside  # a word opening a message is the same token as inside a sentence
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    ids = encode_prompt(tok, msgs[:2])
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def reference_mask(tok, messages):
    """Plain reference: tokenise message by message and mark the assistant's content + <|end|>."""
    ids, labels = [], []
    for m in messages:
        head = tok(f"<|{m['role']}|>", add_special_tokens=False)["input_ids"]
        body = tok(m["content"] + "<|end|>", add_special_tokens=False)["input_ids"]  # segment gets its space
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, labels


def test_assistant_mask_multi_turn(tok):
    msgs = [{"role": "user", "content": "what is 34 plus 5 ?"}, {"role": "assistant", "content": "34 plus 5 is 39 ."},
            {"role": "user", "content": "and the reverse of cat tree ?"}, {"role": "assistant", "content": "tree cat ."}]
    ids, labels = encode_conversation(tok, msgs, max_len=512)
    ref_ids, ref_labels = reference_mask(tok, msgs)
    assert ids == ref_ids
    assert labels == ref_labels
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == " 34 plus 5 is 39 .<|end|> tree cat .<|end|>"
    short_ids, short_labels = encode_conversation(tok, msgs, max_len=10)
    assert len(short_ids) == len(short_labels) == 10


def test_template_not_prefix_stable_is_refused(tok):
    bad = train_tokenizer(TEXTS, vocab_size=300)
    # a template that rewrites history (drops earlier assistant turns) breaks the mask
    bad.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(TemplateError, match="prefix-stable"):
        encode_conversation(bad, msgs, 64)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def foreign_tokenizer(folder, eos, template=None, specials=()):
    """A tokenizer saved like a downloaded model's: its own EOS, no pad token, optionally a template."""
    backend = train_tokenizer(TEXTS, vocab_size=300).backend_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, additional_special_tokens=list(specials))
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def test_eos_becomes_the_token_that_ends_an_assistant_turn(tmp_path):
    # a Qwen-style base tokenizer: EOS <|endoftext|>, but its template ends each turn with <|im_end|>
    tok = load_tokenizer(foreign_tokenizer(tmp_path / "a", "<|endoftext|>", CHATML, ["<|im_start|>", "<|im_end|>"]))
    assert tok.eos_token == "<|im_end|>"  # what SFT teaches the assistant to end with is what sampling stops at
    assert tok.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "what is 34 plus 5 ?"}, {"role": "assistant", "content": "39 ."}]
    _, labels = encode_conversation(tok, msgs, 64)
    assert tok.eos_token_id in labels
    _, resp = split_response(tok, msgs[:1], "39 .", 64)
    assert tok.decode(resp).strip() == "39 .<|im_end|>"  # ends at EOS, as a sampled response does (not at the "\n" after it)
    tok.save_pretrained(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").eos_token == "<|im_end|>"


def test_a_tokenizer_without_template_closes_turns_with_its_own_eos(tmp_path):
    tok = load_tokenizer(foreign_tokenizer(tmp_path, "<|endoftext|>"))  # GPT-2 style: no template, no pad
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "i do not know ."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|user|>hi<|endoftext|><|assistant|>i do not know .<|endoftext|>"
    _, labels = encode_conversation(tok, msgs, 64)
    assert labels[-1] == tok.eos_token_id


@pytest.mark.parametrize("files, needle", [
    ({"config.json": "{}"}, "no tokenizer in this folder; expected one of tokenizer.json"),
    ({"tokenizer.json": "{not json"}, "transformers cannot load this tokenizer (JSONDecodeError"),
])
def test_a_folder_without_a_usable_tokenizer_says_so_in_one_line(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        load_tokenizer(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ") and needle in str(info.value) and "\n" not in str(info.value)


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    backend = train_tokenizer(TEXTS, vocab_size=300).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        load_tokenizer(tmp_path)
