"""The embedded default end to end (slow: ~15 minutes on 2 cores; `make test-slow`): the tiny
pipeline must reach the numbers the recipe promises on this machine. It runs `cherrytop pipeline` in its
own process, as a user does, so the command's process set-up applies (`run.cpu_kernels`: PyTorch's AVX2
kernels, which give the same models on every x86 machine; chosen once per process, at its first op)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_pipeline_reaches_its_numbers(tmp_path):
    subprocess.run([sys.executable, "-m", "cherrytop.cli", "pipeline", "--preset", "tiny", f"--run.out_dir={tmp_path}"],
                   check=True, capture_output=True)
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    ev = report["eval"]
    assert report["pretrain_loss"]["pretrain"] < 0.6 * report["pretrain"]["uniform_loss"]
    assert ev["sft"]["helpful"] >= 0.60
    for axis in ("helpful", "truthful", "harmless"):
        assert ev["sft"][axis] > ev["pretrain"][axis], axis
        assert ev["ppo"][axis] >= ev["sft"][axis], axis  # issue 3: at or above SFT's (seed 0 at fc82503, 2026-11-24: 0.750 = 0.750 helpful)
    assert report["rm"]["accuracy_labelers"] >= 0.70
    assert report["rm"]["accuracy_grader"] >= 0.85
    assert report["versus_sft"]["ppo"]["win_rate"] >= 0.65  # seed 0: 0.651 with rm.epochs=2, 0.644 with 1 (fc82503, 2026-11-24)
