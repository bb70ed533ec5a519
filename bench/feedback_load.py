"""Load test of the feedback app on loopback: N simulated labelers submit concurrently for S seconds.

Each labeler logs in, then loops: fetch the next ranking form, submit a random ranking (with ties and
ratings); one submission in five is sent twice (a double click) and one in ten is a demonstration.
The server runs in its own process (uvicorn). Afterwards the database is compared with what the
clients saw: every submission the server acknowledged as new must be in the database exactly once
(zero lost), a repeated form must never give a second row (zero duplicated).

    .venv/bin/python bench/feedback_load.py --labelers 20 --seconds 60 [--db postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def field(html: str, name: str) -> str:
    return re.search(rf'name="{name}" (?:id="{name}" )?value="([^"]*)"', html).group(1)


def labeler(base: str, name: str, until: float, seed: int, out: dict) -> None:
    rng = random.Random(seed)
    lat, acked, repeats, errors = [], [], 0, 0
    with httpx.Client(base_url=base, timeout=60) as c:
        page = c.get("/login").text
        r = c.post("/login", data={"name": name, "password": "labeler-pass-7", "csrf": field(page, "csrf"), "next": "/"})
        assert r.status_code == 303, r.text
        while time.time() < until:
            demo = rng.random() < 0.1
            page = c.get("/demo?mode=free" if demo else "/rank").text
            if demo:
                data = {"csrf": field(page, "csrf"), "token": field(page, "token"), "started": field(page, "started"),
                        "role": ["user", "assistant"], "content": [f"question {rng.random()}", "an answer ."]}
                path = "/demo"
            else:
                if "ranklist" not in page:
                    time.sleep(0.05)
                    continue
                order = [int(i) for i in field(page, "order").split(",")]
                rng.shuffle(order)
                ties = f"{order[1]},{order[2]}" if rng.random() < 0.3 else ""
                data = {"csrf": field(page, "csrf"), "token": field(page, "token"), "started": field(page, "started"),
                        "item_id": field(page, "item_id"), "order": ",".join(map(str, order)), "ties": ties,
                        f"helpful_{order[0]}": str(rng.randint(1, 7))}
                path = "/rank"
            for attempt in range(2 if rng.random() < 0.2 else 1):
                t = time.perf_counter()
                r = c.post(path, data=data)
                lat.append(time.perf_counter() - t)
                loc = r.headers.get("location", "")
                if r.status_code != 303:
                    errors += 1
                elif loc.endswith("=again"):
                    repeats += 1
                else:
                    acked.append((path, data["token"]))
    out[name] = {"lat": lat, "acked": acked, "repeats": repeats, "errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--db", default="", help="database URL (default: a fresh SQLite file); a PostgreSQL URL gets "
                                            "a fresh schema, dropped afterwards")
    args = p.parse_args()
    schema = None
    if args.db.startswith("postgresql"):
        import secrets

        import psycopg
        schema = f"ct_bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.db.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        args.db += ("&" if "?" in args.db else "?") + f"options=-csearch_path%3D{schema}"
    try:
        run(args)
    finally:
        if schema:
            with psycopg.connect(args.db.split("?")[0].replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run(args) -> None:

    from cherrytop.feedback.auth import create_user
    from cherrytop.feedback.store import Demonstration, Ranking, open_store
    url = args.db or f"sqlite:///{Path(tempfile.mkdtemp()) / 'load.db'}"
    store = open_store(url)
    names = [f"lab{i:02d}" for i in range(args.labelers)]
    for n in names:
        create_user(store, n, "labeler-pass-7")
    t = time.time()
    for i in range(args.items):
        store.add_item([{"role": "user", "content": f"prompt {i} ?"}], responses=[f"a{i}", f"b{i}", f"c{i}", f"d{i}"])
    print(f"{args.items} items in {time.time() - t:.1f} s; database {url}")

    port = free_port()
    code = ("import uvicorn; from cherrytop.feedback.app import create_app; from cherrytop.feedback.store import open_store;"
            f"uvicorn.run(create_app(open_store({url!r})), host='127.0.0.1', port={port}, log_level='warning')")
    server = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        until = time.time() + args.seconds
        out: dict = {}
        threads = [threading.Thread(target=labeler, args=(base, n, until, i, out)) for i, n in enumerate(names)]
        [th.start() for th in threads]
        [th.join() for th in threads]
    finally:
        server.terminate()
        server.wait(10)

    lat = sorted(x for o in out.values() for x in o["lat"])
    acked = [a for o in out.values() for a in o["acked"]]
    with store.tx() as s:
        rank_tokens = [r.token for r in s.query(Ranking)]
        demo_tokens = [d.token for d in s.query(Demonstration)]
        pairs = s.query(Ranking.item_id, Ranking.user_id).all()
    db = {("/rank", t) for t in rank_tokens} | {("/demo", t) for t in demo_tokens}
    lost = len(set(acked) - db)
    dup_acks = len(acked) - len(set(acked))
    dup_rows = (len(rank_tokens) - len(set(rank_tokens))) + (len(pairs) - len(set(pairs)))
    extra = len(db - set(acked))
    print(f"{args.labelers} labelers x {args.seconds:.0f} s: {len(lat)} POSTs ({len(lat) / args.seconds:.1f}/s), "
          f"{len(acked)} new submissions ({len(rank_tokens)} rankings, {len(demo_tokens)} demonstrations), "
          f"{sum(o['repeats'] for o in out.values())} double submissions answered 'already submitted', "
          f"{sum(o['errors'] for o in out.values())} errors")
    print(f"lost {lost}, duplicated {dup_acks + dup_rows}, rows nobody was told about {extra}")
    print(f"POST latency p50 {1000 * statistics.median(lat):.0f} ms, p95 {1000 * lat[int(0.95 * (len(lat) - 1))]:.0f} ms, "
          f"max {1000 * lat[-1]:.0f} ms")
    store.close()


if __name__ == "__main__":
    main()
