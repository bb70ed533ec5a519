"""`cherrytop eval`: a checkpoint's greedy answers, scored, optionally side by side with a baseline's.

- On the built-in world's held-out tasks (the default): helpful / truthful / harmless rates from the
  graders; with `--baseline`, the baseline's rates and the win rate judged by the graders.
- On your own prompts (`--prompts FILE`), which have no grader: the reward model given by `--judge`
  scores every answer; with `--baseline`, its win rate is the judge's (`eval/judge.py`).
- `--judge` on the world's tasks too: the reward model's verdict next to the graders'.
- `--pairs FILE`: both models' answers to each prompt, in random order, as `cherrytop label
  import-prompts` reads them (with the model of each answer), for labelers to rank.
"""

from __future__ import annotations

import random
from pathlib import Path

from cherrytop.config import Config
from cherrytop.data.records import DataError, read_prompts, write_jsonl
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.eval.heldout import AXES, answer_heldout, score
from cherrytop.eval.judge import Judge, judged_win_rate
from cherrytop.eval.versus import win_rate
from cherrytop.model.load import load_model, resolve_checkpoint
from cherrytop.rollout.sampler import generate
from cherrytop.world import World


def _answers(ckpt: Path, cfg: Config, prompts: list[list[dict]] | None, progress: bool):
    """(tasks or None, prompts, greedy answers) of one checkpoint: the world's held-out tasks if
    `prompts` is None, else those prompts."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    e = cfg.eval
    if prompts is None:
        tasks, answers = answer_heldout(model, tok, World(cfg.world), e.n_tasks, e.max_new_tokens, e.batch_size, progress)
        return tasks, [list(t.messages) for t in tasks], answers
    return None, prompts, generate(model, tok, prompts, max_new_tokens=e.max_new_tokens, temperature=0.0,
                                   batch_size=e.batch_size, progress=progress)


def run(cfg: Config, checkpoint: str, baseline: str | None = None, prompts_file: str | None = None,
        judge: str | None = None, pairs: str | None = None, progress: bool = True) -> dict:
    """Everything the options ask for, as one JSON-able dict (see the module docstring)."""
    if prompts_file and not (judge or pairs):
        raise DataError("--prompts has no grader: give --judge REWARD_MODEL (scores and, with --baseline, its win "
                        "rate) or --pairs FILE with --baseline (answers for labelers to rank)")
    if pairs and not baseline:
        raise DataError("--pairs writes two models' answers side by side: give --baseline too")
    ckpt = resolve_checkpoint(checkpoint, cfg)
    base = resolve_checkpoint(baseline, cfg) if baseline else None
    judge_dir = resolve_checkpoint(judge, cfg) if judge else None
    prompts = None
    if prompts_file:
        prompts = [[m.to_json() for m in p.messages] for p in read_prompts(prompts_file)]
    tasks, prompts, answers = _answers(ckpt, cfg, prompts, progress)
    out: dict = {"checkpoint": str(ckpt), "data": prompts_file or "heldout", "n": len(answers)}
    if tasks is not None:
        out.update(score(tasks, answers))
    if base is not None:
        _, _, base_answers = _answers(base, cfg, prompts, progress)
        out["baseline"] = {"checkpoint": str(base)}
        if tasks is not None:
            out["baseline"].update(score(tasks, base_answers))
            out["versus"] = {"grader": win_rate(tasks, answers, base_answers)}
    if judge_dir is not None:
        j = Judge(judge_dir, cfg.eval.batch_size)
        mine = j.scores(prompts, answers)
        out["judge"] = {"checkpoint": str(judge_dir), "mean_reward": sum(mine) / len(mine)}
        if base is not None:
            theirs = j.scores(prompts, base_answers)
            out["judge"]["baseline_mean_reward"] = sum(theirs) / len(theirs)
            out.setdefault("versus", {})["judge"] = judged_win_rate(mine, theirs, answers, base_answers)
        out["judge"].update(answers_cut=j.cut, window=j.seq_len)
    if pairs:
        rng = random.Random(cfg.run.seed)
        names = [str(ckpt), str(base)]
        rows = []
        for p, a, b in zip(prompts, answers, base_answers):
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            pair = (a, b)
            rows.append({"messages": p, "responses": [pair[i] for i in order], "models": [names[i] for i in order]})
        write_jsonl(pairs, rows)
        out["pairs"] = pairs
    return out


def summary(r: dict) -> list[str]:
    """Lines for the terminal."""
    lines = []
    if "helpful" in r:
        lines.append(f"{r['checkpoint']}: " + " ".join(f"{a} {r[a]:.3f}" for a in AXES) + f" (n={r['n']})")
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"{b['checkpoint']}: " + " ".join(f"{a} {b[a]:.3f}" for a in AXES) + f" (n={b['n']})")
    if "judge" in r:
        j = r["judge"]
        text = f"mean reward ({j['checkpoint']}): {j['mean_reward']:.3f}"
        if "baseline_mean_reward" in j:
            text += f" against the baseline's {j['baseline_mean_reward']:.3f}"
        lines.append(text)
        if j.get("answers_cut"):
            lines.append(f"judge: {j['answers_cut']} answers longer than its context window of {j['window']} tokens "
                         f"were scored on their last {j['window']} tokens")
    for by, v in r.get("versus", {}).items():
        lines.append(f"win rate against the baseline, judged by the {'reward model' if by == 'judge' else 'graders'}: "
                     f"{v['win_rate']:.3f} (n={v['n']}, ties count half)")
    if "pairs" in r:
        lines.append(f"answer pairs for labelers: {r['pairs']} (cherrytop label import-prompts {r['pairs']})")
    return lines
