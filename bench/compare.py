"""cherrytop vs TRL on the same work, in one run: builds the shared inputs (`make_data.py`), then runs
each task on both sides, each in a fresh process (so peak memory is per task), alternating which side
goes first, `--repeats` times, and prints a table of throughputs and ratios (best of the repeats,
and the median). Results also go to `bench/out/results.json`.

    .venv/bin/python bench/compare.py                       # all tasks, 2 repeats
    .venv/bin/python bench/compare.py --tasks ppo gen --repeats 3
    .venv/bin/python bench/compare.py --tasks grpo rloo --repeats 2   # issue 23: GRPOTrainer / RLOOTrainer
    .venv/bin/python bench/compare.py --tasks dpo_rankings dpo_pairs --repeats 2   # cherrytop dpo vs DPOTrainer
    .venv/bin/python bench/compare.py --gpu 125m            # issue 7's GPU settings (make_data.SCALES)
    .venv/bin/python bench/compare.py --gpu 1b --smoke --device cpu   # the GPU run's code paths, small, on CPU

The TRL side needs its venvs (see bench/README.md); a missing venv is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
TRL_PY = HERE / ".venv-trl" / "bin" / "python"  # trl 1.16.0: SFT, reward, GRPO, RLOO, generation
TRL_PPO_PY = HERE / ".venv-trl-ppo" / "bin" / "python"  # trl 1.12.0: trl.experimental.ppo

# task -> (label, cherrytop task, TRL venv python, TRL task)
TASKS = {
    "sft": ("SFT tokens/s", "sft", TRL_PY, "sft"),
    "rm_pairs": ("RM pairs/s, pairwise data", "rm_pairs", TRL_PY, "rm"),
    "rm_rankings": ("RM pairs/s, K=4 rankings", "rm_rankings", TRL_PY, "rm"),
    "ppo": ("PPO episodes/s", "ppo", TRL_PPO_PY, "ppo"),
    "grpo": ("GRPO episodes/s", "grpo", TRL_PY, "grpo"),
    "rloo": ("RLOO episodes/s", "rloo", TRL_PY, "rloo"),
    "dpo_pairs": ("DPO pairs/s, pairwise data", "dpo_pairs", TRL_PY, "dpo_pairs"),
    "dpo_rankings": ("DPO pairs/s, K=8 rankings", "dpo_rankings", TRL_PY, "dpo_rankings"),
    "gen": ("generation tokens/s", "gen", TRL_PY, "gen"),
    "gen_static": ("generation tokens/s vs static-cache generate", "gen", TRL_PY, "gen_static"),
}
GPU_TASKS = ["ppo", "gen", "gen_static", "sft", "rm_rankings", "rm_pairs"]
"""With --gpu: the PPO and generation rows of issue 7's table first (the GPU time is scarce)."""


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: all (CPU), GPU_TASKS with --gpu")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side per task (best and median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    ap.add_argument("--gpu", choices=["125m", "1b"], help="issue 7's GPU settings with this model (harness.Spec.gpu)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="override the device (--gpu ... --smoke --device cpu)")
    ap.add_argument("--smoke", action="store_true", help="tiny batches and lengths: check the code paths, time nothing")
    ap.add_argument("--bandwidth", type=float, default=3.0e12,
                    help="GPU memory bandwidth in bytes/s for the decoding floor (H100 SXM: ~3.0e12 reached)")
    ap.add_argument("--python", type=Path, help="one interpreter for every side instead of the venvs (bench/gpu.sh)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "results.json")
    args = ap.parse_args(argv)
    if args.python:  # e.g. a lent GPU machine's python3, with cherrytop's src and the carried wheels on PYTHONPATH
        global CHERRYTOP_PY
        CHERRYTOP_PY = args.python
        for t, (label, ct_task, _, trl_task) in TASKS.items():
            TASKS[t] = (label, ct_task, args.python, trl_task)
    spec = Spec.gpu(args.gpu, threads=args.threads) if args.gpu else replace(Spec(), threads=args.threads)
    spec = replace(spec.smoke() if args.smoke else spec, **({"device": args.device} if args.device else {}))
    if spec.device == "cpu":
        spec = replace(spec, bf16=False)  # TRL's bf16 on CPU is very slow; cherrytop ignores it there
    tasks = args.tasks or (GPU_TASKS if args.gpu else [t for t in TASKS if t != "gen_static"])
    for py in {TASKS[t][2] for t in tasks} | {CHERRYTOP_PY}:
        if not (py.is_file() or shutil.which(str(py))):
            raise SystemExit(f"error: {py} not found; create the benchmark venvs first (bench/README.md)")
    subprocess.run([str(CHERRYTOP_PY), str(HERE / "make_data.py"), "--scale", spec.scale,
                    "--prompt-len", str(spec.prompt_len)], check=True, cwd=ROOT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    done: dict[tuple[str, str, int], dict] = {}  # one run serves two rows (rm_pairs / rm_rankings on TRL, gen on cherrytop)
    with open(args.out.with_suffix(".log"), "w") as log:
        for r in range(args.repeats):
            for task in tasks:
                label, ct_task, trl_py, trl_task = TASKS[task]
                sides = [("cherrytop", ct_task, lambda: run_side(CHERRYTOP_PY, "cherrytop_side.py", ct_task, spec, log)),
                         ("trl", trl_task, lambda: run_side(trl_py, "trl_side.py", trl_task, spec, log))]
                for side, side_task, fn in (sides if r % 2 == 0 else sides[::-1]):
                    load = uptime()
                    res = done.get((side, side_task, r)) or {**fn(), "load_before": load}
                    done[(side, side_task, r)] = res
                    runs.setdefault(task, {}).setdefault(side, []).append(res)
                    gpu = f"  peak GPU {res['peak_gpu_mb']:7.0f} MiB" if res.get("peak_gpu_mb") else ""
                    print(f"[{r + 1}/{args.repeats}] {task:12s} {side:9s} {res['per_s']:10.1f} {res['unit']}/s  "
                          f"({res['per_cpu_s']:.1f} per CPU-s)  "
                          f"peak RSS {res['peak_rss_mb']:7.0f} MiB{gpu}  load {res['load_before']}", flush=True)
    table = summarise(runs, tasks)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "spec": json.loads(spec.to_json()),
            "repeats": args.repeats, "table": table, "runs": runs}
    floor = decode_floor(spec, runs, args.bandwidth)
    if floor:
        info["decode_floor"] = floor
    args.out.write_text(json.dumps(info, indent=1))
    print(render(table))
    for row in floor:
        print(f"decoding, {row['side']} ({row['task']}): {row['ms_per_step']:.2f} ms/step; the memory-bandwidth floor "
              f"{row['floor_ms']:.3f} ms/step ({row['fraction']:.1%} of it reached)")
    print(f"\nfull results: {args.out}")


def decode_floor(spec: Spec, runs: dict, bandwidth: float) -> list[dict]:
    """For the generation rows on a GPU: each side's ms per decoding step (best run) and the step's
    memory-bandwidth floor: every weight read once (bf16: 2 bytes) plus the KV cache read at the
    batch's mean context, over `bandwidth` bytes/s (issue 7's table: ~3.0 TB/s on an H100)."""
    if spec.device != "cuda":
        return []
    cfg = json.loads((HERE / "out" / spec.data / "config.json").read_text())
    d, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    params = (2 * cfg["vocab_size"] * d + layers * (2 * d * d + 2 * d * (d // heads) * kv_heads + 3 * d * cfg["intermediate_size"]))
    width = 2 if spec.bf16 else 4
    context = (spec.prompt_len or 48) + spec.response_len / 2  # mean keys per step
    kv = 2 * layers * kv_heads * (d // heads) * width * spec.ppo_batch * context
    floor_s = (params * width + kv) / bandwidth
    rows = []
    for task in ("gen", "gen_static"):
        for side, rs in runs.get(task, {}).items():
            best = min(rs, key=lambda x: x["seconds"] / max(x.get("decode_steps") or 1, 1))
            if best.get("decode_steps"):
                ms = 1e3 * best["seconds"] / best["decode_steps"]
                rows.append({"task": task, "side": side, "ms_per_step": ms, "floor_ms": 1e3 * floor_s, "fraction": 1e3 * floor_s / ms})
    return rows


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
                     "cherrytop_rss_mb": min(x["peak_rss_mb"] for x in ct), "trl_rss_mb": min(x["peak_rss_mb"] for x in trl),
                     "cherrytop_gpu_mb": min((x.get("peak_gpu_mb") or 0) for x in ct),
                     "trl_gpu_mb": min((x.get("peak_gpu_mb") or 0) for x in trl)})
    return rows


def render(table: list[dict]) -> str:
    gpu = any(r["cherrytop_gpu_mb"] or r["trl_gpu_mb"] for r in table)
    lines = ["| what | cherrytop | TRL | ratio (best) | ratio (median) | ratio per CPU-second (best / median) "
             "| peak RSS cherrytop / TRL (MiB) |" + (" peak GPU memory cherrytop / TRL (MiB) |" if gpu else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for r in table:
        lines.append(f"| {r['label']} | {r['cherrytop_best']:.1f} | {r['trl_best']:.1f} | {r['ratio_best']:.2f}x | "
                     f"{r['ratio_median']:.2f}x | {r['cpu_ratio_best']:.2f}x / {r['cpu_ratio_median']:.2f}x | "
                     f"{r['cherrytop_rss_mb']:.0f} / {r['trl_rss_mb']:.0f} |"
                     + (f" {r['cherrytop_gpu_mb']:.0f} / {r['trl_gpu_mb']:.0f} |" if gpu else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
