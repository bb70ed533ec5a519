"""`lineage.prepare` under torchrun (2 gloo processes started as torchrun would, see
lineage_worker.py): rank 0 alone reads, recovers and discards checkpoints and writes the lineage while
the other ranks wait for its outcome, so on `--fresh` no rank goes on while the old checkpoint is
still there, a stale input stops every rank with the same one-line error (never one rank alone, the
others left waiting in a collective), and a checkpoint whose save a kill cut short between its two
renames is recovered by one process (two racing to rename it failed one rank: "No such file or
directory: '.sft.old' -> 'sft'") and checked against its inputs (before, it was taken for no output,
the lineage rewritten over it, and the stale checkpoint resumed without a word)."""

import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cherrytop import lineage
from cherrytop.config import to_dict
from cherrytop.train.checkpoint import ResumeError, save_checkpoint

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("lineage_worker", HERE / "lineage_worker.py")
lineage_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage_worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Weights:
    """What `save_checkpoint` calls save_pretrained on: a config and a (tiny) valid safetensors file."""

    def save_pretrained(self, out: Path) -> None:
        from safetensors.torch import save_file
        (Path(out) / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(Path(out) / "model.safetensors"))


def checkpoint(cfg, stage: str, loss: float) -> None:
    section = to_dict(cfg)[stage]
    save_checkpoint(Path(cfg.run.out_dir) / cfg.run.name / stage, Weights(), None, cfg,
                    {"stage": stage, "step": section["max_steps"], "config": to_dict(cfg), "metrics": {"train/loss": loss}})


def a_run(out: Path, pretrained_again: bool = False):
    """Run `r` with finished pretrain and sft checkpoints, their lineage recorded; `pretrained_again`:
    pretraining then trained again (other metrics), so sft no longer matches its input."""
    cfg = lineage_worker.make_cfg(out)
    checkpoint(cfg, "pretrain", 3.0)
    checkpoint(cfg, "sft", 2.0)
    run = out / "r"
    lineage._write_lineage(run, {"pretrain": lineage._entry("pretrain", cfg), "sft": lineage._entry("sft", cfg)})
    if pretrained_again:
        checkpoint(cfg, "pretrain", 2.5)
    return cfg, run


def launch(out: Path, *args: str) -> list[dict]:
    """lineage_worker on 2 processes, as torchrun starts them; each rank's RESULT line, by rank."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "lineage_worker.py"), str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    results = [json.loads(next(ln[7:] for ln in o.splitlines() if ln.startswith("RESULT "))) for o in outs]
    return sorted(results, key=lambda r: r["rank"])


def test_fresh_under_torchrun_no_rank_goes_on_before_rank_0_set_the_old_checkpoint_aside(tmp_path):
    """`--fresh`: rank 0 takes the stage's lock, sets the old checkpoint aside (slowly here; kept until
    the new run's first save) and records the inputs; rank 1 returns from prepare only after that,
    having touched no checkpoint itself."""
    _, run = a_run(tmp_path)
    before = json.loads((run / "lineage.json").read_text())
    r0, r1 = launch(tmp_path, "1", "1")
    assert r0["fresh"] is True and r1["fresh"] is True
    assert not r0["old_checkpoint_there"] and not r1["old_checkpoint_there"]
    assert {"set_aside", "lock"} <= set(r0["calls"]) and r1["calls"] == []
    assert json.loads((run / "lineage.json").read_text()) == before  # rewritten once, by rank 0: same inputs
    assert not list(run.glob(".lineage.json.tmp-*")) and not list(run.glob(".sft*"))
    assert (run / ".previous" / "sft" / "sft" / "config.json").is_file() and not (run / "sft.lock").exists()


def test_a_stale_checkpoint_stops_every_rank_with_the_same_error(tmp_path):
    _, run = a_run(tmp_path, pretrained_again=True)
    r0, r1 = launch(tmp_path, "0")
    assert r0["error"] == r1["error"]
    assert r0["error"].startswith("ResumeError: sft: its checkpoint no longer matches its inputs: pretrain was trained again")
    assert r1["calls"] == [] and r0["old_checkpoint_there"]  # nothing discarded


def test_a_save_cut_between_its_renames_is_recovered_once_and_checked_under_torchrun(tmp_path):
    """Killed between the two renames of a save: `sft` gone, `.sft.old` holds the checkpoint. Rank 0
    renames it back (one process: two raced and one failed) and finds it stale, as every rank says."""
    _, run = a_run(tmp_path, pretrained_again=True)
    os.replace(run / "sft", run / ".sft.old")
    r0, r1 = launch(tmp_path, "0")
    assert r0["error"] == r1["error"] and "pretrain was trained again since" in r0["error"]
    assert (run / "sft").is_dir() and not (run / ".sft.old").exists()
    assert r1["calls"] == []


def test_a_save_cut_between_its_renames_is_checked_in_one_process(tmp_path):
    """The same in one process (`cherrytop sft`, the pipeline): the recovered checkpoint is checked
    against its inputs, not taken for no output with the lineage rewritten over it."""
    cfg, run = a_run(tmp_path, pretrained_again=True)
    os.replace(run / "sft", run / ".sft.old")
    recorded = json.loads((run / "lineage.json").read_text())
    with pytest.raises(ResumeError, match="pretrain was trained again since; pass --fresh"):
        lineage.prepare("sft", cfg, False)
    assert (run / "sft").is_dir() and json.loads((run / "lineage.json").read_text()) == recorded
    assert lineage.prepare("sft", cfg, False, redo_stale=True) is True  # the pipeline trains it again
    assert not (run / "sft").exists()


def test_an_error_that_does_not_pickle_back_reaches_the_other_ranks_as_its_kind():
    class Odd(ValueError):
        def __init__(self, a, b):
            super().__init__(f"{a} {b}")
    e = lineage._portable(Odd("bad", "input"))
    assert type(e) is ValueError and str(e) == "bad input"
    r = ResumeError("stale")
    assert lineage._portable(r) is r and str(pickle.loads(pickle.dumps(r))) == "stale"
