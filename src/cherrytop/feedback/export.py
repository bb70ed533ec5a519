"""Database -> the JSONL files training reads, in records.py's formats (read back by its readers):

- `demonstrations.jsonl`  Conversations for `cherrytop sft --sft.data=...`: demonstrations a reviewer
  accepted and nobody rejected (`include_unreviewed` adds those not reviewed yet).
- `comparisons.jsonl`     Comparisons for `cherrytop rm --rm.train.data=...`: one per labeler's ranking
  of an item once the item has all its required rankings and nobody reported it. Only labelers'
  work: nothing a chat user did reaches this file.
- `chat_comparisons.jsonl`  K = 2 comparisons from chat ratings (an up-rated and a down-rated answer
  `cherrytop serve` served for the same prompt), kept apart: anyone who can reach the chat server
  can rate, so these train a reward model only when a reviewer has read them and passes the file
  to `cherrytop rm` too (or concatenates it with `comparisons.jsonl`). Each names its ratings
  (`feedback`) and served answers (`served`); only the latest rating of a served answer counts.
- `feedback.jsonl`        every chat rating as a Conversation (prompt + rated answer) with its rating.
- `reported.jsonl`        prompts of reported items (harmful / private data / spam), kept out of training.
- `prompts.jsonl`         every distinct prompt of the database (chat ratings' and items'), those of
  reported items left out, for `cherrytop ppo --ppo.prompts=...` (and `cherrytop eval --prompts`).

Each export replaces the six files in `out_dir` (written whole from the database, never appended to).

Every record names its labeler and carries the model provenance of each response (`model`).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from cherrytop.data.records import Comparison, Conversation, Prompt, write_jsonl
from cherrytop.feedback.store import MODERATION, Store

FILES = ("demonstrations.jsonl", "comparisons.jsonl", "chat_comparisons.jsonl", "feedback.jsonl", "reported.jsonl",
         "prompts.jsonl")


def _time(at: datetime) -> str:
    """A row's time as ISO 8601 UTC (SQLite gives it back without its time zone, which is UTC)."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def _messages(msgs: list[dict]) -> tuple:
    return Prompt.from_json({"messages": msgs}).messages


def demonstrations(store: Store, include_unreviewed: bool = False) -> list[Conversation]:
    names = {u.id: u.name for u in store.users()}
    reviews = defaultdict(list)
    for r in store.reviews():
        reviews[r.demonstration_id].append(r)
    out = []
    for d in store.demonstrations():
        rs = reviews[d.id]
        accepted = bool(rs) and all(r.accept for r in rs)
        if accepted or (include_unreviewed and not rs):
            out.append(Conversation.from_json({
                "messages": d.messages, "labeler": names[d.user_id], "demonstration": d.id, "item": d.item_id,
                "reviews": [{"by": names[r.user_id], "accept": r.accept, "reason": r.reason} for r in rs]}))
    return out


def comparisons(store: Store) -> tuple[list[Comparison], list[Prompt]]:
    """(labelers' comparisons of complete, unreported items, prompts of reported items)."""
    names = {u.id: u.name for u in store.users()}
    by_item = defaultdict(list)
    for r in store.rankings():
        by_item[r.item_id].append(r)
    comps, reported = [], []
    for item in store.items():
        rows = by_item[item.id]
        if len(item.responses) < 2 or len(rows) < item.labels_needed:
            continue
        flags = sorted({f for r in rows for f in r.flags})
        if flags:
            reported.append(Prompt.from_json({"messages": item.prompt, "item": item.id, "flags": flags,
                                              "responses": item.responses}))
            continue
        same = [(i, j) for i in range(len(item.responses)) for j in range(i + 1, len(item.responses))
                if item.responses[i] == item.responses[j]]  # one text twice: tied, as records.py requires
        for r in rows:
            ties = [tuple(t) for t in r.ties]
            ties += [t for t in same if t not in ties and t[::-1] not in ties]
            comps.append(Comparison(_messages(item.prompt), tuple(item.responses), tuple(r.ranking),
                                    tuple(ties), names[r.user_id], r.ratings or None,
                                    {"item": item.id, "all_bad": r.all_bad, "model": item.provenance,
                                     "source": item.source, "seconds": round(r.seconds, 1)}))
    return comps, reported


