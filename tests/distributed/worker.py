"""One rank of a 2-process gloo job (started by test_data_parallel.py with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, as torchrun would): the gradients of one global batch, then a
training run killed after step 3 and resumed from its step-2 checkpoint.

Also imported by the test for the single-process reference (same data, model and settings)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cherrytop.config import load_config
from cherrytop.data.collate import pad_batch, step_indices
from cherrytop.model.load import build_model
from cherrytop.train import distributed, loop
from cherrytop.train.lm import lm_count, lm_step

V = 40


def make_cfg(out: Path, strategy: str, arch: str = "llama"):
    return load_config("test", [], [f"--run.out_dir={out}", "--run.name=t", f"--model.arch={arch}",
                                    "--sft.batch_size=8", "--sft.micro_batch_size=2", "--sft.max_steps=4",
                                    "--sft.save_every=2", "--sft.log_every=1", "--sft.eval_every=2",
                                    "--sft.warmup_steps=1", f"--dist.strategy={strategy}"])


def rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, V, (5 + i % 7,), generator=g).tolist()
        out.append((ids, [-100] * 2 + ids[2:]))
    return out


def make_stage(cfg, fail_at=None):
    t, data = cfg.sft, rows()
    model = build_model(cfg.model, V, 0, 1, seed=0)

    def micro_batches(step):
        if step == fail_at:
            raise KeyboardInterrupt
        idx = step_indices(len(data), t.batch_size, step, cfg.run.seed)
        return [pad_batch([data[i] for i in idx[j: j + t.micro_batch_size]], 0) for j in range(0, t.batch_size, t.micro_batch_size)]

    return loop.Stage("sft", model, None, t, micro_batches, lm_step, lm_count, [pad_batch(data[:4], 0)])


def curve(out: Path) -> dict[int, dict]:
    """Logged rows of the run under `out`, by step."""
    import json
    return {r["step"]: r for r in map(json.loads, (out / "t/logs/sft.jsonl").read_text().splitlines())}


def global_batch_grads(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    """(global token-mean loss, full gradients) of step 0's batch, split over the ranks."""
    d = distributed.current()
    stage = make_stage(cfg)
    fwd = distributed.wrap(stage.model, cfg.dist, d)
    micro = stage.micro_batches(0)
    total = sum(stage.count(mb) for mb in micro)
    loss = 0.0
    for mb in distributed.shard(micro, d):
        s, _ = fwd(stage.loss, mb)
        (s / total * d.world).backward()
        loss += float(s.detach())
    grads = {}
    for name, p in stage.model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return distributed.all_sum(loss, d) / total, grads


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    cfg = make_cfg(out, strategy, sys.argv[3] if len(sys.argv) > 3 else "llama")
    d = distributed.setup(cfg.dist)
    loss, grads = global_batch_grads(cfg)
    if d.main:
        torch.save({"loss": loss, "grads": grads}, out / "grads.pt")
    try:
        loop.run(make_stage(cfg, fail_at=3), cfg)
        raise AssertionError("the run should have been interrupted")
    except KeyboardInterrupt:
        pass
    loop.run(make_stage(cfg), cfg)  # resumes from the step-2 checkpoint
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
