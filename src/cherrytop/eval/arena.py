"""Arena ratings of model versions from pairwise battles [CA]: a Bradley–Terry fit, P(i beats j) =
σ(θ_i − θ_j), by maximum likelihood over every battle (a tie or "both bad" is half a win each way), on
the Elo scale (θ · 400 / ln 10 + 1000, one model fixed at 1000), with 95 % intervals from a bootstrap
over the battles (resampled with replacement, refitted, 2.5 / 97.5 percentiles).

A battle is (model a, model b, outcome): 1 = a won, 0 = b won, 0.5 = tie."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0 / math.log(10.0)
"""Elo points per unit of θ."""

Battle = tuple[str, str, float]


@dataclass(frozen=True)
class Rating:
    model: str
    elo: float
    """The fitted rating (the anchor model: 1000)."""
    low: float
    """2.5th percentile of the bootstrap ratings."""
    high: float
    """97.5th percentile of the bootstrap ratings."""
    battles: int
    """Battles the model was in."""

    def beats(self, other: "Rating") -> bool:
        """Better with non-overlapping 95 % intervals."""
        return self.low > other.high


def fit(battles: Sequence[Battle], models: Sequence[str], anchor: str, l2: float = 1e-6, iters: int = 100) -> np.ndarray:
    """(len(models),) Elo ratings maximising the Bradley–Terry likelihood of `battles` with `anchor` at 1000
    (Newton's method on the concave log-likelihood, θ_anchor held at 0; `l2`, a tiny ridge, keeps a model
    that won or lost every battle, or is in none, finite)."""
    index = {m: i for i, m in enumerate(models)}
    kinds, of = _kinds(battles, index)
    return _fit(kinds, np.bincount(of, minlength=len(kinds)), len(models), index[anchor], l2, iters)


def _kinds(battles: Sequence[Battle], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The likelihood depends on a battle only through (a, b, outcome): ((M, 3) the distinct ones, rows
    (a index, b index, outcome); (N,) each battle's row)."""
    codes = np.array([(index[x] * len(index) + index[y]) * 3 + int(o * 2) for x, y, o in battles])  # (N,)
    distinct, of = np.unique(codes, return_inverse=True)
    n = len(index)
    return np.stack([distinct // 3 // n, distinct // 3 % n, distinct % 3 / 2.0], axis=1), of


def _fit(kinds: np.ndarray, count: np.ndarray, n: int, anchor: int, l2: float = 1e-6, iters: int = 100) -> np.ndarray:
    """`fit` on battles counted by kind: (M, 3) kinds (a, b, outcome), (M,) how many battles of each."""
    a, b, y = kinds[:, 0].astype(int), kinds[:, 1].astype(int), kinds[:, 2]  # (M,)
    theta = np.zeros(n)
    free = np.arange(n) != anchor  # (n,)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))  # (M,) P(a beats b)
        r = count * (y - p)  # (M,)
        grad = np.bincount(a, r, n) - np.bincount(b, r, n) - l2 * theta  # (n,)
        w = count * p * (1.0 - p)  # (M,)
        hess = np.zeros((n, n))
        np.add.at(hess, (a, a), -w)
        np.add.at(hess, (b, b), -w)
        np.add.at(hess, (a, b), w)
        np.add.at(hess, (b, a), w)
        hess -= l2 * np.eye(n)
        step = np.zeros(n)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])  # θ_anchor stays 0: the shift is fixed
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta * SCALE + 1000.0


def ratings(battles: Sequence[Battle], anchor: str, rounds: int = 1000, seed: int = 0) -> list[Rating]:
    """Every model's rating and bootstrap 95 % interval, best first."""
    if not battles:
        raise ValueError("no battles to rate")
    models = sorted({x for x, _, _ in battles} | {y for _, y, _ in battles})
    if anchor not in models:
        raise ValueError(f"anchor model {anchor!r} is in no battle; models: {', '.join(models)}")
    for x, y, o in battles:
        if o not in (0.0, 0.5, 1.0) or x == y:
            raise ValueError(f"battle ({x!r}, {y!r}, {o!r}): expected two models and an outcome of 1, 0 or 0.5")
    index = {m: i for i, m in enumerate(models)}
    kinds, of = _kinds(battles, index)
    n, at, n_kinds = len(models), index[anchor], len(kinds)
    per_kind = np.bincount(of, minlength=n_kinds)  # (M,) battles of each kind
    elo = _fit(kinds, per_kind, n, at)
    rng = np.random.default_rng(seed)
    boot = np.stack([_fit(kinds, np.bincount(of[rng.integers(0, len(battles), len(battles))], minlength=n_kinds), n, at)
                     for _ in range(rounds)])  # (rounds, n): battles resampled with replacement
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    count = np.bincount(kinds[:, 0].astype(int), per_kind, n) + np.bincount(kinds[:, 1].astype(int), per_kind, n)  # (n,)
    out = [Rating(m, float(elo[i]), float(low[i]), float(high[i]), int(count[i])) for i, m in enumerate(models)]
    return sorted(out, key=lambda r: -r.elo)


