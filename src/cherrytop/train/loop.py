"""The one optimizer loop every training stage runs: gradient accumulation over micro-batches
normalised by the global batch's count, clipping, warm-up + cosine schedule, periodic held-out
evaluation, logging (JSONL + TensorBoard + a progress bar), atomic checkpoints and resume.

Resume: the batches of step s depend only on s (see `data.collate.step_indices`), and the model,
optimizer, schedule and RNG states are saved together, so a killed run started again continues at
the same step with the same loss curve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cherrytop.config import Config, TrainConfig, to_dict
from cherrytop.model import lora
from cherrytop.train import distributed
from cherrytop.train.checkpoint import ResumeError, has_checkpoint, load_state, previous_dir, save_checkpoint

console = Console(stderr=True)

Batch = dict[str, torch.Tensor]


@dataclass
class Stage:
    """What a stage hands the loop."""
    name: str
    """Stage name: also the checkpoint folder under the run."""
    model: torch.nn.Module
    """The model to train (a Hugging Face model or a module with save_pretrained)."""
    tokenizer: Any
    """Saved with every checkpoint."""
    train: TrainConfig
    """The stage's optimisation settings."""
    micro_batches: Callable[[int], list[Batch]]
    """Step index -> the micro-batches of that optimizer step (deterministic in the step)."""
    loss: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
    """(model, micro-batch) -> (summed loss, count it sums over)."""
    count: Callable[[Batch], int]
    """Micro-batch -> the count `loss` will return, known before the forward pass."""
    eval_batches: list[Batch] | None = None
    """Held-out batches for the periodic evaluation loss."""
    extra_metrics: Callable[[torch.nn.Module, Batch], dict[str, float]] | None = None
    """Optional extra metrics on held-out batches (summed over batches, then divided by their number)."""


