"""Stage 1 — pretraining: next-token prediction over packed windows of the corpus.

Data: the built-in world's corpus (default), or `--pretrain.data` (`read_documents`: a .txt file with
documents separated by blank lines, or JSONL / Parquet / a `datasets` folder of {"text": ...} or
{"messages": [...]} records). The
tokenizer is trained on the same corpus unless `--tokenizer.path` or `--model.path` gives one.
The file's last 2 % of text is held out for the evaluation loss (`split_heldout`); long documents are
tokenized in pieces (`pieces`), so a 50 MB one-line document needs no more memory than many small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cherrytop.config import Config
from cherrytop.data.collate import pack_windows, step_indices
from cherrytop.data.records import DataError, Document, read_documents
from cherrytop.data.tokenizer import load_tokenizer, render, train_tokenizer
from cherrytop.model import lora
from cherrytop.model.load import build_model, context_window, count_params, fit_vocab, load_model
from cherrytop.train import distributed, loop
from cherrytop.train.checkpoint import write_dir_atomically
from cherrytop.train.lm import lm_count, lm_step
from cherrytop.world import World


def corpus(cfg: Config) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents)."""
    if cfg.pretrain.data:
        return split_heldout(read_documents(cfg.pretrain.data), HELDOUT_SHARE)
    world = World(cfg.world)
    return world.corpus("train"), world.corpus("heldout")


HELDOUT_SHARE = 0.02
"""Share of a `--pretrain.data` corpus held out for the evaluation loss, counted in characters: the split
comes before the tokenizer, which is trained on the training part alone (characters track tokens)."""

PIECE_CHARS = 1 << 20
"""Longer texts are tokenized, and the tokenizer trained, in pieces of at most this many characters."""


def _chars(doc: Document) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def split_heldout(docs: list[Document], share: float) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: the corpus's last `share` of characters (at least 1) is held out,
    whole documents from the end, then the tail of the text document where the share runs out, cut at a
    space. A conversation there is not cut: it stays in training, or is held out whole if nothing else is."""
    need = max(1, math.ceil(share * sum(map(_chars, docs))))
    i = len(docs)
    while i > 0 and _chars(docs[i - 1]) <= need:
        i -= 1
        need -= _chars(docs[i])
    if i == 0 or need == 0:
        return docs[:i], docs[i:]
    d = docs[i - 1]
    if not isinstance(d, str):
        return (docs[:i - 1], docs[i - 1:]) if i == len(docs) else (docs[:i], docs[i:])
    cut = d.rfind(" ", 0, len(d) - need + 1)
    cut = cut if cut > 0 else len(d) - need  # no space: cut inside a word
    head, tail = d[:cut].rstrip(), d[cut:].lstrip()
    return docs[:i - 1] + ([head] if head else []), [tail] + docs[i:]


def pieces(text: str, n: int = PIECE_CHARS, keep_space: bool = False) -> Iterator[str]:
    """`text` in pieces of at most n characters, cut before a single space between two non-spaces, the
    space dropped (`keep_space`: kept at the next piece's start): a tokenizer that splits words at spaces
    then gives the pieces the tokens of the whole text. With no such space within n characters, the
    text is cut inside a word."""
    start = 0
    while len(text) - start > n:
        cut = text.rfind(" ", start + 1, start + n)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            yield text[start: start + n]
            start += n
            continue
        yield text[start: cut]
        start = cut if keep_space else cut + 1
    yield text[start:]


def text_pieces(docs: list[Document]) -> list[Document]:
    """The documents with every long text in `pieces` (what the tokenizer is trained on: cherrytop's
    tokenizer prepends a space to each text, so the dropped space comes back and word counts are unchanged)."""
    return [p for d in docs for p in (pieces(d) if isinstance(d, str) else (d,))]


def get_tokenizer(cfg: Config, docs: list[Document]):
    """The configured tokenizer, or one trained on the corpus and saved under the run."""
    path = cfg.tokenizer.path or cfg.model.path
    if path:
        return load_tokenizer(path)
    saved = Path(cfg.run.out_dir) / cfg.run.name / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    d = distributed.setup(cfg.dist)  # under torchrun rank 0 trains and writes it, the others then load it
    if d.main:
        texts = (doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc) for doc in docs)
        tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        write_dir_atomically(saved, tok.save_pretrained)  # a kill mid-write leaves no half tokenizer to load
    distributed.barrier(d)
    return tok if d.main else load_tokenizer(saved)


def tokenize_documents(tokenizer, docs: list[Document]) -> list[np.ndarray]:
    """Token ids of each document (int32 arrays), tokenized in batches of about PIECE_CHARS characters,
    long documents in `pieces`, so memory does not grow with a document's length beyond its ids."""
    keep = _keeps_space(tokenizer)
    parts: list[list[np.ndarray]] = [[] for _ in docs]
    batch: list[str] = []
    owner: list[int] = []

    def flush() -> None:
        for i, ids in zip(owner, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            parts[i].append(np.asarray(ids, dtype=np.int32))
        batch.clear()
        owner.clear()
    size = 0
    for i, d in enumerate(docs):
        for p in pieces(d if isinstance(d, str) else render(tokenizer, d), PIECE_CHARS, keep):
            if batch and size + len(p) > PIECE_CHARS:
                flush()
                size = 0
            batch.append(p)
            owner.append(i)
            size += len(p)
    if batch:
        flush()
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for p in parts]


def _keeps_space(tokenizer) -> bool:
    """Whether a piece after a cut keeps its leading space to tokenize as the whole text does (GPT-2's
    byte-level BPE) rather than drop it (tokenizers that prepend one: cherrytop's, SentencePiece's)."""
    def ids(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]
    whole = ids("hello world")
    return whole == ids("hello") + ids(" world") or whole != ids("hello") + ids("world")


def window_batches(windows: torch.Tensor, idx) -> loop.Batch:
    x = windows[torch.as_tensor(idx)]
    return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}


