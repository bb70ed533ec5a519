"""Issue 26, finding 10: pretraining holds out a share of the text, not documents by position; long
documents are tokenized in pieces, with the whole text's tokens and bounded memory; errors name the file."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cherrytop.config import load_config
from cherrytop.data.collate import pack_windows
from cherrytop.data.records import DataError
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.stages import pretrain

WORDS = "the cat sat on a red mat and 12 dogs ran far away , while 7 birds sang .".split()


def words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def test_a_big_first_document_is_not_held_out_whole(tmp_path):
    # before: the first of every 50 documents was held out, here 90 % of the text
    big, small = words(20_000), [words(100, seed=i) for i in range(1, 21)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join([big, *small]) + "\n", encoding="utf-8")
    train, held = pretrain.corpus(load_config("test", [], [f"--pretrain.data={p}"]))
    tok = train_tokenizer(pretrain.text_pieces(train), 300)
    n_train, n_held = (sum(map(len, pretrain.tokenize_documents(tok, d))) for d in (train, held))
    assert 0.015 < n_held / (n_train + n_held) < 0.025  # ~2 % of the tokens
    assert held[-1] == small[-1] and train[0] == big  # the file's end, whole documents first
    assert len(pack_windows(pretrain.tokenize_documents(tok, train), 64, tok.eos_token_id)) > 400


def test_a_one_document_corpus_is_split(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("a whole book\nwith single newlines only\n" * 50, encoding="utf-8")
    train, held = pretrain.corpus(load_config("test", [], [f"--pretrain.data={p}"]))
    assert len(train) == len(held) == 1 and train[0].split() + held[0].split() == ("a whole book with single newlines only " * 50).split()
    assert len(held[0]) <= 0.02 * len(train[0]) + 10


def test_too_little_training_text_names_the_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("one short document\n\nand another one\n", encoding="utf-8")
    cfg = load_config("test", [], [f"--pretrain.data={p}", f"--run.out_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=r"tiny\.txt: its training part \(98 % of the text\) gives only 0 windows of 64 "
                                        r"tokens; expected at least pretrain.batch_size=8"):
        pretrain.run(cfg)


def _gpt2_style(texts):
    """A byte-level BPE that does not prepend a space (GPT-2's): a piece keeps its leading space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind", ["cherrytop", "gpt2"])
def test_long_documents_tokenize_in_pieces_as_a_whole(monkeypatch, kind):
    text = words(30_000) + "  two  spaces " + words(30_000, seed=1)
    tok = train_tokenizer([text], 300) if kind == "cherrytop" else _gpt2_style([text])
    monkeypatch.setattr(pretrain, "PIECE_CHARS", 4000)
    ids = pretrain.tokenize_documents(tok, [text, "a short one"])
    assert ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[1].tolist() == tok("a short one", add_special_tokens=False)["input_ids"]
    parts = list(pretrain.pieces(text, 4000))
    assert len(parts) > 40 and max(map(len, parts)) <= 4000 and " ".join(parts) == text
    if kind == "cherrytop":  # the tokenizer trained on pieces is the one trained on the whole text
        assert train_tokenizer(parts, 300).get_vocab() == tok.get_vocab()


def test_a_long_one_line_document_needs_little_memory(tmp_path):
    """Peak RSS added by tokenizing and packing a 4 MB one-line document, in a fresh process (before:
    375 MB; bench/pretrain_data_rss.py measures 50 MB)."""
    p = tmp_path / "one_line.txt"
    p.write_text(words(800_000) + "\n", encoding="utf-8")
    child = textwrap.dedent(f"""
        import resource
        from cherrytop.config import load_config
        from cherrytop.data.collate import pack_windows
        from cherrytop.data.tokenizer import train_tokenizer
        from cherrytop.stages import pretrain
        train, held = pretrain.corpus(load_config("test", [], ["--pretrain.data={p}"]))
        tok = train_tokenizer(pretrain.text_pieces(train), 300)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        windows = pack_windows(pretrain.tokenize_documents(tok, train), 64, tok.eos_token_id)
        print(len(windows), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.split()
    n_windows, grown_mib = int(out[0]), int(out[1])
    assert n_windows > 15_000 and grown_mib < 200, out
