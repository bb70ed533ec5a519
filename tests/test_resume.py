"""Interrupted, rerun and reconfigured runs: a checkpoint with a file missing or damaged stops with one
line naming the file (never a traceback, never training over it from scratch); settings a checkpoint
depends on (the seed, the tokenizer) are checked on resume; `--fresh` keeps the old checkpoint until its first save;
what a killed checkpoint write left behind is cleaned up."""

import os
import subprocess
import sys

import pytest
import torch

from cherrytop.config import load_config, to_dict
from cherrytop.data.collate import pad_batch, step_indices
from cherrytop.model.load import build_model
from cherrytop.train import loop
from cherrytop.train.checkpoint import ResumeError, load_state, write_dir_atomically
from cherrytop.train.lm import lm_count, lm_step

V = 40


def make_cfg(tmp_path, *extra, **train):
    over = [f"--run.out_dir={tmp_path}", "--run.name=t", *extra] + [f"--sft.{k}={v}" for k, v in train.items()]
    return load_config("test", [], over)


def make_stage(cfg, fail_at=None):
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(16):
        ids = torch.randint(2, V, (5 + i % 5,), generator=g).tolist()
        data.append((ids, [-100] * 2 + ids[2:]))
    t = cfg.sft

    def micro_batches(step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt
        idx = step_indices(len(data), t.batch_size, step, cfg.run.seed)
        return [pad_batch([data[i] for i in idx[j: j + t.micro_batch_size]], 0)
                for j in range(0, t.batch_size, t.micro_batch_size)]

    return loop.Stage("sft", build_model(cfg.model, V, 0, 1, seed=0), None, t, micro_batches, lm_step, lm_count,
                      [pad_batch(data[:4], 0)])


SMALL = dict(max_steps=2, save_every=2, log_every=1, eval_every=2)


def truncate(f):
    f.write_bytes(f.read_bytes()[:200])


@pytest.mark.parametrize("damage, name, what", [
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing"),
    (lambda d: (d / "trainer_state.pt").unlink(), "trainer_state.pt", "missing"),
    (lambda d: truncate(d / "trainer_state.pt"), "trainer_state.pt", "truncated or corrupt"),
    (lambda d: truncate(d / "model.safetensors"), "model.safetensors", "truncated or corrupt"),
    (lambda d: (d / "config.json").write_text("{"), "config.json", "truncated or corrupt"),
])
def test_a_damaged_checkpoint_stops_naming_the_file(tmp_path, damage, name, what):
    cfg = make_cfg(tmp_path, **SMALL)
    loop.run(make_stage(cfg), cfg)
    ckpt = tmp_path / "t" / "sft"
    damage(ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(ResumeError, match=f"{ckpt / name}: {what}.*--fresh") as e:
        loop.run(make_stage(cfg), cfg)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing trained over it
    loop.run(make_stage(cfg), cfg, fresh=True)  # --fresh starts over
    assert load_state(ckpt)["step"] == 2


def test_another_seed_or_tokenizer_does_not_reuse_the_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, **SMALL)
    loop.run(make_stage(cfg), cfg)
    other = make_cfg(tmp_path, "--run.seed=7", **SMALL)  # another seed orders the batches otherwise
    with pytest.raises(ResumeError, match="run.seed: 0 -> 7"):
        loop.run(make_stage(other), other)
    saved = to_dict(cfg)
    vocab = make_cfg(tmp_path, "--tokenizer.vocab_size=500", **SMALL)  # pretraining trains the tokenizer: its settings count
    with pytest.raises(ResumeError, match="tokenizer.vocab_size: 700 -> 500"):
        loop.check_same_settings(saved, vocab, "pretrain")
    loop.check_same_settings(saved, vocab, "sft")  # SFT takes the pretrained model's tokenizer as it is
    # how often a stage saves or logs changes nothing it trains: it resumes
    loop.run(make_stage(cfg), make_cfg(tmp_path, max_steps=2, save_every=1, log_every=2, eval_every=2))


def test_fresh_keeps_the_old_checkpoint_until_its_first_save(tmp_path):
    cfg = make_cfg(tmp_path, **SMALL)
    loop.run(make_stage(cfg), cfg)
    old = load_state(tmp_path / "t" / "sft")
    with pytest.raises(KeyboardInterrupt):  # --fresh stopped before it saved anything: the old one stays
        loop.run(make_stage(cfg, fail_at=0), cfg, fresh=True)
    assert load_state(tmp_path / "t" / "sft")["metrics"] == old["metrics"]
    with pytest.raises(KeyboardInterrupt):  # stopped after its first save: that one replaced it
        every = make_cfg(tmp_path, max_steps=2, save_every=1, log_every=1, eval_every=2)
        loop.run(make_stage(every, fail_at=1), every, fresh=True)
    assert load_state(tmp_path / "t" / "sft")["step"] == 1


def test_a_killed_writers_half_checkpoint_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = tmp_path / f".ckpt.tmp-{dead.pid}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x" * 1000)
    mine = tmp_path / f".other.tmp-{os.getpid()}"  # another checkpoint's, or a live writer's: kept
    mine.mkdir()
    write_dir_atomically(tmp_path / "ckpt", lambda d: (d / "a.txt").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", mine.name])


def test_a_data_files_fingerprint_sees_edits_without_reading_a_large_file_through(tmp_path):
    """lineage fingerprints data files at every stage start: a small file by its whole content, a large
    one by size, modification time and three 1 MiB samples (start, middle, end), so a changed byte in the
    sampled middle is seen even with the time put back, and so is a later edit anywhere (its time)."""
    import os

    from cherrytop.lineage import _hash_path
    small, big = tmp_path / "a.jsonl", tmp_path / "b.bin"
    small.write_text('{"x": 1}\n')
    big.write_bytes(os.urandom(20 << 20))
    h = _hash_path(tmp_path)
    assert _hash_path(tmp_path) == h
    st = big.stat()
    data = bytearray(big.read_bytes())
    data[10 << 20] ^= 1  # the middle sample
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    h2 = _hash_path(tmp_path)
    assert h2 != h
    data[3 << 20] ^= 1  # outside the samples: seen by its modification time
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    h3 = _hash_path(tmp_path)
    assert h3 != h2
    small.write_text('{"x": 2}\n')
    assert _hash_path(tmp_path) != h3
