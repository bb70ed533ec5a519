"""DDP and FSDP2 on CPU (gloo, 2 processes) against one process on the same global batch: the same
loss and gradients, the same loss curve through a kill and a resume from a (sharded) checkpoint,
the same final weights, in a checkpoint plain transformers loads; FSDP's shards convert to a plain
Hugging Face folder."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cherrytop.train import distributed, loop

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("dp_worker", HERE / "worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, out: Path, arch: str = "llama", world: int = 2) -> None:
    """What torchrun does for one node: `world` processes with the rendezvous in the environment."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "worker.py"), strategy, str(out), arch], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


curve = worker.curve


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the gradients of step 0's global batch and an uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("single")
    cfg = worker.make_cfg(out, "none")
    loss, grads = worker.global_batch_grads(cfg)
    stage = worker.make_stage(cfg)
    loop.run(stage, cfg)
    return {"loss": loss, "grads": grads, "curve": curve(out),
            "weights": {k: v.detach().clone() for k, v in stage.model.state_dict().items()}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, reference, strategy):
    launch(strategy, tmp_path)
    got = torch.load(tmp_path / "grads.pt")
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert got["grads"].keys() == reference["grads"].keys()
    for k, g in reference["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7)
    # the curve of a run killed after step 3 and resumed from step 2 = the single process's curve
    a, b = reference["curve"], curve(tmp_path)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert b[4]["eval/loss"] == pytest.approx(a[4]["eval/loss"], rel=1e-5)
    # the final checkpoint is a plain HF folder with the single process's weights (after 4 AdamW steps:
    # Adam divides by √v, so a 1e-7 gradient rounding difference can move a weight by ~1e-6)
    ckpt = tmp_path / "t/sft"
    plain = AutoModelForCausalLM.from_pretrained(ckpt)
    for k, w in plain.state_dict().items():
        torch.testing.assert_close(w, reference["weights"][k], rtol=1e-4, atol=1e-5)
    assert distributed.has_shards(ckpt) == (strategy == "fsdp")
    if strategy == "fsdp":  # the shards alone convert to the same plain folder
        from cherrytop.cli import main
        assert main(["convert", str(ckpt), "--out", str(tmp_path / "converted")]) == 0
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
        for k, w in again.state_dict().items():
            torch.testing.assert_close(w, plain.state_dict()[k], rtol=0, atol=0)
