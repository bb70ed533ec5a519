"""Load test of `cherrytop serve` on loopback: N concurrent clients send chat completions for D
seconds against a tiny model, with dynamic batching on, off (`--serve.max_batch=1`), and over
capacity (a small batch and queue: the excess must get 429 at once, never hang).

    .venv/bin/python bench/serve_load.py --clients 32 --duration 60

Each mode starts the real server (`cherrytop serve` in a subprocess), runs the clients (asyncio +
httpx, each sending its next request as soon as the last one is answered; after a 429 it waits the
Retry-After seconds), and prints requests, 429s, other failures, throughput (requests/s and
generated tokens/s) and p50 / p95 latency of the answered requests. Without --checkpoint a tiny
random model (the `tiny` preset's sizes: 4 layers, d=128, a 256-token window) is built first; a
random model rarely ends early, so every answer has about --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["what is 12 plus 3 ?", "hello , i am ann .", "what colour is the cat of bob ?",
           "reverse the words : red cat blue dog .", "tell me about the city of oslo .", "what is 7 plus 21 ?"]


@dataclass
class Mode:
    name: str
    max_batch: int
    max_queue: int


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    rejected: int = 0
    failed: list[str] = field(default_factory=list)


def tiny_model(out: Path) -> Path:
    from cherrytop.config import ModelConfig
    from cherrytop.data.tokenizer import train_tokenizer
    from cherrytop.model.load import build_model
    tok = train_tokenizer(PROMPTS * 50, 400)
    model = build_model(ModelConfig(), vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    path = out / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, mode: Mode, port: int, workdir: Path, threads: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("cherrytop")
    cmd = [str(exe), "serve", "--checkpoint", str(ckpt), f"--run.out_dir={workdir}", f"--run.threads={threads}",
           f"--serve.port={port}", f"--serve.max_batch={mode.max_batch}", f"--serve.max_queue={mode.max_queue}",
           "--serve.model_name=tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


async def client_loop(http: httpx.AsyncClient, url: str, until: float, max_tokens: int, rng: random.Random,
                      res: Result) -> None:
    while time.monotonic() < until:
        body = {"model": "tiny", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": max_tokens, "temperature": 1.0}
        t0 = time.monotonic()
        try:
            r = await http.post(url, json=body)
        except httpx.HTTPError as e:
            res.failed.append(type(e).__name__)
            continue
        if r.status_code == 200:
            res.latencies.append(time.monotonic() - t0)
            res.tokens += r.json()["usage"]["completion_tokens"]
        elif r.status_code == 429:
            res.rejected += 1
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        else:
            res.failed.append(str(r.status_code))


async def load(url: str, clients: int, duration: float, max_tokens: int) -> tuple[Result, float]:
    res = Result()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(http, url, t0 + duration, max_tokens, random.Random(i), res)
                               for i in range(clients)))
        return res, time.monotonic() - t0


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model folder to serve (default: build a tiny random model)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=60, help="seconds of load per mode (default 60)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    p.add_argument("--max-batch", type=int, default=32, help="batch size of the batching-on mode (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--modes", default="on,off,over", help="which of on, off, over to run (default all)")
    args = p.parse_args()
    modes = {"on": Mode("batching on", args.max_batch, args.clients),
             "off": Mode("batching off", 1, args.clients),
             "over": Mode("over capacity", 8, 8)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else tiny_model(work)
        rows = []
        for key in args.modes.split(","):
            mode = modes[key]
            port = free_port()
            server = start_server(ckpt, mode, port, work, args.threads)
            try:
                res, wall = asyncio.run(load(f"http://127.0.0.1:{port}/v1/chat/completions", args.clients,
                                             args.duration, args.max_tokens))
                stats = httpx.get(f"http://127.0.0.1:{port}/health").json()["engine"]
            finally:
                server.terminate()
                server.wait(timeout=30)
            ok = len(res.latencies)
            rows.append((mode, ok, res, wall, stats))
            print(f"{mode.name}: {ok} answered, {res.rejected} x 429, {len(res.failed)} failed "
                  f"({', '.join(sorted(set(res.failed))) or 'none'}) in {wall:.1f} s; {ok / wall:.2f} req/s, "
                  f"{res.tokens / wall:.0f} tokens/s, p50 {pct(res.latencies, 50):.2f} s, "
                  f"p95 {pct(res.latencies, 95):.2f} s; largest batch {stats['max_rows']}", flush=True)
    print(f"\n{args.clients} clients x {args.duration:.0f} s per mode, max_tokens {args.max_tokens}, "
          f"server torch threads {args.threads}, {os.cpu_count()} CPUs\n")
    print("| mode | max_batch | max_queue | answered | 429 | failed | req/s | tokens/s | p50 latency | p95 latency | largest batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, ok, res, wall, stats in rows:
        print(f"| {mode.name} | {mode.max_batch} | {mode.max_queue} | {ok} | {res.rejected} | {len(res.failed)} | "
              f"{ok / wall:.2f} | {res.tokens / wall:.0f} | {pct(res.latencies, 50):.2f} s | "
              f"{pct(res.latencies, 95):.2f} s | {stats['max_rows']} |")


if __name__ == "__main__":
    main()
