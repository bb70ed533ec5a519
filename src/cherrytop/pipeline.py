"""Every stage in order — the embedded default:
pretrain → SFT → compare (sample K + rank) → RM → PPO (and PPO-ptx) → evaluation and report;
with `--pipeline.align=dpo`: pretrain → SFT → compare → DPO → evaluation and report.

`cherrytop pipeline --preset tiny` writes `runs/<name>/report.json` and `report.md`: each stage's
wall time; helpful / truthful / harmless rates of each model on held-out tasks; labeler agreement;
reward-model accuracy; PPO's win rate against SFT (noise-free grader, ties half) and its KL to SFT;
the held-out pretraining loss of each model (the alignment tax, with and without PPO-ptx); reward
and KL curves as PNG. A stage whose checkpoint is complete is skipped, so a killed pipeline started
again resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.table import Table

from cherrytop.config import Config, to_dict
from cherrytop.data.collate import pack_windows
from cherrytop.data.records import write_text_atomically
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.eval.heldout import AXES, answer_heldout, score
from cherrytop.eval.judge import Judge, judged_win_rate
from cherrytop.eval.versus import kl_to_reference, lm_loss_on, win_rate
from cherrytop.model.load import load_model
from cherrytop.lineage import check_own_settings, has_output, unfinished, inputs, prepare, recorded, stale_reason
from cherrytop.stages import STAGES, pretrain, runner
from cherrytop.train.checkpoint import ResumeError, load_state
from cherrytop.train.loop import console
from cherrytop.world import World

MODELS = tuple(s.name for s in STAGES.values() if s.policy)
"""The stages whose policies the report evaluates."""


ALIGN = {"ppo": ("rm", "ppo", "ppo_ptx"), "dpo": ("dpo",)}
"""The stages after compare that each `pipeline.align` runs."""


def stage_config(name: str, cfg: Config) -> Config | None:
    """The config a stage runs with (PPO-ptx: PPO's with the pipeline's ptx_coef), None for a stage
    that does not run (one of the other `pipeline.align`, PPO-ptx without a ptx coefficient)."""
    if any(name in stages for align, stages in ALIGN.items() if align != cfg.pipeline.align):
        return None
    if name != "ppo_ptx":
        return cfg
    if cfg.ppo.ptx_coef == 0 and cfg.pipeline.ptx_coef == 0:
        return None
    coef = cfg.ppo.ptx_coef or cfg.pipeline.ptx_coef
    return dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=coef))


def _run_stage(name: str, cfg: Config, fresh: bool) -> dict:
    scfg = stage_config(name, cfg)
    if scfg is None:
        return {}
    fresh = prepare(name, scfg, fresh, redo_stale=True)
    with recorded(name, scfg, fresh):  # PPO on Ray actors with --ray.enabled, as `cherrytop ppo` runs it
        return runner(name, scfg)(scfg, fresh=fresh)


def finished(name: str, cfg: Config) -> tuple[dict | None, str]:
    """A stage that was not run this time (after `--until`): its metrics if its output is finished,
    made with these settings and up to date with its inputs, else None and why not."""
    scfg = stage_config(name, cfg)
    if scfg is None:
        return None, "not configured"
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if not has_output(name, run_dir):
        return None, "not trained"
    try:
        if name == "compare":
            metrics = json.loads((run_dir / "data" / "comparisons.stats.json").read_text())
        else:
            state = load_state(run_dir / name, peek=True)
            check_own_settings(name, state, scfg)
            if why := unfinished(name, run_dir):
                return None, f"half trained ({why})"
            if name == "rm" and "accuracy_labelers" not in state["metrics"]:
                return None, "half trained (no held-out accuracy yet)"
            metrics = state["metrics"]
    except (ResumeError, ValueError, OSError) as e:
        return None, str(e)
    if why := stale_reason(name, scfg):
        return None, f"out of date ({why})"
    return metrics, ""


def plot_curves(run_dir: Path, out: Path, names: list[str] | tuple[str, ...] = ("ppo", "ppo_ptx")) -> bool:
    """Reward and KL per episode of the PPO runs (`names`), as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {n: run_dir / "logs" / f"{n}.jsonl" for n in names}
    logs = {n: [json.loads(r) for r in p.read_text().splitlines()] for n, p in logs.items() if p.is_file()}
    if not logs:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in logs.items():
        x = [r["step"] for r in rows]
        axes[0].plot(x, [r["objective/score"] for r in rows], label=name)
        axes[1].plot(x, [r["objective/kl"] for r in rows], label=name)
        axes[2].plot(x, [r["rollout/length"] for r in rows], label=name)
    for ax, title in zip(axes, ("reward-model score", "KL to SFT (nats / response)", "response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("episodes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def evaluate_all(cfg: Config, run_dir: Path, models: list[str], judge_ok: bool = True) -> dict:
    world = World(cfg.world)
    out: dict = {"eval": {}, "versus_sft": {}, "pretrain_loss": {}}
    answers = {}
    tasks = None
    windows = None
    for name in models:
        model, tok = load_model(run_dir / name), load_tokenizer(run_dir / name)
        tasks, answers[name] = answer_heldout(model, tok, world, cfg.eval.n_tasks, cfg.eval.max_new_tokens,
                                              cfg.eval.batch_size, progress=True)
        out["eval"][name] = score(tasks, answers[name])
        if windows is None:
            _, held_docs = pretrain.corpus(cfg)
            windows = pack_windows(pretrain.tokenize_documents(tok, held_docs), cfg.pretrain.seq_len, tok.eos_token_id)
        out["pretrain_loss"][name] = lm_loss_on(model, windows)
    if "sft" in answers:
        ref = load_model(run_dir / "sft")
        tok = load_tokenizer(run_dir / "sft")
        prompts = [list(t.messages) for t in tasks]
        judge = Judge(run_dir / "rm", cfg.eval.batch_size) if judge_ok and (run_dir / "rm" / "config.json").is_file() else None
        rewards = {name: judge.scores(prompts, answers[name]) for name in answers} if judge else {}
        out["mean_reward"] = {name: sum(r) / len(r) for name, r in rewards.items()}
        for name in models:
            if name not in ("pretrain", "sft"):  # the aligned policies: PPO, PPO-ptx, DPO
                policy = load_model(run_dir / name)
                out["versus_sft"][name] = {
                    **win_rate(tasks, answers[name], answers["sft"]),
                    "kl_to_sft": kl_to_reference(policy, ref, tok, prompts, cfg.ppo.max_new_tokens, cfg.ppo.temperature,
                                                 cfg.eval.batch_size, cfg.run.seed),
                }
                if judge:  # the reward model's verdict on the same answers: how far the proxy PPO optimised is from the graders
                    out["versus_sft"][name]["judge"] = judged_win_rate(rewards[name], rewards["sft"], answers[name],
                                                                       answers["sft"])
    return out


def report_markdown(r: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# cherrytop run `{r['run']}`", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["wall_time_s"].items()]
    lines += ["", "## Held-out tasks (greedy answers, graded)", "",
              "| model | " + " | ".join(AXES) + " | quality | held-out pretraining loss | mean reward |",
              "|---|---|---|---|---|---|---|"]
    for name, e in r["eval"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(e[a]) for a in AXES) +
                     f" | {e['quality']:.2f} | {r['pretrain_loss'].get(name, float('nan')):.3f} | "
                     f"{fmt(r.get('mean_reward', {}).get(name))} |")
    if "uniform_loss" in r.get("pretrain", {}):
        lines += ["", f"Uniform-guess loss: {r['pretrain']['uniform_loss']:.3f} nats/token."]
    if r.get("compare"):
        lines += ["", f"Labeler agreement: {r['compare']['labeler_agreement']:.3f} on {r['compare']['agreement_pairs']} "
                      "held-out pairs (InstructGPT: 72.6 ± 1.5 %)."]
    if r.get("rm"):
        lines += [f"Reward model held-out pairwise accuracy: {r['rm']['accuracy_labelers']:.3f} vs labelers, "
                  f"{r['rm']['accuracy_grader']:.3f} vs the noise-free grader order"
                  + (f" (pairs of sampled answers; pairs with an edited answer: {r['rm']['accuracy_labelers_edits']:.3f} / "
                     f"{r['rm']['accuracy_grader_edits']:.3f})." if "accuracy_grader_edits" in r["rm"] else ".")]
    for name, v in r.get("versus_sft", {}).items():
        judged = f"; judged by the reward model {v['judge']['win_rate']:.3f}" if "judge" in v else ""
        lines += ["", f"**{name} vs SFT**: win rate {v['win_rate']:.3f} (n={v['n']}, ties half{judged}), "
                      f"KL to SFT {v['kl_to_sft']:.2f} nats per response.", "",
                  "| kind | win rate |", "|---|---|"] + [f"| {k} | {w:.2f} |" for k, w in v["by_kind"].items()]
    kinds = sorted({k for e in r["eval"].values() for k in e["by_kind"]})
    lines += ["", "## Per task kind (helpful / truthful / harmless)", "",
              "| kind | " + " | ".join(r["eval"]) + " |", "|---|" + "---|" * len(r["eval"])]
    f2 = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(" / ".join(f2(e["by_kind"].get(k, {}).get(a)) for a in AXES)
                                              for e in r["eval"].values()) + " |")
    if r.get("plot"):
        lines += ["", f"![PPO curves]({r['plot']})"]
    if r.get("not_run"):
        lines += ["", f"Not in this report (`--until {r['until']}`): "
                      + "; ".join(f"{k}: {v}" for k, v in r["not_run"].items()) + "."]
    return "\n".join(lines) + "\n"


def print_table(r: dict) -> None:
    table = Table(title=f"cherrytop run '{r['run']}': held-out tasks (greedy)")
    for col in ("model", *AXES, "quality", "pretrain loss", "mean reward"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, e in r["eval"].items():
        reward = r.get("mean_reward", {}).get(name)
        table.add_row(name, *(f"{e[a]:.3f}" if e[a] is not None else "–" for a in AXES), f"{e['quality']:.2f}",
                      f"{r['pretrain_loss'][name]:.3f}", "–" if reward is None else f"{reward:.3f}")
    console.print(table)
    for name, v in r.get("versus_sft", {}).items():
        judged = f" (reward model: {v['judge']['win_rate']:.3f})" if "judge" in v else ""
        console.print(f"{name} vs sft: win rate {v['win_rate']:.3f}{judged}, KL to SFT {v['kl_to_sft']:.2f} nats/response")
    if r.get("rm"):
        console.print(f"reward model accuracy: {r['rm']['accuracy_labelers']:.3f} vs labelers, "
                      f"{r['rm']['accuracy_grader']:.3f} vs grader; labeler agreement {r['compare']['labeler_agreement']:.3f}")
    console.print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["wall_time_s"].items()))


