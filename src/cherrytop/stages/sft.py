"""Stage 3 — supervised fine-tuning on demonstrations, loss on assistant tokens only.

Data: `--sft.data` (JSONL `{"messages": [...]}` or a Hugging Face `datasets` folder), or the
simulated trainers' demonstrations of the built-in world, written to `runs/<name>/data/demos.jsonl`
first and read back through the same reader. One conversation per row by default; `--sft.packing`
packs several into a window. Multi-turn: every assistant turn is trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cherrytop.config import Config
from cherrytop.data.collate import pack_examples, pad_batch, step_indices
from cherrytop.data.records import DataError, locate, read_conversations, write_jsonl
from cherrytop.data.tokenizer import TemplateError, encode_conversation, load_tokenizer
from cherrytop.model import lora
from cherrytop.model.load import context_window, fit_vocab, load_model, resolve_checkpoint
from cherrytop.train import loop
from cherrytop.train.lm import lm_count, lm_step
from cherrytop.world import World


def demonstrations_file(cfg: Config) -> Path:
    """The demonstrations to train on: the configured file, or the world's written to the run."""
    if cfg.sft.data:
        return Path(cfg.sft.data)
    path = Path(cfg.run.out_dir) / cfg.run.name / "data" / "demos.jsonl"
    if not path.is_file():
        demos = World(cfg.world).demonstrations()
        write_jsonl(path, [{"messages": list(m)} for m in demos])
    return path


def init_ref(cfg: Config) -> str:
    """Where SFT starts: `sft.init`, except that with `--model.path` and no pretraining stage in the
    run, it starts from that model."""
    t = cfg.sft
    pretrained = Path(cfg.run.out_dir) / cfg.run.name / "pretrain"
    if cfg.model.path and t.init == "pretrain" and not pretrained.exists():
        return cfg.model.path
    return t.init or cfg.model.path


def encode_all(tokenizer, convs, seq_len: int, path: Path) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each conversation of `path` that keeps an assistant token within `seq_len`; one
    the chat template refuses stops the stage, named by its line. How many were cut to `seq_len`, and
    how many left out for lack of an assistant token within it (the first named), is printed."""
    examples, cut, left_out = [], 0, []
    for i, conv in enumerate(convs):
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        try:
            ids, labels = encode_conversation(tokenizer, messages, None)
        except TemplateError as e:
            raise DataError(str(e), "conversations the model's chat template accepts", locate(path, i)) from None
        cut += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(label != -100 for label in labels[1:]):
            examples.append((ids, labels))
        else:
            left_out.append(i)
    if cut:
        loop.console.print(f"sft: {cut} of {len(convs)} demonstrations cut to sft.seq_len={seq_len} tokens")
    if left_out:
        loop.console.print(f"sft: left out {len(left_out)} of {len(convs)} demonstrations, with no assistant token "
                           f"within {seq_len} tokens (the first at {locate(path, left_out[0])})")
    return examples


def run(cfg: Config, fresh: bool = False) -> dict:
    t = cfg.sft
    init = resolve_checkpoint(init_ref(cfg), cfg)
    tok = load_tokenizer(cfg.tokenizer.path or init)
    base = load_model(init)
    base.generation_config.eos_token_id = tok.eos_token_id  # HF generate() on the checkpoint stops where we do
    base.generation_config.pad_token_id = tok.pad_token_id
    if fit_vocab(base, len(tok)):
        loop.console.print(f"sft: embeddings grown to the tokenizer's {len(tok)} tokens")
    seq_len = min(t.seq_len, context_window(base.config) or t.seq_len)  # a row never runs past the model's positions
    if seq_len < t.seq_len:
        loop.console.print(f"sft: rows cut to {seq_len} tokens, the model's context window")
    model = lora.prepare(base, cfg, "sft")  # LoRA adapters / gradient checkpointing if configured
    path = demonstrations_file(cfg)
    convs = read_conversations(path)
    examples = encode_all(tok, convs, seq_len, path)
    if len(examples) < 2:
        raise DataError(f"{path}: only {len(examples)} usable demonstrations after tokenising to {seq_len} tokens; "
                        "expected at least 2 conversations with an assistant token within sft.seq_len")
    perm = np.random.default_rng(cfg.run.seed).permutation(len(examples))
    n_held = max(1, min(len(examples) // 20, t.eval_batches * t.micro_batch_size))
    held = [examples[i] for i in perm[:n_held]]
    train = [examples[i] for i in perm[n_held:]]
    if t.packing:
        train = pack_examples(train, seq_len)
    loop.console.print(f"sft: {len(train)} training rows from {len(convs)} demonstrations in {path} "
                       f"({len(held)} held out), init {init}")

    def micro_batches(step: int) -> list[loop.Batch]:
        idx = step_indices(len(train), t.batch_size, step, cfg.run.seed)
        return [pad_batch([train[i] for i in idx[j: j + t.micro_batch_size]], tok.pad_token_id)
                for j in range(0, t.batch_size, t.micro_batch_size)]

    eval_batches = [pad_batch(held[i: i + t.micro_batch_size], tok.pad_token_id) for i in range(0, len(held), t.micro_batch_size)]
    stage = loop.Stage("sft", model, tok, t, micro_batches, lm_step, lm_count, eval_batches)
    return loop.run(stage, cfg, fresh)
