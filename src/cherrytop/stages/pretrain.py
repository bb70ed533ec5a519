"""Stage 1 — pretraining: next-token prediction over packed windows of the corpus.

Data: the built-in world's corpus (default), or `--pretrain.data` (`read_documents`: a .txt file with
documents separated by blank lines, or JSONL / Parquet / a `datasets` folder of {"text": ...} or
{"messages": [...]} records). The
tokenizer is trained on the same corpus unless `--tokenizer.path` or `--model.path` gives one.
"""

from __future__ import annotations

import math
from pathlib import Path

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
        docs = read_documents(cfg.pretrain.data)
        if len(docs) < 2:
            raise DataError(f"{cfg.pretrain.data}: only 1 document; expected at least 2 (one in 50, at least one, "
                            "is held out for the evaluation loss; in a .txt file a blank line separates documents)")
        n_held = max(1, len(docs) // 50)
        return docs[n_held:], docs[:n_held]
    world = World(cfg.world)
    return world.corpus("train"), world.corpus("heldout")


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


def tokenize_documents(tokenizer, docs: list[Document]) -> list[list[int]]:
    texts = [d if isinstance(d, str) else render(tokenizer, d) for d in docs]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def window_batches(windows: torch.Tensor, idx) -> loop.Batch:
    x = windows[torch.as_tensor(idx)]
    return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}


def run(cfg: Config, fresh: bool = False) -> dict:
    t = cfg.pretrain
    model = load_model(cfg.model.path) if cfg.model.path else None  # a missing folder fails here, first
    train_docs, held_docs = corpus(cfg)
    tok = get_tokenizer(cfg, train_docs)
    if model is not None and fit_vocab(model, len(tok)):
        loop.console.print(f"pretrain: embeddings grown to the tokenizer's {len(tok)} tokens")
    window = context_window(model.config) if model is not None else cfg.model.max_seq_len
    seq_len = min(t.seq_len, window or t.seq_len)
    if seq_len < t.seq_len:
        loop.console.print(f"pretrain: windows of {seq_len} tokens, the model's context window")
    windows = pack_windows(tokenize_documents(tok, train_docs), seq_len, tok.eos_token_id)  # (N, T)
    held = pack_windows(tokenize_documents(tok, held_docs), seq_len, tok.eos_token_id)  # (M, T)
    if len(windows) < t.batch_size:
        raise DataError(f"the corpus gives only {len(windows)} windows of {seq_len} tokens; "
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
