"""Checkpoints: a Hugging Face model folder (``save_pretrained``) plus the tokenizer, the whole
config (``cherrytop.toml``) and the training state (``trainer_state.pt``), written atomically: a
crash leaves either the previous checkpoint or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cherrytop.config import Config, to_toml

CONFIG_FILE = "cherrytop.toml"
STATE_FILE = "trainer_state.pt"
ENTRY_FILE = "lineage-entry.json"
"""In `previous_dir`: the lineage records of what was set aside, put back with it."""


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as it is: made with other settings or from other inputs,
    or with a file missing, truncated or corrupt. The message is one line naming what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(final: Path) -> None:
    """Finish a replacement a crash interrupted between its two renames, and remove the half-written
    folders of writers that were killed (`.<name>.tmp-<pid>` of a process that no longer runs)."""
    old = final.with_name(f".{final.name}.old")
    try:
        if not final.exists() and old.exists():
            os.replace(old, final)
        elif old.exists():
            shutil.rmtree(old)
    except FileNotFoundError:
        pass  # another process (a rank of the same job) finished the same repair first
    if final.parent.is_dir():
        for tmp in final.parent.glob(f".{final.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def previous_dir(final: Path) -> Path:
    """Where `cherrytop <stage> --fresh` keeps the stage's old output (`lineage.set_aside`) until the new
    run's first checkpoint replaces it: runs/<name>/.previous/<stage>."""
    return Path(final).parent / ".previous" / Path(final).name


def _write_failed(e: BaseException, final: Path) -> OSError | None:
    """A write error that is not an OSError but says the device refused the bytes (torch's "unexpected
    pos 188800 vs 188688" on a full disk, safetensors' StorageFull), as an OSError naming `final`."""
    text = str(e)
    if isinstance(e, OSError) or not isinstance(e, Exception):
        return None
    full = any(k in text for k in ("No space left", "StorageFull", "os error 28", "code: 28"))
    if not full and not any(k in text for k in ("unexpected pos", "file write failed")):
        return None
    try:
        full = full or shutil.disk_usage(final.parent).free < (64 << 20)
    except OSError:
        pass
    code = errno.ENOSPC if full else errno.EIO
    last = text.strip().splitlines()[-1].strip() if text.strip() else type(e).__name__
    return OSError(code, f"{os.strerror(code)} (writing the checkpoint: {last})", str(final))


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` and then swap tmp_dir in place of `final`; a failed write leaves `final` as
    it was. Then the output a `--fresh` run set aside for `final` (`previous_dir`) is dropped: replaced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := _write_failed(e, final)) is not None:
            raise err from e
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    prev = previous_dir(final)
    if (prev / ENTRY_FILE).is_file():
        shutil.rmtree(prev, ignore_errors=True)
        try:
            prev.parent.rmdir()  # .previous, if it holds no other stage's
        except OSError:
            pass


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


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def discard(final: Path) -> None:
    """Remove a checkpoint folder (and what an interrupted write left of it): `--fresh` starts over."""
    final = Path(final)
    recover(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        os.replace(final, old)  # one rename: the checkpoint is gone at once, even if the removal is cut short
        shutil.rmtree(old, ignore_errors=True)


def _fresh_hint(ckpt: Path) -> str:
    return f"pass --fresh to train stage '{ckpt.name}' over"


def _check_safetensors(f: Path) -> None:
    """A .safetensors file whose header reads and whose size matches the tensors it lists."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ResumeError(f"{f}: truncated or corrupt (its header does not read); {_fresh_hint(f.parent)}")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ResumeError(f"{f}: truncated or corrupt (its header does not read); {_fresh_hint(f.parent)}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ResumeError(f"{f}: truncated or corrupt ({size} bytes; its header lists {8 + n + end}); "
                          f"{_fresh_hint(f.parent)}")


def verify_checkpoint(ckpt: Path, state: bool = True) -> None:
    """Raise a one-line ResumeError naming the file if the checkpoint folder `ckpt` misses a file it
    needs (config.json, its weights, `trainer_state.pt` where `state`) or has one that is truncated or
    corrupt. A sharded (FSDP) checkpoint's shards are read by torch.distributed.checkpoint itself."""
    ckpt = Path(ckpt)
    cfg = ckpt / "config.json"
    if not cfg.is_file():
        raise ResumeError(f"{cfg}: missing from the checkpoint; {_fresh_hint(ckpt)}")
    try:
        json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ResumeError(f"{cfg}: truncated or corrupt (not JSON); {_fresh_hint(ckpt)}") from None
    if (ckpt / "shards" / ".metadata").is_file():
        weights: list[Path] = []
    elif (ckpt / "model.safetensors.index.json").is_file():
        index = ckpt / "model.safetensors.index.json"
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, UnicodeDecodeError):
            raise ResumeError(f"{index}: truncated or corrupt; {_fresh_hint(ckpt)}") from None
        weights = [ckpt / n for n in names]
    elif (ckpt / "pytorch_model.bin").is_file():
        weights = []
    else:
        weights = [ckpt / "model.safetensors"]
    for w in weights:
        if not w.is_file():
            raise ResumeError(f"{w}: missing from the checkpoint; {_fresh_hint(ckpt)}")
        _check_safetensors(w)
    if state:
        f = ckpt / STATE_FILE
        if not f.is_file():
            raise ResumeError(f"{f}: missing from the checkpoint; {_fresh_hint(ckpt)}")
        if not zipfile.is_zipfile(f):
            raise ResumeError(f"{f}: truncated or corrupt; {_fresh_hint(ckpt)}")
    for sub in sorted(ckpt.iterdir()):  # a second model saved inside (PPO's value model)
        if sub.is_dir() and (sub / "config.json").exists() and sub.name != "shards":
            verify_checkpoint(sub, state=False)


def load_state(ckpt: Path, peek: bool = False) -> dict | None:
    """The training state saved with a checkpoint, or None where there is no checkpoint yet (no folder,
    or one without a model in it). A checkpoint with a file missing, truncated or corrupt raises a
    ResumeError naming it, rather than training from scratch over it. `peek`: to read its step, config
    and metrics only, the file is memory-mapped, so its optimizer state (gigabytes for a large model)
    is never read."""
    ckpt = Path(ckpt)
    recover(ckpt)
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
        return None
    verify_checkpoint(ckpt)
    f = ckpt / STATE_FILE
    try:
        return torch.load(f, weights_only=False, mmap=peek)
    except Exception as e:  # noqa: BLE001  (a zip whose members are damaged)
        raise ResumeError(f"{f}: truncated or corrupt ({str(e).splitlines()[0]}); {_fresh_hint(ckpt)}") from None
