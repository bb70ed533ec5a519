"""Every critic-free `rl.algorithm` data-parallel on CPU (gloo, 2 processes, as torchrun starts them):
each rank's rollout of whole groups is its single-process rollout (group baselines within the rank's
groups; REINFORCE++'s whitening over both ranks), and one `ppo.update` of a global batch under DDP and
under FSDP2 gives the single process's policy, weight average and statistics (GRPO's and Dr. GRPO's per-answer aggregations and KL loss term included, PPO-ptx
on), with no value model made or wrapped. PPO's own update is test_ppo_parallel.py's; the whole stage
under torchrun, GRPO included, is test_ppo_torchrun.py's."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cherrytop import losses as L
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


@pytest.mark.slow  # ~40 s with the test below (its fixture: two 2-process jobs of five rollouts and updates); -m slow
@pytest.mark.parametrize("algorithm", worker.CRITIC_FREE)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_critic_free_rollout_on_two_processes_is_each_ranks_single_process_rollout(runs, strategy, algorithm):
    out, _ = runs
    got = torch.load(out / f"rollout_{strategy}_{algorithm}.pt")
    halves = [worker.rollout_share(out, r, algorithm=algorithm) for r in range(parallel_tests.WORLD)]
    parallel_tests.check_gathered(got, halves)
    batch = got["batch"]
    assert not batch["old_values"].any()  # no value model: values 0
    if algorithm.startswith("reinforce_pp"):  # the returns (each rank's, its own groups) whitened over both ranks
        want = L.masked_whiten(batch["returns"], batch["mask"])
    else:  # each answer's advantage from its own group, all of it on one rank
        n = [h.mask.shape[1] for h, _, _ in halves]
        want = torch.cat([torch.nn.functional.pad(h.advantages, (0, batch["mask"].shape[1] - k)) for (h, _, _), k in
                          zip(halves, n)])
    torch.testing.assert_close(batch["advantages"], want, rtol=1e-4, atol=1e-5)
    assert batch["advantages"].any()
    assert ("rollout/equal_groups" in got["stats"]) == (algorithm != "reinforce_pp")


@pytest.mark.slow  # with the test above ~40 s on the shared 2 cores (two 2-process jobs); run with -m slow
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
