"""A round's data, as people would make it: the served policy behind `cherrytop serve`'s own app (its engine,
moderation and rating endpoint, in-process over ASGI); simulated users send training prompts and rate each
answer 👍 / 👎 / report; the round's feedback store queues the rated-down and reported prompts (their
served answer is one candidate) before fresh ones; the served policy samples the other K answers
(`cherrytop label generate`'s `fill`); labelers rank every item through the store's API with the web
app's rule (only an item offered to them) — simulated, or people in `cherrytop label serve`, whom the loop
waits for; the finished items are exported as the round's comparisons, its held-out ones apart.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cherrytop.config import Config
from cherrytop.data.records import Comparison
from cherrytop.feedback import export
from cherrytop.feedback.generate import fill
from cherrytop.feedback.store import MODERATION, Store, prompt_key
from cherrytop.train.loop import console
from cherrytop.world import SimulatedLabeler, SimulatedUser, Task

RATINGS_PER_USER = 20
"""Prompts each simulated user sends: fewer than the server's ratings a minute per client (30), so its
rate limit, which the loop keeps, never refuses one."""


@dataclass
class Chat:
    """What the simulated users saw and said in one round."""
    served: int = 0
    ratings: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0, "report": 0})
    blocked: int = 0
    """Answers the moderation policy replaced by its safe message."""
    users: int = 0
    seconds: float = 0.0


def key_of(task: Task) -> str:
    """The feedback store's key of a task's prompt (its Item.prompt_key)."""
    return prompt_key([dict(m) for m in task.messages])


def chat(cfg: Config, store: Store, store_url: str, policy: Path, version: str, tasks: list[Task], seed: int) -> Chat:
    """Serve `policy` as model `version` with the run's serve settings and moderation; one simulated user per
    RATINGS_PER_USER tasks (each its own API key, so the server's per-client limits apply to each) asks each
    task once and rates the answer. The server records every rating in `store_url` with the answer's served id
    and the checkpoint folder it came from. A task already rated in `store` (conversation `loop-<n>`: a round
    cut short) is not asked again; the counts cover every rating of the round."""
    from dataclasses import replace

    import httpx

    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.load import load_model
    from cherrytop.serve.app import create_app
    from cherrytop.serve.moderation import Moderator

    out = Chat(users=max(1, -(-len(tasks) // RATINGS_PER_USER)))
    rated = {f.conversation_id: f for f in store.chat_feedback() if f.conversation_id}
    for n in range(len(tasks)):
        if (f := rated.get(f"loop-{n}")) is not None:
            out.served += 1
            out.ratings[f.rating] += 1
            out.blocked += f.model == MODERATION
    todo = [(n, t) for n, t in enumerate(tasks) if f"loop-{n}" not in rated]
    if not todo:
        return out
    keys = [f"sk-loop-{secrets.token_hex(12)}" for _ in range(out.users)]
    users = [SimulatedUser(cfg.world, f"user-{i}", seed) for i in range(out.users)]
    s = replace(cfg.serve, api_keys=tuple(keys), model_name=version)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    moderator = Moderator(s.policy or None, s.moderation_log or run_dir / "serve" / "moderation.jsonl")
    app = create_app(load_model(policy), load_tokenizer(policy), model_name=version, cfg=s, moderator=moderator,
                     feedback_url=store_url, checkpoint=str(policy), labels_needed=1)
    t0 = time.perf_counter()

    async def ask(client, n: int, task: Task) -> tuple[str, str]:
        """(completion id, answer) of one user's chat request."""
        u = n // RATINGS_PER_USER
        r = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys[u]}"}, json={
            "model": version, "messages": [dict(m) for m in task.messages], "temperature": cfg.sample.temperature,
            "top_p": cfg.sample.top_p, "max_tokens": cfg.sample.max_new_tokens, "seed": seed * 1_000_003 + n,
            "user": users[u].user_id})
        if r.status_code != 200:
            raise RuntimeError(f"the served policy answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        choice = body["choices"][0]
        out.blocked += choice.get("finish_reason") == "content_filter"
        return body["id"], choice["message"]["content"] or ""

    async def rate(client, n: int, task: Task, cid: str, answer: str) -> None:
        u = n // RATINGS_PER_USER
        rating = users[u].rate(task, answer)
        f = await client.post("/v1/feedback", headers={"Authorization": f"Bearer {keys[u]}"},
                              json={"id": cid, "index": 0, "rating": rating, "conversation_id": f"loop-{n}"})
        if f.status_code != 200:
            raise RuntimeError(f"the server refused a rating ({f.status_code}): {f.text[:300]}")
        out.served += 1
        out.ratings[rating] += 1

    async def run_all() -> None:
        gate = asyncio.Semaphore(s.max_batch)  # as many at once as the engine batches

        async def bounded(client, n, task):
            async with gate:
                return await ask(client, n, task)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loop",
                                         timeout=600) as client:
                answers = await asyncio.gather(*(bounded(client, n, t) for n, t in todo))
                for (n, task), (cid, answer) in zip(todo, answers):  # in task order: the queue's order is the same every run
                    await rate(client, n, task, cid, answer)

    asyncio.run(run_all())
    out.seconds = time.perf_counter() - t0
    return out


