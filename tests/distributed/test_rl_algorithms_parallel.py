"""Every critic-free `rl.algorithm` data-parallel on CPU (gloo, 2 processes, as torchrun starts them):
one `ppo.update` of a global batch under DDP and under FSDP2 gives the single process's policy, weight
average and statistics (GRPO's and Dr. GRPO's per-answer aggregations and KL loss term included, PPO-ptx
on), with no value model made or wrapped. PPO's own update is test_ppo_parallel.py's; the whole stage
under torchrun, GRPO included, is test_ppo_torchrun.py's."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cherrytop.train import distributed

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ppo_parallel_tests", HERE / "test_ppo_parallel.py")
parallel_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parallel_tests)
worker = parallel_tests.worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, each algorithm's single-process update of it, and a 2-process job per strategy."""
    out = tmp_path_factory.mktemp("rl_parallel")
    worker.make_data(out)
    reference = {a: worker.train_once(out, "none", distributed.SOLO, **worker.VARIANTS[a]) for a in worker.CRITIC_FREE}
    for strategy in ("ddp", "fsdp"):
        parallel_tests.launch(strategy, out, ",".join(worker.CRITIC_FREE))
    return out, reference


@pytest.mark.slow  # ~35 s on the shared 2 cores (two 2-process jobs of five updates each); run with -m slow
@pytest.mark.parametrize("algorithm", worker.CRITIC_FREE)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_critic_free_update_on_two_processes_equals_one(runs, strategy, algorithm):
    out, reference = runs
    parallel_tests.check_update(out, reference, strategy, algorithm)
    got = torch.load(worker.update_file(out, strategy, algorithm))
    assert got["value"] == {} and not got["wrapped_value"]  # no value model, so nothing wrapped for it
    assert not any(k.startswith("value/") or k == "loss/value" for k in got["stats"])
    assert ("loss/kl" in got["stats"]) == (algorithm in ("grpo", "dr_grpo"))  # their KL term is in the loss
    if algorithm in ("grpo", "dr_grpo"):
        assert got["stats"]["loss/kl"] > 0
