"""Every stage in order — the embedded default: pretrain → SFT → evaluation, with a report.

`cherrytop pipeline --preset tiny` writes `runs/<name>/report.json` and `report.md`: each stage's
wall time, and the helpful / truthful / harmless rates of each model on held-out tasks.
A stage whose checkpoint is complete is skipped, so a killed pipeline started again resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from cherrytop.config import Config, to_dict
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.eval.heldout import AXES, evaluate
from cherrytop.model.load import load_model
from cherrytop.stages import pretrain, sft
from cherrytop.train.loop import console
from cherrytop.world import World

STAGES = ("pretrain", "sft")


def evaluate_checkpoint(cfg: Config, ckpt: Path) -> dict:
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    return evaluate(model, tok, World(cfg.world), cfg.eval.n_tasks, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                    progress=True)


def report_markdown(report: dict) -> str:
    lines = [f"# cherrytop run `{report['run']}`", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["wall_time_s"].items()]
    lines += ["", "## Held-out tasks (greedy)", "", "| model | " + " | ".join(AXES) + " | quality |",
              "|---|" + "---|" * (len(AXES) + 1)]
    for name, r in report["eval"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[a]:.3f}" for a in AXES) + f" | {r['quality']:.2f} |")
    if "pretrain" in report:
        p = report["pretrain"]
        lines += ["", f"Pretraining: held-out loss {p['eval/loss']:.3f} nats/token "
                      f"(uniform baseline {p['uniform_loss']:.3f})."]
    kinds = sorted({k for r in report["eval"].values() for k in r["by_kind"]})
    lines += ["", "## Per task kind (helpful / truthful / harmless)", "",
              "| kind | " + " | ".join(report["eval"]) + " |", "|---|" + "---|" * len(report["eval"])]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for k in kinds:
        cells = []
        for r in report["eval"].values():
            b = r["by_kind"].get(k, {})
            cells.append(" / ".join(fmt(b.get(a)) for a in AXES))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    table = Table(title=f"cherrytop run '{report['run']}': held-out tasks (greedy)")
    table.add_column("model")
    for a in AXES:
        table.add_column(a, justify="right")
    table.add_column("quality", justify="right")
    for name, r in report["eval"].items():
        table.add_row(name, *(f"{r[a]:.3f}" for a in AXES), f"{r['quality']:.2f}")
    console.print(table)
    console.print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["wall_time_s"].items()))


def run(cfg: Config, until: str = STAGES[-1], fresh: bool = False) -> dict:
    if until not in STAGES:
        raise ValueError(f"--until {until}: expected one of {', '.join(STAGES)}")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    report: dict = {"run": cfg.run.name, "config": to_dict(cfg), "wall_time_s": {}, "eval": {}}
    t_start = time.perf_counter()
    for name in STAGES[: STAGES.index(until) + 1]:
        t0 = time.perf_counter()
        console.rule(f"[bold]{name}")
        metrics = {"pretrain": pretrain, "sft": sft}[name].run(cfg, fresh=fresh)
        report[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        report["wall_time_s"][name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    console.rule("[bold]eval")
    for name in STAGES[: STAGES.index(until) + 1]:
        report["eval"][name] = evaluate_checkpoint(cfg, run_dir / name)
    report["wall_time_s"]["eval"] = time.perf_counter() - t0
    report["wall_time_s"]["total"] = time.perf_counter() - t_start
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(report_markdown(report))
    print_table(report)
    console.print(f"report: {run_dir / 'report.md'}")
    return report
