"""The tokenizer: a byte-level BPE trained with `tokenizers` (digits split one per token), saved as a
Hugging Face tokenizer with a chat template; and the assistant-only mask for any HF chat template.

The chat template wraps every message as ``<|role|>content<|end|>``; ``<|end|>`` is the EOS token,
so it closes each assistant turn and is part of what the assistant learns to produce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import jinja2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, EOS, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TemplateError(ValueError):
    """A chat template that refuses a conversation, or cannot give an assistant-only mask (not prefix-stable)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`; digits are split one per token so arithmetic stays learnable.

    A space is prepended to every text segment (each message's content, between special tokens), so
    a word is the same token at the start of a message as inside it: an answer that copies a word
    from the prompt copies the very same token (decoded text then starts with that space).
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Prepend(" ")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS.values()))
    fast.chat_template = CHAT_TEMPLATE
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A folder holds a tokenizer if it has one of these (what `save_pretrained` writes)."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any local HF tokenizer folder, set up for the recipe:
    - a tokenizer without a chat template gets ours, each turn closed by its own EOS;
    - EOS becomes the special token that closes an assistant turn in the chat template when that is
      another one (ChatML's <|im_end|> where EOS is <|endoftext|>, Llama 3's <|eot_id|>): the token
      SFT teaches the assistant to end with is the one sampling stops at;
    - a tokenizer without a pad token pads with its original EOS."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: tokenizer folder not found")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{p}: no tokenizer in this folder; expected one of {', '.join(TOKENIZER_FILES)} "
                                "(save the tokenizer with the model, or give --tokenizer.path DIR)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{p}: transformers cannot load this tokenizer ({type(e).__name__}: {first}); "
                         "expected a tokenizer saved by save_pretrained") from e
    if tok.eos_token is None:
        raise ValueError(f"{p}: the tokenizer has no EOS token; expected an eos_token in tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE.replace(EOS, "{{ eos_token }}")
    end = end_of_turn(tok)
    if end is not None and end != tok.eos_token:
        tok.eos_token = end
    return tok


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The first special token after the assistant's text in the chat template's assistant turn, or
    None (no special token there, or a template that does not render a plain user-assistant exchange)."""
    probe = "cherrytop"
    try:
        text, spans = assistant_spans(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    except TemplateError:
        return None
    turn = text[spans[0][0]: spans[0][1]]
    if probe not in turn:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(turn[turn.index(probe) + len(probe):], add_special_tokens=False)["input_ids"]
    return next((tokenizer.convert_ids_to_tokens(i) for i in ids if i in special), None)


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it; a template that refuses it (e.g. Gemma's
    "System role not supported") raises TemplateError."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        roles = ", ".join(m["role"] for m in messages)
        raise TemplateError(f"the chat template refuses a conversation of {roles}: {e}") from None


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, followed by the assistant header."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def split_response(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[dict], response: str,
                   max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as the chat template renders prompt + answer. The response runs up
    to and including its first EOS (what a policy samples); the prompt is cut from the left so both
    fit in `max_len` tokens (at least one prompt token stays)."""
    full = tokenizer(render(tokenizer, [*prompt, {"role": "assistant", "content": response}]),
                     add_special_tokens=False)["input_ids"]
    head = encode_prompt(tokenizer, prompt)
    if full[: len(head)] != head:
        raise TemplateError("the chat template does not render the prompt (with the generation prompt) as a "
                            "prefix of prompt + answer, so the answer's tokens cannot be told apart")
    resp = full[len(head):]
    if tokenizer.eos_token_id in resp:
        resp = resp[: resp.index(tokenizer.eos_token_id) + 1]
    return head[max(0, len(head) - max(1, max_len - len(resp))):], resp


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes (content + end marker).

    Works with any HF chat template that is prefix-stable: rendering the first i messages (with the
    generation prompt) must be a prefix of rendering all of them. Span i runs from the end of
    render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]).
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering a conversation's first turns is not a "
                "prefix of rendering all of it), so assistant tokens cannot be masked reliably; use a "
                "template without history-dependent rewriting")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], max_len: int | None,
                        ignore_index: int = -100) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels equal the ids on assistant tokens and `ignore_index` elsewhere.

    A token belongs to the assistant when its first character lies in an assistant span. The result
    is cut to `max_len` tokens (None: not cut).
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [ignore_index] * len(ids)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s < len(spans) and spans[s][0] <= start < spans[s][1] and end > start:
            labels[t] = ids[t]
    return ids[:max_len], labels[:max_len]
