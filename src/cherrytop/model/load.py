"""Models: build a tiny Llama- or GPT-2-style causal LM from a config, or load any local Hugging
Face causal-LM folder; find checkpoints by folder or by stage name."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from cherrytop.config import Config, ModelConfig


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that does not exist or is not a model."""


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, seed: int = 0) -> PreTrainedModel:
    """A fresh causal LM of `cfg.arch` with the configured size."""
    torch.manual_seed(seed)
    if cfg.arch == "llama":
        hf = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout, tie_word_embeddings=True,
            pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id, rope_theta=10000.0,
        )
    else:
        hf = GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.d_model, n_inner=cfg.d_ff, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_positions=cfg.max_seq_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
        )
    model = AutoModelForCausalLM.from_config(hf)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    return model


def resolve_checkpoint(ref: str, cfg: Config | None = None) -> Path:
    """A checkpoint folder from a path, or from a stage name of the configured run (`sft` ->
    runs/<name>/sft). Errors say what was looked for and what exists."""
    p = Path(ref)
    candidates = [p]
    if cfg is not None and not p.is_absolute() and len(p.parts) == 1:
        candidates.append(Path(cfg.run.out_dir) / cfg.run.name / ref)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    if any(c.is_dir() for c in candidates):
        raise CheckpointError(f"{tried}: not a model checkpoint; expected a Hugging Face model folder with config.json")
    if len(candidates) == 1:
        raise CheckpointError(f"{tried}: no such checkpoint; expected a model folder")
    run = candidates[1].parent
    have = sorted(d.name for d in run.iterdir() if (d / "config.json").is_file()) if run.is_dir() else []
    raise CheckpointError(f"{tried}: no such checkpoint; expected a model folder or a stage name of run "
                          f"'{cfg.run.name}' " + (f"({', '.join(have)})" if have else
                                                 f"({run} has no checkpoints: another --run.name or --preset?)"))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Any local HF causal-LM folder (Llama, GPT-2, Qwen, ...)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no such model folder; expected a Hugging Face model folder with config.json")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    return model


def context_window(config) -> int | None:
    """The most positions the model takes (`max_position_embeddings`, GPT-2's `n_positions`), None if
    its config does not say."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def fit_vocab(model: PreTrainedModel, n_tokens: int) -> bool:
    """Grow the model's embeddings (and output layer) to a tokenizer of `n_tokens` that has more tokens
    than it has rows (a tokenizer with added tokens); the new rows start as the mean of the old ones.
    Returns whether it grew."""
    if n_tokens <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(n_tokens, mean_resizing=True)
    return True


def frozen_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The weight dtype of a model that is run but never trained (`dist.frozen_dtype`): bf16 or fp32;
    `auto` = bf16 on a GPU, fp32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
