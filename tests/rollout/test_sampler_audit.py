"""Greedy decoding of a left-padded batch against Hugging Face `generate` on the same padded batch, and
`generate`'s answers in the prompts' order whatever their lengths."""

import pytest

from cherrytop.config import ModelConfig
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.model.load import build_model
from cherrytop.rollout.sampler import generate

EOS, PAD = 1, 0


def test_generate_answers_in_order_and_batched_like_one_at_a_time():
    texts = [f"the {w} is {n} ." for w in ("cat", "dog", "hill") for n in range(20)]
    tok = train_tokenizer(texts, 280, min_frequency=1)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=96), len(tok),
                        tok.pad_token_id, tok.eos_token_id, seed=4).eval()
    prompts = [[{"role": "user", "content": t}] for t in ("the cat is 3 . the dog is 4 . the hill", "dog", "the hill is 12 .")]
    batched = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0, batch_size=3)
    assert batched == [generate(model, tok, [p], max_new_tokens=8, temperature=0.0)[0] for p in prompts]


def test_fit_history_drops_the_oldest_turns_so_a_long_chat_keeps_fitting_the_context_window():
    """`cherrytop chat` sends the whole history: past the context window `generate` stops with an error
    (which ended the chat session); `fit_history` drops the oldest turns, keeps the system message, and
    names a single message that is too long by its token count."""
    from cherrytop.data.tokenizer import encode_prompt
    from cherrytop.rollout.sampler import fit_history
    texts = [f"the {w} is {n} ." for w in ("cat", "dog", "hill") for n in range(20)]
    tok = train_tokenizer(texts, 280, min_frequency=1)
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=48), len(tok),
                        tok.pad_token_id, tok.eos_token_id, seed=0).eval()
    history = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        history += [{"role": "user", "content": f"the cat is {i} ."}, {"role": "assistant", "content": f"the dog is {i} ."}]
    history.append({"role": "user", "content": "the hill is 7 ."})
    assert len(encode_prompt(tok, history)) > 48
    with pytest.raises(ValueError, match=r"prompt 2 \(of 3\) is \d+ tokens with the chat template and does not fit "
                                         r"the model's context window of 48 tokens"):  # before: no word of which one
        generate(model, tok, [history[-1:], history, history[-3:]], max_new_tokens=4, temperature=0.0)
    fitted = fit_history(tok, history, 48, room=4)
    assert fitted[0] == history[0] and fitted[-1] == history[-1] and fitted[1]["role"] == "user"
    assert fitted == [history[0]] + history[len(history) - len(fitted) + 1:]  # the newest turns, in order
    assert len(encode_prompt(tok, fitted)) <= 44 < len(encode_prompt(tok, [history[0]] + history[-len(fitted) - 1:]))
    assert len(generate(model, tok, [fitted], max_new_tokens=4, temperature=0.0)) == 1
    with pytest.raises(ValueError, match=r"this message is \d+ tokens .*context window of 48 tokens takes at most 44"):
        fit_history(tok, [{"role": "user", "content": " ".join(["hill"] * 60)}], 48, room=4)
    assert fit_history(tok, history, None) == history
