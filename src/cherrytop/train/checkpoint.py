"""Checkpoints: a Hugging Face model folder (``save_pretrained``) plus the tokenizer, the whole
config (``cherrytop.toml``) and the training state (``trainer_state.pt``), written atomically: a
crash leaves either the previous checkpoint or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cherrytop.config import Config, to_toml

CONFIG_FILE = "cherrytop.toml"
STATE_FILE = "trainer_state.pt"


def _recover(final: Path) -> None:
    """Finish a replacement a crash interrupted between its two renames."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    elif old.exists():
        shutil.rmtree(old)


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` and then swap tmp_dir in place of `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(final: Path, model: Any, tokenizer: Any, cfg: Config, state: dict | None = None,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Model + tokenizer + config (+ training state, + whatever `extra` writes), atomically."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(to_toml(cfg))
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        if extra is not None:
            extra(tmp)
    write_dir_atomically(final, write)


def load_state(ckpt: Path) -> dict | None:
    """The training state saved with a checkpoint, or None for a folder that has none."""
    _recover(Path(ckpt))
    f = Path(ckpt) / STATE_FILE
    return torch.load(f, weights_only=False) if f.is_file() else None