def queue(store: Store, fresh: list[Task], heldout: int, labelers: int) -> None:
    """Fresh prompts after the rated ones (the queue serves the oldest item first); the first `heldout` are
    ranked by every labeler (the round's held-out pairs and labeler agreement), the others by one (as `chat`
    queues the rated ones)."""
    for n, task in enumerate(fresh):
        store.add_item([dict(m) for m in task.messages], source="loop",
                       labels_needed=labelers if n < heldout else 1)


def sample(store: Store, cfg: Config, policy: Path, k: int, seed: int) -> int:
    """The served policy's answers for every queued item, up to `k` each; returns the items filled."""
    c = cfg.compare
    return fill(store, policy, k, temperature=c.temperature, top_p=cfg.sample.top_p, max_new_tokens=c.max_new_tokens,
                batch_size=cfg.sample.batch_size, seed=seed)


def labeler_accounts(store: Store, names: list[str]) -> list[int]:
    """The simulated labelers' accounts in the round's store (random passwords: nobody logs in as them)."""
    from cherrytop.feedback.auth import create_user
    ids = []
    for name in names:
        user = store.user_by_name(name)
        ids.append(user.id if user else create_user(store, name, secrets.token_urlsafe(18) + "A1!"))
    return ids


def rank_simulated(store: Store, cfg: Config, tasks: dict[str, Task], seed: int) -> int:
    """Simulated labelers take turns asking the store for their next item and rank it, as a person would
    in the web app (`offered=True`: only what the store gave them); returns the rankings submitted."""
    n = cfg.compare.labelers
    labelers = [SimulatedLabeler(cfg.world, f"sim-{i}", seed=seed * 100 + i) for i in range(n)]
    ids = labeler_accounts(store, [f"sim-{i}" for i in range(n)])
    done, idle = 0, 0
    while idle < n:
        idle = 0
        for lab, uid in zip(labelers, ids):
            item = store.next_ranking_item(uid)
            if item is None:
                idle += 1
                continue
            r = lab.rank(tasks[item.prompt_key], list(item.responses))
            store.submit_ranking(uid, item.id, list(r.ranking), [list(t) for t in r.ties], uuid.uuid4().hex, 0.0,
                                 ratings=r.ratings, offered=True)
            done += 1
    return done


def ranking_progress(store: Store) -> tuple[int, int]:
    """(rankings done, rankings needed) over the rankable items of the store."""
    got: dict[int, int] = {}
    for r in store.rankings():
        got[r.item_id] = got.get(r.item_id, 0) + 1
    items = [i for i in store.items() if len(i.responses) >= 2]
    return sum(min(i.labels_needed, got.get(i.id, 0)) for i in items), sum(i.labels_needed for i in items)


def wait_for_people(store: Store, url: str, poll_s: float) -> None:
    """Until every queued item has its rankings: people rank in `cherrytop label serve` on the round's database."""
    from cherrytop.feedback.waiting import wait_for
    done, need = ranking_progress(store)
    if done < need:
        console.print(f"waiting for people to rank {need - done} answer sets: `cherrytop label serve --db {url}` (accounts: "
                      f"`cherrytop label create-user --db {url} NAME`); Ctrl-C stops, and the loop resumes here")
    wait_for(lambda: ranking_progress(store), "rankings", poll_s)


def comparisons(store: Store, tasks: dict[str, Task], held_keys: set[str],
                round_no: int) -> tuple[list[Comparison], list[Comparison]]:
    """(training, held-out) comparisons of the round's finished items, each with its task (the built-in world's
    graders) and round; held out: the items of `held_keys` (prompt keys)."""
    comps, _ = export.comparisons(store)
    keys = {i.id: i.prompt_key for i in store.items()}
    train, held = [], []
    for c in comps:
        key = keys[c.meta["item"]]
        meta = {**c.meta, "round": round_no, **({"task": tasks[key].to_record()} if key in tasks else {})}
        c = Comparison(c.prompt, c.responses, c.ranking, c.ties, c.labeler, c.ratings, meta)
        (held if key in held_keys else train).append(c)
    return train, held
