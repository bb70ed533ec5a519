"""The loop's report across rounds: runs/<name>/loop.md (a table per round: what came in, the reward model's
accuracy on new and old pairs, the policy's rates, win rate and KL against SFT, its arena rating with its
interval, the gate's verdict) and loop.png (rating with its interval, and win rate against SFT, by round)."""

from __future__ import annotations

from pathlib import Path

from cherrytop.config import Config


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def rows(state: dict, rounds: int) -> tuple[list[dict], dict | None]:
    """(one flat record per finished round, for the table and the plot; the last finished round's arena)."""
    out = []
    last_arena = None
    for r in range(1, rounds + 1):
        steps = state["rounds"].get(str(r), {}).get("steps", {})
        if "gate" not in steps:
            continue
        c, e, a = steps["collect"], steps["eval"], steps["arena"]
        last_arena = a
        acc = e.get("rm_accuracy") or {}
        chat = c["chat"]
        n = max(chat["served"], 1)
        me = a["ratings"][f"round-{r}"]
        out.append({
            "round": r, "served": c["served"]["version"], "answers_rated": chat["served"],
            "up": chat["ratings"]["up"] / n, "down": chat["ratings"]["down"] / n, "report": chat["ratings"]["report"] / n,
            "rankings": c["rankings"], "labeler_agreement": c["labeler_agreement"],
            "rm_newest": (acc.get("newest") or {}).get("labelers"), "rm_newest_grader": (acc.get("newest") or {}).get("grader"),
            "rm_base": (acc.get("base") or {}).get("labelers"),
            "rm1_newest": (acc.get("newest_by_round_1_rm") or {}).get("labelers"),
            "rm1_newest_grader": (acc.get("newest_by_round_1_rm") or {}).get("grader"),
            "win_rate": e["versus_sft"]["win_rate"], "kl_to_sft": e["kl_to_sft"],
            **{ax: e["rates"][ax] for ax in ("helpful", "truthful", "harmless")},
            "elo": me["elo"], "low": me["low"], "high": me["high"], "promoted": steps["gate"]["promoted"],
            "wall_time_s": state.get("wall_time_s", {}).get(str(r))})
    return out, last_arena


def markdown(cfg: Config, state: dict, rounds: int) -> str:
    table, arena = rows(state, rounds)
    lines = [f"# cherrytop loop `{cfg.run.name}`: {len(table)} of {rounds} round(s)", "",
             f"Policy update: `{'dpo' if cfg.pipeline.align == 'dpo' else cfg.rl.algorithm}`; KL reference "
             f"`{cfg.loop.reference}`; reward model `{cfg.loop.rm}`; labelers `{cfg.loop.labelers}`.", "",
             "| round | served | answers rated | 👍 / 👎 / report | rankings | labeler agreement | RM acc. newest, "
             "labelers (round 1's RM) | RM acc. newest, grader (round 1's RM) | RM acc. base | win vs SFT | KL to SFT "
             "| helpful / truthful / harmless | arena rating (95 %) | promoted | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in table:
        lines.append(
            f"| {x['round']} | {x['served']} | {x['answers_rated']} | {x['up']:.2f} / {x['down']:.2f} / {x['report']:.2f} "
            f"| {x['rankings']} | {_f(x['labeler_agreement'])} | {_f(x['rm_newest'])} ({_f(x['rm1_newest'])}) "
            f"| {_f(x['rm_newest_grader'])} ({_f(x['rm1_newest_grader'])}) "
            f"| {_f(x['rm_base'])} | {x['win_rate']:.3f} | {x['kl_to_sft']:.2f} "
            f"| {_f(x['helpful'])} / {_f(x['truthful'])} / {_f(x['harmless'])} "
            f"| {x['elo']:.0f} ({x['low']:.0f} – {x['high']:.0f}) | {'yes' if x['promoted'] else 'no'} "
            f"| {_f(x['wall_time_s'], 0)} |")
    if table:
        lines += ["", "## Arena after the last round", "",
                  f"{arena['battles']} battles on held-out tasks, judged by a simulated rater (answers in random "
                  "order, ties half); SFT fixed at 1000.", ""]
        from cherrytop.eval.arena import Rating, leaderboard
        rated = sorted((Rating(**v) for v in arena["ratings"].values()), key=lambda r: -r.elo)
        lines += [leaderboard(rated), "Gates:", ""]
        lines += [f"- round {x['round']}: " + state["rounds"][str(x["round"])]["steps"]["gate"]["verdict"] for x in table]
        lines += ["", "![rating and win rate by round](loop.png)"]
    return "\n".join(lines) + "\n"


def plot(state: dict, rounds: int, out: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, arena = rows(state, rounds)
    if not table:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    sft = arena["ratings"]["sft"]
    xs = [0] + [x["round"] for x in table]
    final = [arena["ratings"].get(f"round-{x['round']}") for x in table]
    elo = [sft["elo"]] + [f["elo"] for f in final]
    low = [sft["low"]] + [f["low"] for f in final]
    high = [sft["high"]] + [f["high"] for f in final]
    a1.errorbar(xs, elo, yerr=[[e - lo for e, lo in zip(elo, low)], [h - e for e, h in zip(elo, high)]], fmt="o-",
                capsize=4)
    a1.set_title("arena rating (95 % interval), last round's fit")
    a1.set_xlabel("round (0 = SFT)")
    a2.plot(xs, [0.5] + [x["win_rate"] for x in table], "o-")
    a2.set_title("win rate vs SFT (held-out, grader)")
    a2.set_xlabel("round (0 = SFT)")
    for ax in (a1, a2):
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def write_report(cfg: Config, state: dict, rounds: int) -> None:
    from cherrytop.data.records import write_text_atomically
    from cherrytop.loop.rounds import run_dir
    d = run_dir(cfg)
    plot(state, rounds, d / "loop.png")
    write_text_atomically(d / "loop.md", markdown(cfg, state, rounds))
