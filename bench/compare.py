"""cherrytop vs TRL on the same work, in one run: builds the shared inputs (`make_data.py`), then runs
each task on both sides, each in a fresh process (so peak memory is per task), alternating which side
goes first, `--repeats` times, and prints a table of throughputs and ratios (best of the repeats,
and the median). Results also go to `bench/out/results.json`.

    .venv/bin/python bench/compare.py                       # all tasks, 2 repeats
    .venv/bin/python bench/compare.py --tasks ppo gen --repeats 3

The TRL side needs its venvs (see bench/README.md); a missing venv is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from harness import Spec  # noqa: E402

CHERRYTOP_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = HERE / ".venv-trl" / "bin" / "python"  # trl 1.16.0: SFT, reward, generation
TRL_PPO_PY = HERE / ".venv-trl-ppo" / "bin" / "python"  # trl 1.12.0: trl.experimental.ppo

# task -> (label, cherrytop task, TRL venv python, TRL task)
TASKS = {
    "sft": ("SFT tokens/s", "sft", TRL_PY, "sft"),
    "rm_pairs": ("RM pairs/s, pairwise data", "rm_pairs", TRL_PY, "rm"),
    "rm_rankings": ("RM pairs/s, K=4 rankings", "rm_rankings", TRL_PY, "rm"),
    "ppo": ("PPO episodes/s", "ppo", TRL_PPO_PY, "ppo"),
    "gen": ("generation tokens/s", "gen", TRL_PY, "gen"),
}


def run_side(python: Path, script: str, task: str, spec: Spec, log) -> dict:
    cmd = [str(python), str(HERE / script), "--task", task, "--spec", spec.to_json()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: {script} --task {task} failed (exit {proc.returncode}): {tail[0]}; log in {log.name}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side per task (best and median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "results.json")
    args = ap.parse_args(argv)
    for py in {TASKS[t][2] for t in args.tasks} | {CHERRYTOP_PY}:
        if not py.is_file():
            raise SystemExit(f"error: {py} not found; create the benchmark venvs first (bench/README.md)")
    subprocess.run([str(CHERRYTOP_PY), str(HERE / "make_data.py")], check=True, cwd=ROOT)
    spec = replace(Spec(), threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    trl_cache: dict[tuple[str, int], dict] = {}  # rm_pairs and rm_rankings share the TRL run
    with open(args.out.with_suffix(".log"), "w") as log:
        for r in range(args.repeats):
            for task in args.tasks:
                label, ct_task, trl_py, trl_task = TASKS[task]
                sides = [("cherrytop", lambda: run_side(CHERRYTOP_PY, "cherrytop_side.py", ct_task, spec, log)),
                         ("trl", lambda: trl_cache.get((trl_task, r)) or run_side(trl_py, "trl_side.py", trl_task, spec, log))]
                for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                    load = uptime()
                    res = fn()
                    if side == "trl":
                        trl_cache[(trl_task, r)] = res
                    res["load_before"] = load
                    runs.setdefault(task, {}).setdefault(side, []).append(res)
                    print(f"[{r + 1}/{args.repeats}] {task:12s} {side:9s} {res['per_s']:10.1f} {res['unit']}/s  "
                          f"({res['per_cpu_s']:.1f} per CPU-s)  "
                          f"peak RSS {res['peak_rss_mb']:7.0f} MiB  load {load}", flush=True)
    table = summarise(runs, args.tasks)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "spec": json.loads(spec.to_json()),
            "repeats": args.repeats, "table": table, "runs": runs}
    args.out.write_text(json.dumps(info, indent=1))
    print(render(table))
    print(f"\nfull results: {args.out}")


def summarise(runs: dict, tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        ct, trl = runs[task]["cherrytop"], runs[task]["trl"]
        best = lambda rs: max(x["per_s"] for x in rs)  # noqa: E731
        med = lambda rs: statistics.median(x["per_s"] for x in rs)  # noqa: E731
        best_cpu = lambda rs: max(x["per_cpu_s"] for x in rs)  # noqa: E731  work per second of CPU time
        med_cpu = lambda rs: statistics.median(x["per_cpu_s"] for x in rs)  # noqa: E731
        rows.append({"task": task, "label": TASKS[task][0], "cherrytop_best": best(ct), "trl_best": best(trl),
                     "ratio_best": best(ct) / best(trl), "cherrytop_median": med(ct), "trl_median": med(trl),
                     "ratio_median": med(ct) / med(trl),
                     "cpu_ratio_best": best_cpu(ct) / best_cpu(trl), "cpu_ratio_median": med_cpu(ct) / med_cpu(trl),
                     "cherrytop_rss_mb": min(x["peak_rss_mb"] for x in ct), "trl_rss_mb": min(x["peak_rss_mb"] for x in trl)})
    return rows


def render(table: list[dict]) -> str:
    lines = ["| what | cherrytop | TRL | ratio (best) | ratio (median) | ratio per CPU-second (best / median) "
             "| peak RSS cherrytop / TRL (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['label']} | {r['cherrytop_best']:.1f} | {r['trl_best']:.1f} | {r['ratio_best']:.2f}x | "
                     f"{r['ratio_median']:.2f}x | {r['cpu_ratio_best']:.2f}x / {r['cpu_ratio_median']:.2f}x | "
                     f"{r['cherrytop_rss_mb']:.0f} / {r['trl_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