def _sides(tasks: Sequence, answers: dict[str, Sequence[str]], seed: int):
    """(task index, task, model shown first, model shown second) for every pair of models on every task."""
    rng = np.random.default_rng(seed)
    names = sorted(answers)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for n, task in enumerate(tasks):
                yield (n, task, *((a, b) if rng.random() < 0.5 else (b, a)))  # which answer the rater sees first


def judged_battles(tasks: Sequence, answers: dict[str, Sequence[str]], rank, seed: int = 0) -> list[Battle]:
    """Every pair of models on every task: their two answers shown in random order to `rank(task,
    [first, second])` (a `SimulatedLabeler.rank`: a ranking with ties), the outcome for the model named first."""
    out = []
    for n, task, x, y in _sides(tasks, answers, seed):
        r = rank(task, [answers[x][n], answers[y][n]])
        out.append((x, y, 0.5 if r.ties else float(r.ranking[0] == 0)))
    return out


def battle_rows(tasks: Sequence, answers: dict[str, Sequence[str]], seed: int = 0) -> list[dict]:
    """The same battles as `judged_battles` for people: the feedback store's rows (prompt, model_a, answer_a,
    model_b, answer_b; a is shown on the left), voted on in the labelling app's arena page."""
    return [{"prompt": [dict(m) for m in task.messages], "model_a": x, "answer_a": answers[x][n], "model_b": y,
             "answer_b": answers[y][n]} for n, task, x, y in _sides(tasks, answers, seed)]


def voted_battles(store, rows: list[dict], tag: str, votes_needed: int, poll_s: float) -> list[Battle]:
    """People's verdicts: `rows` go into the store's arena page under `tag` (once: a second call waits on the
    same battles), then the outcomes once every battle has its votes."""
    from cherrytop.feedback.waiting import wait_for
    if store.battle_progress(tag)[1] == 0:
        store.add_battles(rows, votes_needed, tag)
    wait_for(lambda: store.battle_progress(tag), f"arena votes ({tag})", poll_s)
    return store.battle_outcomes(tag)


def leaderboard(rated: Sequence[Rating]) -> str:
    """A Markdown table, best first; a model whose interval lies wholly above the next one's is marked."""
    lines = ["| rank | model | rating | 95 % interval | battles |", "|---|---|---|---|---|"]
    for n, r in enumerate(rated):
        sep = " (above the next, intervals apart)" if n + 1 < len(rated) and r.beats(rated[n + 1]) else ""
        lines.append(f"| {n + 1} | {r.model} | {r.elo:.0f}{sep} | {r.low:.0f} – {r.high:.0f} | {r.battles} |")
    return "\n".join(lines) + "\n"


def write_leaderboard(rated: Sequence[Rating], battles: int, out) -> str:
    """leaderboard.md, .json and .png in the folder `out`; returns the Markdown table."""
    import json
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = leaderboard(rated)
    (out / "leaderboard.md").write_text(table)
    (out / "leaderboard.json").write_text(json.dumps({"battles": battles, "ratings": [vars(r) for r in rated]}, indent=2))
    plot(rated, out / "leaderboard.png")
    return table


def plot(rated: Sequence[Rating], out) -> None:
    """The ratings with their 95 % intervals, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rated), 3.2))
    xs = range(len(rated))
    ax.errorbar(xs, [r.elo for r in rated], yerr=[[r.elo - r.low for r in rated], [r.high - r.elo for r in rated]],
                fmt="o", capsize=4)
    ax.set_xticks(list(xs), [r.model for r in rated], rotation=20)
    ax.set_ylabel("rating (Elo scale)")
    ax.set_title("arena: Bradley–Terry with bootstrap 95 % intervals")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
