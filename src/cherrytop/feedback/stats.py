"""Labeler quality: items done, time per item, pairwise agreement, Krippendorff's α, gold scores.

Pairwise agreement is InstructGPT's inter-annotator agreement [IG §5.1: "training labelers agree
with each other 72.6 ± 1.5 % of the time"]: for two labelers who ranked the same item, every pair
of responses {i, j} gets a relation from each ranking (i better, j better, or tied); agreement is
the share of pairs whose relations are equal, pooled over all items the two share.

Krippendorff's α (the `krippendorff` package) measures the 1-7 ratings per axis: the units are
(item, response) and the coders the labelers; 1 = perfect agreement, 0 = chance. Ordinal by default.

A gold item has a known ranking; a labeler's gold score is their pairwise agreement with it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cherrytop.feedback.store import AXES, Store


def relations(ranking: Sequence[int], ties: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """{(i, j) with i < j: +1 if i ranked better than j, -1 if worse, 0 if tied}."""
    pos = {r: p for p, r in enumerate(ranking)}
    tied = {frozenset(t) for t in ties}
    out = {}
    for i in range(len(ranking)):
        for j in range(i + 1, len(ranking)):
            out[(i, j)] = 0 if frozenset((i, j)) in tied else (1 if pos[i] < pos[j] else -1)
    return out


def pair_agreement(a: tuple[Sequence[int], Sequence[Sequence[int]]],
                   b: tuple[Sequence[int], Sequence[Sequence[int]]]) -> tuple[int, int]:
    """(agreeing pairs, pairs) between two labelers' (ranking, ties) of the same responses."""
    ra, rb = relations(*a), relations(*b)
    return sum(ra[p] == rb[p] for p in ra), len(ra)


def alpha(data: np.ndarray, level: str = "ordinal") -> float | None:
    """Krippendorff's α of a (coders, units) matrix with nan for missing; None when undefined
    (no unit rated twice, or no variation at all)."""
    import krippendorff
    data = np.asarray(data, dtype=float)
    if data.size == 0 or (np.sum(~np.isnan(data), axis=0) >= 2).sum() == 0:
        return None
    values = data[~np.isnan(data)]
    if len(np.unique(values)) < 2:
        return None
    a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    return None if math.isnan(a) else a


@dataclass
class LabelerStats:
    name: str
    role: str
    rankings: int = 0
    """Items ranked."""
    demonstrations: int = 0
    """Demonstrations written."""
    reviews: int = 0
    """Demonstrations reviewed."""
    median_seconds: float | None = None
    """Median time per ranking or demonstration (from showing the form to submitting it)."""
    agree: int = 0
    """Response pairs on which this labeler agreed with another labeler of the same item."""
    pairs: int = 0
    """Response pairs compared with other labelers."""
    gold_agree: int = 0
    gold_pairs: int = 0
    gold_items: int = 0
    """Gold items ranked."""
    alpha: dict = field(default_factory=dict)
    """{axis: α of the ratings on the units this labeler rated (this labeler and the others)}."""

    @property
    def agreement(self) -> float | None:
        return self.agree / self.pairs if self.pairs else None

    @property
    def gold_score(self) -> float | None:
        return self.gold_agree / self.gold_pairs if self.gold_pairs else None


@dataclass
class Report:
    labelers: list[LabelerStats]
    agreement: float | None
    """Pooled pairwise agreement over every pair of labelers and every item they share."""
    pairs: int
    """Response pairs behind `agreement`."""
    alpha: dict
    """{axis: Krippendorff's α over all ratings}."""
    between: list[dict]
    """[{"a": name, "b": name, "items": n, "agreement": share}] for each pair of labelers who share items."""
    items: int
    """Items in the database."""
    complete: int
    """Items with all their required rankings."""
    models: list[dict] = field(default_factory=list)
    """[{"a": model, "b": model, "pairs": n, "win_rate": P(a's answer ranked above b's), ties half}] for
    each pair of models whose answers labelers ranked against each other (human evaluation: `cherrytop
    eval --pairs` writes such items), over every (ranking, pair of answers by those two models)."""


