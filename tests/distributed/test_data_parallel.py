"""DDP and FSDP2 on CPU (gloo, 2 processes) against one process on the same global batch, for every
training stage (pretraining, SFT, the reward model): the same loss and gradients; for SFT the same
loss curve through a kill and a resume from a (sharded) checkpoint; for each stage the same final
weights, in a checkpoint plain transformers loads; FSDP's shards convert to a plain HF folder."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
        assert p.returncode == 0, "\n".join(x[-3000:] for x in outs)


curve = worker.curve


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the loss and gradients of step 0's global batch of every stage, an uninterrupted
    4-step SFT run, 2-step pretraining and reward-model runs."""
    out = tmp_path_factory.mktemp("single")
    cfg = worker.make_cfg(out, "none")
    ref = {"grads": {name: worker.global_batch_grads(cfg, name) for name in worker.STAGES}, "weights": {}}
    for name in worker.STAGES:
        stage = worker.make_stage(cfg, name=name)
        loop.run(stage, cfg)
        ref["weights"][name] = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
    ref["curves"] = {name: curve(out, name) for name in worker.STAGES}
    return ref


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two(request, tmp_path_factory):
    """(strategy, output folder) of one 2-process job (worker.main: every stage's gradients and runs)."""
    out = tmp_path_factory.mktemp(request.param)
    launch(request.param, out)
    return request.param, out


@pytest.mark.parametrize("stage", worker.STAGES)
def test_global_batch_loss_and_gradients_equal_one_process(two, reference, stage):
    """Each rank back-propagates its half of the micro-batches; DDP / FSDP's average gives the
    gradient of the global mean (over tokens for pretraining and SFT, over prompts for the reward
    model's ranking loss), exactly as one process computes it."""
    _, out = two
    got = torch.load(out / f"grads-{stage}.pt")
    loss, grads = reference["grads"][stage]
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert got["grads"].keys() == grads.keys()
    assert all(bool(g.abs().sum() > 0) for g in grads.values())  # every parameter takes part
    for k, g in grads.items():
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_sft_resumed_run_equals_one_process(two, reference):
    strategy, tmp_path = two
    # the curve of a run killed after step 3 and resumed from step 2 = the single process's curve
    a, b = reference["curves"]["sft"], curve(tmp_path)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert b[4]["eval/loss"] == pytest.approx(a[4]["eval/loss"], rel=1e-5)
    # the final checkpoint is a plain HF folder with the single process's weights (after 4 AdamW steps:
    # Adam divides by √v, so a 1e-7 gradient rounding difference can move a weight by ~1e-6)
    check_checkpoint(tmp_path / "t/sft", AutoModelForCausalLM, reference["weights"]["sft"], strategy, tmp_path)


@pytest.mark.parametrize("stage", ["pretrain", "rm"])
def test_stage_run_equals_one_process(two, reference, stage):
    """Pretraining and the reward model through the loop: the same curve (and, for the reward model,
    the same held-out pairwise accuracy) and a final checkpoint plain transformers loads."""
    strategy, tmp_path = two
    a, b = reference["curves"][stage], curve(tmp_path, stage)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert b[2]["eval/loss"] == pytest.approx(a[2]["eval/loss"], rel=1e-5)
    if stage == "rm":
        assert b[2]["eval/accuracy"] == a[2]["eval/accuracy"]
    cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    check_checkpoint(tmp_path / f"t/{stage}", cls, reference["weights"][stage], strategy, tmp_path)


def check_checkpoint(ckpt: Path, cls, weights: dict, strategy: str, tmp_path: Path) -> None:
    """`ckpt` is a plain HF folder with `weights`; under FSDP its shards alone convert to the same folder."""
    plain = cls.from_pretrained(ckpt)
    for k, w in plain.state_dict().items():
        torch.testing.assert_close(w, weights[k], rtol=1e-4, atol=1e-5)
    assert distributed.has_shards(ckpt) == (strategy == "fsdp")
    if strategy == "fsdp":
        from cherrytop.cli import main
        converted = tmp_path / f"converted-{ckpt.name}"
        assert main(["convert", str(ckpt), "--out", str(converted)]) == 0
        again = cls.from_pretrained(converted)
        for k, w in again.state_dict().items():
            torch.testing.assert_close(w, plain.state_dict()[k], rtol=0, atol=0)


def test_convert_in_one_process_prints_no_torch_warning(tmp_path, capfd):
    """`cherrytop convert` reads the shards in one process without a process group, on purpose: the
    same weights come out, and torch's "torch.distributed is disabled" warning does not."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from cherrytop.cli import main
    from cherrytop.config import ModelConfig
    from cherrytop.model.load import build_model
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32), 64, 0, 1)
    ckpt = tmp_path / "sft"
    model.save_pretrained(ckpt)
    with warnings.catch_warnings():  # writing the shards without a process group warns too; not under test
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt / distributed.SHARDS))
    (ckpt / "model.safetensors").unlink()  # the shards alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["convert", str(ckpt), "--out", str(tmp_path / "plain")]) == 0
    assert "torch.distributed is disabled" not in capfd.readouterr().err
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for k, w in again.state_dict().items():
        torch.testing.assert_close(w, model.state_dict()[k], rtol=0, atol=0)