def lr_lambda(t: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / max(1, t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(stage: Stage, fwd: torch.nn.Module | None = None) -> dict[str, float]:
    """Held-out loss (and extra metrics); `fwd` = the DDP/FSDP-wrapped `distributed.Forward`."""
    model = stage.model
    call = fwd if fwd is not None else (lambda fn, b: fn(model, b))
    was_training = model.training
    model.eval()
    total, count, extra = 0.0, 0, {}
    for b in stage.eval_batches or []:
        b = distributed.to_device(b, distributed.current())
        s, c = call(stage.loss, b)
        total += float(s)
        count += int(c)
        if stage.extra_metrics:
            for k, v in call(stage.extra_metrics, b).items():
                extra[k] = extra.get(k, 0.0) + v / len(stage.eval_batches)
    model.train(was_training)
    return {"eval/loss": total / max(count, 1), **extra}


class MetricsLog:
    """metrics as JSONL (one row per log step) and TensorBoard scalars; on resume, rows past the
    resumed step are dropped so the log shows one clean curve."""

    def __init__(self, run_dir: Path, stage: str, resume_step: int):
        self.path = run_dir / "logs" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.path.exists() and resume_step > 0:
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
        self.path.write_text("".join(r + "\n" for r in rows))
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tb" / stage), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.tb.close()


def stage_section(stage: str) -> str:
    """The config section of a stage's checkpoint: `ppo_ptx` is PPO's, an online DPO round (`dpo_round2`) DPO's."""
    return "ppo" if stage == "ppo_ptx" else "dpo" if stage.startswith("dpo_round") else stage


def settings_sections(cfg: Config, stage: str) -> list[str]:
    """The config sections a stage's checkpoint depends on: its own (`ppo_ptx` is PPO's), the model's,
    LoRA's, and the built-in world's and the tokenizer's where the stage's data comes from them."""
    section = stage_section(stage)
    out = [section, "model", "lora"]
    if stage == "pretrain":
        out += ["tokenizer"] + (["world"] if not cfg.pretrain.data else [])
    if stage == "sft" and not cfg.sft.data:
        out.append("world")
    if stage == "rm" and not cfg.rm.train.data:
        out.append("world")
    if stage in ("ppo", "ppo_ptx"):
        out.append("rl")
    if stage in ("ppo", "ppo_ptx") and not cfg.ppo.prompts:
        out.append("world")
    if section == "dpo" and not cfg.dpo.train.data:
        out.append("world")
    return out


_FREE = {"ppo": ("episodes",), "dpo": ("rounds",)}
"""Settings a checkpoint resumes under whatever their value (besides how often it saves and logs):
PPO's episodes, which no schedule depends on (more of them trains on), and DPO's online rounds (a
round's checkpoint does not depend on how many follow it)."""


def check_same_settings(saved: dict, cfg: Config, stage: str) -> None:
    """Raise ResumeError if the checkpoint's config `saved` differs from `cfg` in a setting the stage's
    result depends on (`settings_sections`, and `run.seed`, which orders its batches)."""
    now, default = to_dict(cfg), to_dict(Config())
    diffs = []
    for section in settings_sections(cfg, stage):
        for k, v in now[section].items():
            if k in _FREE.get(section, ()) + ("save_every", "log_every"):
                continue
            if k not in saved.get(section, {}) and (section == "lora" or section not in saved or v == default[section][k]):
                continue  # a setting newer than the checkpoint (at its default: what the older code did)
            old = saved.get(section, {}).get(k)
            if section == "lora" and k == "stages":  # only whether LoRA trains this stage matters
                old, v = stage_section(stage) in (old or ()), stage_section(stage) in v
            if old != v:
                diffs.append(f"{section}.{k}: {old!r} -> {v!r}")
    if "seed" in saved.get("run", {}) and saved["run"]["seed"] != cfg.run.seed:
        diffs.append(f"run.seed: {saved['run']['seed']!r} -> {cfg.run.seed!r}")
    if diffs:
        raise ResumeError(f"the checkpoint of stage '{stage}' was made with other settings ({'; '.join(diffs)}); "
                          "pass --fresh to start the stage over, or choose another --run.name")


def kept(ckpt: Path, step: int | None) -> str:
    """What a failed run leaves in `ckpt`: its last checkpoint (saved or resumed at `step`), else the
    previous run's one (kept in place, or set aside by `--fresh` and put back), else nothing."""
    if step is not None:
        return f"the last good checkpoint (step {step}) is in {ckpt}"
    if any(has_checkpoint(p) for p in (ckpt, previous_dir(ckpt) / ckpt.name)):
        return f"no checkpoint of this run was saved; the previous one stays in {ckpt}"
    return "no checkpoint was saved"


def run(stage: Stage, cfg: Config, fresh: bool = False) -> dict[str, float]:
    """Train `stage` to `stage.train.max_steps`, resuming from its checkpoint if one is there.
    Returns the final metrics (also saved in the checkpoint's training state)."""
    t = stage.train
    d = distributed.setup(cfg.dist)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt = run_dir / stage.name
    model = stage.model
    fwd = distributed.wrap(model, cfg.dist, d)  # DDP / FSDP around `Forward(model)`; plain in one process
    opt = make_optimizer(model, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    start = 0
    # fresh: the old checkpoint is not read; `cherrytop <stage> --fresh` set it aside (lineage.set_aside)
    # and the first save below replaces it
    state = None if fresh else load_state(ckpt)
    saved = None if state is None else state["step"]  # the step of this run's checkpoint in `ckpt`
    if state is not None:
        check_same_settings(state["config"], cfg, stage.name)
        if distributed.has_shards(ckpt):  # model + optimizer, resharded to this job's processes
            distributed.load_sharded(ckpt, model, opt)
        elif lora.is_lora(model):
            lora.load_adapter(model, ckpt)
        else:
            try:
                trained = type(model).from_pretrained(str(ckpt))
            except (OSError, ValueError, RuntimeError) as e:
                raise ResumeError(f"{ckpt}: the checkpoint's model does not load ({str(e).splitlines()[0]}); "
                                  f"pass --fresh to train stage '{stage.name}' over") from None
            model.load_state_dict(trained.state_dict())
        if state["step"] >= t.max_steps:
            if d.main:
                console.print(f"[green]{stage.name}[/]: already trained ({state['step']} steps) in {ckpt}; "
                              "pass --fresh to train it again")
            return state["metrics"]
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        if d.main:
            console.print(f"[yellow]{stage.name}[/]: resuming from step {start} of {t.max_steps} ({ckpt})")
    log = MetricsLog(run_dir, stage.name, start) if d.main else distributed.NoLog()
    model.train()
    metrics: dict[str, float] = dict(state["metrics"]) if state else {}

    def save(step: int) -> None:
        nonlocal saved
        _save(step)
        saved = step

    def _save(step: int) -> None:
        if distributed.is_sharded(fwd):  # every rank writes its shards (optimizer included)
            distributed.save_sharded(ckpt, model, opt, stage.tokenizer, cfg, {
                "stage": stage.name, "step": step, "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                "config": to_dict(cfg), "metrics": metrics}, full=step == t.max_steps, d=d)
            return
        if d.main:
            save_checkpoint(ckpt, lora.saveable(model), stage.tokenizer, cfg, {
                "stage": stage.name, "step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "config": to_dict(cfg), "metrics": metrics,
            })
        distributed.barrier(d)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    t0, tokens = time.perf_counter(), 0
    with Progress(*columns, console=console, transient=False, disable=not d.main) as bar:
        task = bar.add_task(stage.name, total=t.max_steps, completed=start, info="")
        for step in range(start, t.max_steps):
            micro = stage.micro_batches(step)
            total = sum(stage.count(mb) for mb in micro)  # over the global batch
            mine = distributed.shard(micro, d)  # this rank's micro-batches (all of them in one process)
            loss_sum = 0.0
            for i, mb in enumerate(mine):
                with distributed.no_grad_sync(fwd, i < len(mine) - 1):
                    with lora.autocast(d.device, cfg.dist.bf16):
                        s, _ = fwd(stage.loss, distributed.to_device(mb, d))
                    (s / max(total, 1) * d.world).backward()  # DDP / FSDP average over the d.world ranks
                loss_sum += float(s.detach())
                tokens += int(mb["input_ids"].numel()) if "input_ids" in mb else 0
            gnorm = distributed.full_norm(
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
            loss = distributed.all_sum(loss_sum, d) / max(total, 1)
            if not math.isfinite(loss) or not math.isfinite(float(gnorm)):
                raise FloatingPointError(f"{stage.name}: non-finite loss or gradient at step {step + 1} "
                                         f"(loss {loss}, grad norm {float(gnorm)}); {kept(ckpt, saved)}")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            row = {"train/loss": loss, "train/grad_norm": float(gnorm), "train/lr": sched.get_last_lr()[0]}
            if done % t.log_every == 0 or done == t.max_steps:
                elapsed = time.perf_counter() - t0
                row["perf/tokens_per_s"] = tokens / max(elapsed, 1e-9)
            if stage.eval_batches and (done % t.eval_every == 0 or done == t.max_steps):
                row.update(evaluate(stage, fwd))
            if done % t.log_every == 0 or done == t.max_steps or "eval/loss" in row:
                log.log(done, row)
            metrics.update(row)
            info = f"loss {loss:.3f}" + (f" | eval {row['eval/loss']:.3f}" if "eval/loss" in row else "")
            bar.update(task, completed=done, info=info)
            if done % t.save_every == 0 or done == t.max_steps:
                save(done)
    log.close()
    if d.main:
        console.print(f"[green]{stage.name}[/]: done, {t.max_steps} steps; checkpoint {ckpt}")
    return metrics