def report(store: Store, level: str = "ordinal") -> Report:
    users = {u.id: u for u in store.users()}
    items = {i.id: i for i in store.items()}
    stats = {uid: LabelerStats(u.name, u.role) for uid, u in users.items()}
    seconds: dict[int, list[float]] = defaultdict(list)
    by_item = defaultdict(list)
    for r in store.rankings():
        by_item[r.item_id].append(r)
        stats[r.user_id].rankings += 1
        seconds[r.user_id].append(r.seconds)
        gold = items[r.item_id].gold
        if gold is not None:
            ok, n = pair_agreement((r.ranking, r.ties), (gold, []))
            st = stats[r.user_id]
            st.gold_agree, st.gold_pairs, st.gold_items = st.gold_agree + ok, st.gold_pairs + n, st.gold_items + 1
    for d in store.demonstrations():
        stats[d.user_id].demonstrations += 1
        seconds[d.user_id].append(d.seconds)
    for rv in store.reviews():
        stats[rv.user_id].reviews += 1
    for uid, secs in seconds.items():
        stats[uid].median_seconds = statistics.median(secs)

    between: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    total = [0, 0]
    for rows in by_item.values():
        for x in range(len(rows)):
            for y in range(x + 1, len(rows)):
                a, b = rows[x], rows[y]
                ok, n = pair_agreement((a.ranking, a.ties), (b.ranking, b.ties))
                for uid in (a.user_id, b.user_id):
                    stats[uid].agree += ok
                    stats[uid].pairs += n
                key = tuple(sorted((a.user_id, b.user_id)))
                between[key][0] += ok
                between[key][1] += n
                between[key][2] += 1
                total[0] += ok
                total[1] += n

    # ratings: coders x units matrices per axis
    units = sorted({(r.item_id, k) for rows in by_item.values() for r in rows for k in range(len(r.ranking))})
    col = {u: c for c, u in enumerate(units)}
    coders = sorted(users)
    row = {uid: n for n, uid in enumerate(coders)}
    overall = {}
    for axis in AXES:
        m = np.full((len(coders), len(units)), np.nan)
        for rows in by_item.values():
            for r in rows:
                for k, v in enumerate((r.ratings or {}).get(axis) or []):
                    if v is not None:
                        m[row[r.user_id], col[(r.item_id, k)]] = v
        overall[axis] = alpha(m, level)
        for uid in coders:
            mine = ~np.isnan(m[row[uid]])
            if mine.any():
                stats[uid].alpha[axis] = alpha(m[:, mine], level)
    complete = sum(1 for i in items.values() if len(i.responses) >= 2 and len(by_item[i.id]) >= i.labels_needed)
    models = model_win_rates(items, by_item)
    pairs_out = [{"a": users[a].name, "b": users[b].name, "items": v[2], "agreement": v[0] / v[1] if v[1] else None}
                 for (a, b), v in sorted(between.items())]
    return Report(list(stats.values()), total[0] / total[1] if total[1] else None, total[1], overall, pairs_out,
                  len(items), complete, models)


def model_win_rates(items: dict, by_item: dict) -> list[dict]:
    """Labelers' win rate of each pair of models (named in the responses' provenance) whose answers
    were ranked against each other; a tie counts half."""
    score: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for item_id, rows in by_item.items():
        item = items[item_id]
        names = [(p or {}).get("model") for p in item.provenance] + [None] * (len(item.responses) - len(item.provenance))
        for r in rows:
            for (i, j), rel in relations(r.ranking, r.ties).items():
                a, b = names[i], names[j]
                if a is None or b is None or a == b:
                    continue
                win = 0.5 if rel == 0 else float(rel > 0)  # i's answer against j's
                key, w = ((a, b), win) if a < b else ((b, a), 1.0 - win)
                score[key][0] += w
                score[key][1] += 1
    return [{"a": a, "b": b, "pairs": n, "win_rate": w / n} for (a, b), (w, n) in sorted(score.items())]
