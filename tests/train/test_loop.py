"""The shared training loop: gradient accumulation invariance, resume after a kill, checkpoints
that plain transformers loads, and atomic writes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cherrytop.config import Config, load_config
from cherrytop.data.collate import pad_batch, step_indices
from cherrytop.model.load import build_model
from cherrytop.train.lm import lm_count, lm_step
from cherrytop.train import loop
from cherrytop.train.checkpoint import write_dir_atomically

V = 40


def make_cfg(tmp_path, **train):
    over = [f"--run.out_dir={tmp_path}", "--run.name=t"] + [f"--sft.{k}={v}" for k, v in train.items()]
    return load_config("test", [], over)


def rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 5 + i % 7
        ids = torch.randint(2, V, (L,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]  # loss on all but the first two tokens (a "prompt")
        out.append((ids, labels))
    return out


def make_stage(cfg, data, fail_at=None):
    t = cfg.sft
    model = build_model(cfg.model, V, 0, 1, seed=0)

    def micro_batches(step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt
        idx = step_indices(len(data), t.batch_size, step, cfg.run.seed)
        return [pad_batch([data[i] for i in idx[j: j + t.micro_batch_size]], 0) for j in range(0, t.batch_size, t.micro_batch_size)]

    evals = [pad_batch(data[:4], 0)]
    return loop.Stage("sft", model, None, t, micro_batches, lm_step, lm_count, evals)


def test_batch8_accum1_equals_batch2_accum4(tmp_path):
    data = rows()
    results = []
    for micro in (8, 2):
        cfg = make_cfg(tmp_path / f"m{micro}", batch_size=8, micro_batch_size=micro, max_steps=1, grad_clip=0.0, lr=1e-3)
        stage = make_stage(cfg, data)
        loop.run(stage, cfg)
        results.append({k: v.detach().clone() for k, v in stage.model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=2e-6, rtol=1e-5)
    start = build_model(make_cfg(tmp_path).model, V, 0, 1, seed=0).state_dict()
    changed = [k for k in start if not torch.equal(start[k], results[0][k])]
    assert len(changed) == len(start)  # every trained parameter actually changed


def losses(cfg):
    path = cfg.run.out_dir + "/t/logs/sft.jsonl"
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(path))}


def test_resume_after_kill_continues_the_same_curve(tmp_path):
    data = rows()
    full = make_cfg(tmp_path / "full", max_steps=8, save_every=4, log_every=1, eval_every=4)
    loop.run(make_stage(full, data), full)
    killed = make_cfg(tmp_path / "killed", max_steps=8, save_every=4, log_every=1, eval_every=4)
    with pytest.raises(KeyboardInterrupt):
        loop.run(make_stage(killed, data, fail_at=6), killed)
    state = torch.load(tmp_path / "killed/t/sft/trainer_state.pt", weights_only=False)
    assert state["step"] == 4
    resumed = make_stage(killed, data)
    loop.run(resumed, killed)
    a, b = losses(full), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6)
    # the finished checkpoint loads with plain transformers and gives the trained model's logits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "killed/t/sft")
    x = torch.tensor([data[0][0]])
    torch.testing.assert_close(plain(x).logits, resumed.model.eval()(x).logits)
    # a second run is a no-op; other settings refuse to resume
    assert loop.run(make_stage(killed, data), killed)["train/loss"] == pytest.approx(b[8])
    other = make_cfg(tmp_path / "killed", max_steps=8, save_every=4, lr=0.5)
    with pytest.raises(loop.ResumeError, match="sft.lr"):
        loop.run(make_stage(other, data), other)
    # a setting newer than the checkpoint resumes at its default (what older code did), not at another value
    state_path = tmp_path / "killed/t/sft/trainer_state.pt"
    state = torch.load(state_path, weights_only=False)
    assert killed.sft.grad_clip == Config().sft.grad_clip
    del state["config"]["sft"]["grad_clip"]
    torch.save(state, state_path)
    assert loop.run(make_stage(killed, data), killed)["train/loss"] == pytest.approx(b[8])
    later = make_cfg(tmp_path / "killed", max_steps=8, save_every=4, grad_clip=0.5)
    with pytest.raises(loop.ResumeError, match="sft.grad_clip: None -> 0.5"):
        loop.run(make_stage(later, data), later)


def test_atomic_directory_write_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