def chat_comparisons(store: Store) -> list[Comparison]:
    """K = 2 comparisons from chat ratings: for a prompt with an up-rated and a down-rated (or
    reported) answer, the up one is preferred; one per distinct (up, down) answer pair. A served
    answer rated more than once (a change of mind) counts with its latest rating only."""
    groups = defaultdict(lambda: {"up": {}, "down": {}})
    rows = store.chat_feedback()
    latest = {f.served_id: f.id for f in rows if f.served_id is not None}
    for f in rows:
        if f.model == MODERATION:  # the policy's safe message: no model's answer to prefer or not
            continue
        if f.served_id is not None and latest[f.served_id] != f.id:
            continue
        key = tuple((m["role"], m["content"]) for m in f.messages)
        side = "up" if f.rating == "up" else "down"
        groups[key][side].setdefault(f.response, f)
    out = []
    for g in groups.values():
        for good, fu in g["up"].items():
            for bad, fd in g["down"].items():
                if good == bad:
                    continue
                out.append(Comparison(_messages(fu.messages), (good, bad), (0, 1), (), f"chat:{fu.user or 'anonymous'}",
                                      None, {"source": "chat", "feedback": [fu.id, fd.id],
                                             "served": [fu.served_id, fd.served_id],
                                             "model": [{"model": f.model, "settings": f.settings, "source": "chat"}
                                                       for f in (fu, fd)]}))
    return out


def feedback(store: Store) -> list[Conversation]:
    return [Conversation.from_json({
        "messages": f.messages + [{"role": "assistant", "content": f.response}], "rating": f.rating,
        "model": f.model, "settings": f.settings, "conversation_id": f.conversation_id, "comment": f.comment,
        "user": f.user, "feedback": f.id, "item": f.item_id, "served": f.served_id, "time": _time(f.created_at)})
        for f in store.chat_feedback()]  # an empty answer (EOS at once) is rated too


def prompts(store: Store, reported: list[Prompt]) -> list[Prompt]:
    """Every distinct prompt of the chat ratings and the items, in the order first seen, without those
    of reported items: what chat users asked, as a prompts file for PPO."""
    out, seen = [], {tuple((m.role, m.content) for m in p.messages) for p in reported}
    rows = [(f.messages, {"source": "chat", "feedback": f.id}) for f in store.chat_feedback()]
    rows += [(i.prompt, {"source": i.source, "item": i.id}) for i in store.items()]
    for msgs, meta in rows:
        key = tuple((m["role"], m["content"]) for m in msgs)
        if key not in seen:
            seen.add(key)
            out.append(Prompt.from_json({"messages": msgs, **meta}))
    return out


def export(store: Store, out_dir: str | Path, include_unreviewed: bool = False) -> dict[str, int]:
    """Write the six files under `out_dir` (replacing any there); returns how many records each got."""
    out = Path(out_dir)
    comps, reported = comparisons(store)
    return {
        "demonstrations.jsonl": write_jsonl(out / "demonstrations.jsonl", demonstrations(store, include_unreviewed)),
        "comparisons.jsonl": write_jsonl(out / "comparisons.jsonl", comps),
        "chat_comparisons.jsonl": write_jsonl(out / "chat_comparisons.jsonl", chat_comparisons(store)),
        "feedback.jsonl": write_jsonl(out / "feedback.jsonl", feedback(store)),
        "reported.jsonl": write_jsonl(out / "reported.jsonl", reported),
        "prompts.jsonl": write_jsonl(out / "prompts.jsonl", prompts(store, reported)),
    }
