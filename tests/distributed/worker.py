"""One rank of a 2-process gloo job (started by test_data_parallel.py with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, as torchrun would): for each training stage (SFT, pretraining, the
reward model) the loss and gradients of one global batch; then the SFT run killed after step 3 and
resumed from its step-2 checkpoint; then a short pretraining run and a short reward-model run.

Each stage is built from the stage module's own pieces (its batches, its loss, its count), so the
loop runs what `cherrytop <stage>` runs: pretraining's next-token loss over packed windows, SFT's
over the assistant tokens, the reward model's ranking loss over all C(K,2) pairs of each prompt.

Also imported by the test for the single-process reference (same data, model and settings)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from cherrytop.config import load_config
from cherrytop.data.collate import pack_windows, pad_batch, step_indices
from cherrytop.data.records import Comparison, Message
from cherrytop.model.heads import LOGLIK_KEY, scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.stages import pretrain, reward
from cherrytop.train import distributed, loop
from cherrytop.train.lm import lm_count, lm_step

V = 40
STAGES = ("sft", "pretrain", "rm")
"""Stages whose global-batch loss and gradients the workers compute (and whose runs they train)."""


def make_cfg(out: Path, strategy: str, arch: str = "llama"):
    short = ["--max_steps=2", "--batch_size=8", "--micro_batch_size=2", "--save_every=2", "--log_every=1",
             "--eval_every=2", "--warmup_steps=1"]
    return load_config("test", [], [f"--run.out_dir={out}", "--run.name=t", f"--model.arch={arch}",
                                    "--sft.batch_size=8", "--sft.micro_batch_size=2", "--sft.max_steps=4",
                                    "--sft.save_every=2", "--sft.log_every=1", "--sft.eval_every=2",
                                    "--sft.warmup_steps=1", f"--dist.strategy={strategy}", "--pretrain.seq_len=12",
                                    *(f"--pretrain.{a[2:]}" for a in short), *(f"--rm.train.{a[2:]}" for a in short)])


def rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, V, (5 + i % 7,), generator=g).tolist()
        out.append((ids, [-100] * 2 + ids[2:]))
    return out


def rankings(n=16, seed=0) -> list[tuple[list[list[int]], Comparison]]:
    """Reward-model groups as `reward.encode_group` makes them: K = 2, 3 or 4 responses of different
    lengths per prompt (token ids), their ranking, and a tie in every third group of 3 or more."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 2 + i % 3
        ids = [torch.randint(2, V, (4 + int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist() + [1]
               for _ in range(k)]  # each ends with EOS (1), where the reward is read
        ranking = torch.randperm(k, generator=g).tolist()
        ties = ((ranking[1], ranking[2]),) if k > 2 and i % 3 == 0 else ()
        comp = Comparison((Message("user", f"q{i}"),), tuple(f"r{j}" for j in range(k)), tuple(ranking), ties)
        out.append((ids, comp))
    return out


def _sft(cfg):
    t, data = cfg.sft, rows()

    def batches(step):
        idx = step_indices(len(data), t.batch_size, step, cfg.run.seed)
        return [pad_batch([data[i] for i in idx[j: j + t.micro_batch_size]], 0) for j in range(0, t.batch_size, t.micro_batch_size)]
    return build_model(cfg.model, V, 0, 1, seed=0), t, batches, lm_step, lm_count, [pad_batch(data[:4], 0)], None


def _pretrain(cfg):
    t = cfg.pretrain
    docs = [ids for ids, _ in rows(40, seed=1)]
    windows = pack_windows(docs[:32], t.seq_len, 1)  # (N, T) as stages/pretrain.py packs the corpus
    held = pack_windows(docs[32:], t.seq_len, 1)  # (M, T)

    def batches(step):
        idx = step_indices(len(windows), t.batch_size, step, cfg.run.seed)
        return [pretrain.window_batches(windows, idx[i: i + t.micro_batch_size]) for i in range(0, t.batch_size, t.micro_batch_size)]
    evals = [pretrain.window_batches(held, range(0, 2))]
    return build_model(cfg.model, V, 0, 1, seed=0), t, batches, lm_step, lm_count, evals, None


def _rm(cfg):
    """The reward model as stages/reward.py builds it: the LM's trunk with a new scalar head drawn
    after seeding with run.seed, a c · log π_ref term (fixed per-response features), the ranking loss."""
    t, groups = cfg.rm.train, rankings()
    d, lm = distributed.current(), Path(cfg.run.out_dir) / "lm"  # the SFT model it starts from
    if d.main and not (lm / "config.json").is_file():
        build_model(cfg.model, V, 0, 1, seed=0).save_pretrained(lm)
    distributed.barrier(d)
    torch.manual_seed(cfg.run.seed)
    model = scalar_model_from(lm, 0)
    setattr(model.config, LOGLIK_KEY, 0.3)
    g = torch.Generator().manual_seed(2)
    loglik = [(-5 * torch.rand(c.k, generator=g)).tolist() for _, c in groups]  # log π_ref of each response

    def batches(step):
        idx = step_indices(len(groups) - 4, t.batch_size, step, cfg.run.seed)
        return [reward.collate_groups([groups[i] for i in idx[j: j + t.micro_batch_size]], 0, cfg.rm.tie_weight,
                                      [loglik[i] for i in idx[j: j + t.micro_batch_size]])
                for j in range(0, t.batch_size, t.micro_batch_size)]
    evals = [reward.collate_groups(groups[-4:], 0, cfg.rm.tie_weight, loglik[-4:])]
    return model, t, batches, reward.rm_step, reward.rm_count, evals, reward.rm_accuracy


def make_stage(cfg, fail_at=None, name: str = "sft") -> loop.Stage:
    model, t, batches, loss, count, evals, extra = {"sft": _sft, "pretrain": _pretrain, "rm": _rm}[name](cfg)

    def micro_batches(step):
        if step == fail_at:
            raise KeyboardInterrupt
        return batches(step)

    return loop.Stage(name, model, None, t, micro_batches, loss, count, evals, extra)


def curve(out: Path, stage: str = "sft") -> dict[int, dict]:
    """Logged rows of the run under `out`, by step."""
    import json
    return {r["step"]: r for r in map(json.loads, (out / f"t/logs/{stage}.jsonl").read_text().splitlines())}


def global_batch_grads(cfg, name: str = "sft") -> tuple[float, dict[str, torch.Tensor]]:
    """(global mean loss, full gradients) of step 0's batch of stage `name`, split over the ranks."""
    d = distributed.current()
    stage = make_stage(cfg, name=name)
    fwd = distributed.wrap(stage.model, cfg.dist, d)
    micro = stage.micro_batches(0)
    total = sum(stage.count(mb) for mb in micro)
    loss = 0.0
    for mb in distributed.shard(micro, d):
        s, _ = fwd(stage.loss, mb)
        (s / total * d.world).backward()
        loss += float(s.detach())
    grads = {}
    for n, p in stage.model.named_parameters():
        g = p.grad
        grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return distributed.all_sum(loss, d) / total, grads


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    cfg = make_cfg(out, strategy, sys.argv[3] if len(sys.argv) > 3 else "llama")
    d = distributed.setup(cfg.dist)
    for name in STAGES:
        loss, grads = global_batch_grads(cfg, name)
        if d.main:
            torch.save({"loss": loss, "grads": grads}, out / f"grads-{name}.pt")
    try:
        loop.run(make_stage(cfg, fail_at=3), cfg)
        raise AssertionError("the run should have been interrupted")
    except KeyboardInterrupt:
        pass
    loop.run(make_stage(cfg), cfg)  # resumes from the step-2 checkpoint
    for name in STAGES[1:]:
        loop.run(make_stage(cfg, name=name), cfg)
    distributed.teardown()


if __name__ == "__main__":
    main()
    # What is checked is written; skip interpreter shutdown, where gloo's threads have aborted a
    # finished worker once in CI ("terminate called without an active exception", exit -6).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