def run(cfg: Config, fresh: bool = False) -> dict:
    t = cfg.pretrain
    model = load_model(cfg.model.path) if cfg.model.path else None  # a missing folder fails here, first
    train_docs, held_docs = corpus(cfg)
    tok = get_tokenizer(cfg, text_pieces(train_docs))
    if model is not None and fit_vocab(model, len(tok)):
        loop.console.print(f"pretrain: embeddings grown to the tokenizer's {len(tok)} tokens")
    window = context_window(model.config) if model is not None else cfg.model.max_seq_len
    seq_len = min(t.seq_len, window or t.seq_len)
    if seq_len < t.seq_len:
        loop.console.print(f"pretrain: windows of {seq_len} tokens, the model's context window")
    windows = pack_windows(tokenize_documents(tok, train_docs), seq_len, tok.eos_token_id)  # (N, T)
    held = pack_windows(tokenize_documents(tok, held_docs), seq_len, tok.eos_token_id)  # (M, T)
    if len(windows) < t.batch_size:
        where = f"{t.data}: its training part ({100 - 100 * HELDOUT_SHARE:g} % of the text)" if t.data else "the built-in corpus"
        raise DataError(f"{where} gives only {len(windows)} windows of {seq_len} tokens; "
                        f"expected at least pretrain.batch_size={t.batch_size}")
    if model is None:
        model = build_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, cfg.run.seed)
    loop.console.print(f"pretrain: {count_params(model) / 1e6:.2f}M parameters, vocabulary {len(tok)}, "
                       f"{windows.numel() / 1e6:.2f}M training tokens in {len(windows)} windows")

    def micro_batches(step: int) -> list[loop.Batch]:
        idx = step_indices(len(windows), t.batch_size, step, cfg.run.seed)
        return [window_batches(windows, idx[i: i + t.micro_batch_size]) for i in range(0, t.batch_size, t.micro_batch_size)]

    if len(held) == 0:
        loop.console.print(f"pretrain: the held-out documents fill no window of {seq_len} tokens: no evaluation loss")
    n_eval = min(len(held), t.eval_batches * t.micro_batch_size)
    eval_batches = [window_batches(held, range(i, min(i + t.micro_batch_size, n_eval))) for i in range(0, n_eval, t.micro_batch_size)]
    model = lora.prepare(model, cfg, "pretrain")  # gradient checkpointing if configured (never LoRA)
    stage = loop.Stage("pretrain", model, tok, t, micro_batches, lm_step, lm_count, eval_batches)
    metrics = loop.run(stage, cfg, fresh)
    metrics["uniform_loss"] = math.log(len(tok))
    return metrics
