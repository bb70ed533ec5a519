"""PPO data-parallel on CPU (gloo, 2 processes) against one process: the whitening and statistics
over both ranks' episodes equal the single-process ones on the concatenated batch, episodes padded
differently on each rank gather into the global batch, each rank's rollout (scored under FSDP by
sharded reference and reward models) is its single-process rollout, and one `ppo.update` of a global
batch under DDP and under FSDP2 gives the single process's policy, value model, weight average and
losses; with LoRA adapters too (the reference = the policy with its adapter off)."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cherrytop import losses as L
from cherrytop.train import distributed

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ppo_worker", HERE / "ppo_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
WORLD = 2


def launch(strategy: str, out: Path, *args: str) -> None:
    """What torchrun does for one node: WORLD processes with the rendezvous in the environment, each
    running ppo_worker.py (`args`: what it runs, by default the statistics, rollouts and PPO's updates)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ppo_worker.py"), strategy, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, the single-process update of it, and a 2-process job per strategy."""
    out = tmp_path_factory.mktemp("ppo_parallel")
    worker.make_data(out)
    reference = {variant: worker.train_once(out, "none", distributed.SOLO, **worker.VARIANTS[variant])
                 for variant in ("adamw", "sgd", "lora")}
    for strategy in ("ddp", "fsdp"):
        launch(strategy, out)
    return out, reference


def test_batch_sizes_that_do_not_split_over_the_processes_are_refused():
    from cherrytop.config import load_config
    from cherrytop.stages.ppo import check_parallel
    d = distributed.Dist(0, 4, 0, torch.device("cpu"))
    ok = ["--ppo.batch_size=16", "--ppo.minibatch_size=8", "--ppo.micro_batch_size=2"]
    check_parallel(load_config("test", [], ok).ppo, load_config("test", [], ok), d)
    for bad, what in ((["--ppo.batch_size=6", "--ppo.minibatch_size=6", "--ppo.micro_batch_size=1"], "ppo.batch_size (6)"),
                      (["--ppo.micro_batch_size=4"], "minibatch_size / micro_batch_size (2)"),
                      (["--ppo.ptx_coef=1", "--ppo.ptx_batch_size=6"], "ptx_batch_size (6)")):
        cfg = load_config("test", [], ok + bad)
        with pytest.raises(ValueError, match=re.escape(what)):
            check_parallel(cfg.ppo, cfg, d)


def test_statistics_over_two_processes_equal_one_process_on_the_concatenated_batch(runs):
    out, _ = runs
    shards = [worker.statistics_data(r) for r in range(WORLD)]
    n = max(x.shape[1] for x, _, _ in shards)
    x, v, mask = (torch.cat([torch.nn.functional.pad(t[i], (0, n - t[i].shape[1])) for t in shards]) for i in range(3))
    want = {"white": L.masked_whiten(x, mask), "white_keep_mean": L.masked_whiten(x, mask, shift_mean=False),
            "mean": L.masked_mean(x, mask), "var": L.masked_var(x, mask), "ev": L.explained_variance(v, x, mask)}
    assert float(want["var"]) > 1 and abs(float(want["mean"])) > 0.1  # whitening has work to do
    got = [torch.load(out / f"statistics_{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(got):
        rows, cols = slice(3 * r, 3 * r + 3), slice(0, shards[r][0].shape[1])
        for k in ("white", "white_keep_mean"):
            torch.testing.assert_close(res[k], want[k][rows, cols], rtol=1e-6, atol=1e-6)
        for k in ("mean", "var", "ev"):  # float32 sums in another order: ~1 ulp (ev = 1 − a ratio near 1)
            assert float(res[k]) == pytest.approx(float(want[k]), rel=1e-6, abs=1e-6), k
        assert res["means"] == pytest.approx({"a": float(x[:3, :5].mean() + x[3:].mean()) / 2, "b": 0.5}, rel=1e-6)
    # each rank's share of the batch, cut to its own prompt and response lengths, gathers into the batch
    batch, _ = worker.load_data(out)
    assert got[0]["cut_shape"] != got[1]["cut_shape"]  # differently padded on the two ranks
    for res in got:
        for f, t in vars(batch).items():
            assert torch.equal(res["gathered"][f], t), f


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_rollout_on_two_processes_is_each_ranks_single_process_rollout(runs, strategy, adapters):
    """Each rank samples its prompts (FSDP: through the sharded policy, as many decoding steps on
    both ranks) and scores them with the reference, the reward model and the reward model's own
    π_ref (FSDP: each sharded over the ranks, DDP: full copies) as one process would; the gathered
    batch holds both, with the advantages whitened over both and the statistics averaged over both.
    With LoRA the reference is the policy with its adapter off (FSDP: through the sharded policy)."""
    out, _ = runs
    got = torch.load(out / f"rollout_{strategy}{'_lora' * adapters}.pt")
    halves = [worker.rollout_share(out, r, adapters=adapters) for r in range(WORLD)]
    assert set(got["held"]) == {"reward", "loglik"} | ({"reference"} if not adapters else set())
    for name, share in got["held"].items():  # the frozen models: half of each on rank 0 under FSDP
        assert share == (pytest.approx(1 / WORLD, abs=0.05) if strategy == "fsdp" else 1.0), name
    check_gathered(got, halves)
    batch = got["batch"]
    raw = (batch["returns"] - batch["old_values"]) * batch["mask"]  # GAE's advantages before whitening
    torch.testing.assert_close(batch["advantages"], L.masked_whiten(raw, batch["mask"]), rtol=1e-4, atol=1e-5)
    assert got["stats"]["objective/ref_loglik"] != 0 and got["stats"]["objective/rm_score"] != 0  # scored by both
    if adapters:  # the reference is the policy with its adapter off, not the policy
        assert got["stats"]["objective/kl"] != 0


def check_gathered(got: dict, halves: list, fields=("mask", "old_logp", "ref_logp", "old_values", "returns")) -> None:
    """The 2-process rollout `got` (rank 0's gathered batch and statistics) holds each rank's single-process
    rollout `halves[r]` in its rows, padded on the left (prompt) and the right (response) to the longest
    of both, the `fields` equal, and its per-episode statistics are the mean of the halves'."""
    batch = got["batch"]
    P = batch["ids"].shape[1] - batch["mask"].shape[1]
    B = len(halves[0][0].ids)
    for r, (half, _, _) in enumerate(halves):
        rows = slice(B * r, B * r + B)
        n = half.mask.shape[1]
        p = half.ids.shape[1] - n
        for f in ("ids", "attn", "pos"):  # extra prompt columns on the left, response columns on the right: padding
            torch.testing.assert_close(batch[f][rows, P - p: P + n], getattr(half, f), rtol=0, atol=0, msg=f)
        assert not batch["attn"][rows, : P - p].any() and not batch["attn"][rows, P + n:].any()
        for f in fields:
            torch.testing.assert_close(batch[f][rows, :n], getattr(half, f), rtol=1e-5, atol=1e-5, msg=f)
            assert not batch[f][rows, n:].any(), f
    assert halves[0][0].ids.shape != halves[1][0].ids.shape  # padded differently on the two ranks
    for k in ("objective/score", "objective/rm_score", "objective/ref_loglik", "objective/kl", "rollout/length",
              "rollout/eos_rate"):  # per-episode means
        assert got["stats"][k] == pytest.approx((halves[0][1][k] + halves[1][1][k]) / 2, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("variant", ["adamw", "sgd", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_update_on_two_processes_equals_one(runs, strategy, variant):
    """adamw: AdamW and clipping as the stage runs them; sgd: plain SGD, no clipping (a step moves the
    weights in proportion to the gradient); lora: AdamW on LoRA adapters (and the value head)."""
    out, reference = runs
    check_update(out, reference, strategy, variant)


def check_update(out: Path, reference: dict, strategy: str, variant: str) -> None:
    """The 2-process job's update under `strategy` (`worker.update_file`) is the single process's
    `reference[variant]`: every trained weight (with LoRA: every adapter weight and nothing else) moved,
    the policy, value model (none without a critic) and weight average equal, and the statistics."""
    want = reference[variant]
    got = torch.load(worker.update_file(out, strategy, variant))
    start = dict(worker.models(out, "none", distributed.SOLO, variant == "lora")[0].named_parameters())
    moved = {n for n, q in start.items() if not torch.equal(q.detach(), want["policy"][n])}
    # every policy weight trained, with LoRA every adapter weight and nothing else (so the comparison means something)
    assert moved == {n for n in start if ".lora_" in n or variant != "lora"}
    for model in ("policy", "value", "average"):
        assert got[model].keys() == want[model].keys()
        for n, w in want[model].items():
            torch.testing.assert_close(got[model][n], w, rtol=1e-5, atol=1e-5, msg=f"{model} {n}")
    assert got["stats"].keys() == want["stats"].keys()
    assert "loss/ptx" in got["stats"]
    for k, v in want["stats"].items():
        assert got["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