def run(cfg: Config, until: str = list(STAGES)[-1], fresh: bool = False) -> dict:
    """Every stage up to `until` (a finished one is skipped, a stale one trained again), then the
    evaluation and the report. The report covers the whole run: a stage after `until` that is finished,
    made with these settings and up to date with its inputs is evaluated and reported as if skipped;
    the others are listed under `not_run` with the reason."""
    if until not in STAGES:
        raise ValueError(f"--until {until}: expected one of {', '.join(STAGES)}")
    order = list(STAGES)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    report: dict = {"run": cfg.run.name, "config": to_dict(cfg), "wall_time_s": {}}
    t_start = time.perf_counter()
    done = []
    for name in order[: order.index(until) + 1]:
        if stage_config(name, cfg) is None:  # the other alignment's stages, PPO-ptx when not asked for
            continue
        t0 = time.perf_counter()
        console.rule(f"[bold]{name}")
        metrics = _run_stage(name, cfg, fresh)
        if metrics:
            report[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            report["wall_time_s"][name] = time.perf_counter() - t0
            done.append(name)
    later = order[order.index(until) + 1:]
    if later:
        report["until"] = until
        report["not_run"] = {}
        for name in later:
            metrics, why = finished(name, cfg) if not fresh else (None, "the run was started over (--fresh)")
            if metrics is not None and all(u[6:] in done for u in inputs(name, cfg) if u.startswith("stage:")):
                report[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                done.append(name)
            elif why != "not configured":
                report["not_run"][name] = why or "an earlier stage it needs is not in this report"
        if report["not_run"]:
            console.print("not in this report: " + "; ".join(f"{k} ({v})" for k, v in report["not_run"].items()))
    t0 = time.perf_counter()
    console.rule("[bold]eval")
    report.update(evaluate_all(cfg, run_dir, [m for m in MODELS if m in done], judge_ok="rm" in done))
    report["wall_time_s"]["eval"] = time.perf_counter() - t0
    report["wall_time_s"]["total"] = time.perf_counter() - t_start
    if plot_curves(run_dir, run_dir / "ppo_curves.png", [n for n in ("ppo", "ppo_ptx") if n in done]):
        report["plot"] = "ppo_curves.png"
    else:
        (run_dir / "ppo_curves.png").unlink(missing_ok=True)
    write_text_atomically(run_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomically(run_dir / "report.md", report_markdown(report))
    print_table(report)
    console.print(f"report: {run_dir / 'report.md'}")
    return report
