"""Every policy-gradient algorithm of stage 6, and every DPO variant, side by side on the built-in world
(tiny preset).

For each seed: one run trains pretrain → sft → compare → rm (`cherrytop pipeline --until rm`); then,
from the same SFT model and reward model, `cherrytop ppo --rl.algorithm=X` trains one policy per
algorithm (each in its own run folder, same episode budget), plus one GRPO run whose reward is the
world's graders (`--rl.reward=function`, a verifiable reward) for contrast, and `cherrytop dpo` trains
one policy per DPO variant from the same SFT model on the same comparisons. Each policy is scored as the
pipeline scores PPO: helpful / truthful / harmless on the held-out tasks (greedy answers), win rate
against SFT by the graders, KL to SFT (nats per sampled response), wall time of the training command
and its episodes/s. Writes a Markdown table (default docs/results/algorithms.md) and the raw JSON.

    .venv/bin/python bench/algorithms.py --seeds 0 1                 # ~25 min per seed on 2 cores
    .venv/bin/python bench/algorithms.py --seeds 0 --algorithms ppo grpo --out /tmp/a.md
    .venv/bin/python bench/algorithms.py --seeds 0 1 --algorithms dpo ipo simpo online_dpo --out docs/results/dpo.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ALGORITHMS = ["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
DPO = {"dpo": [], "ipo": ["--dpo.loss=ipo"], "simpo": ["--dpo.loss=simpo"], "online_dpo": ["--dpo.rounds=2"],
       "dpo_pl": ["--dpo.pairs=plackett_luce"], "simpo_lr1e-5": ["--dpo.loss=simpo", "--dpo.train.lr=1e-5"], "dpo_beta0.25": ["--dpo.beta=0.25"]}
"""`cherrytop dpo` variants, from the same SFT model on the same comparisons (their run gets a copy of them)."""
VERIFIABLE = ("grpo_graders", ["--rl.algorithm=grpo", "--rl.reward=function",
                               "--rl.reward_fn=cherrytop.world.reward:graded"])
"""The contrast run: GRPO against the world's graders instead of the reward model."""


def cli(*args: str) -> float:
    """Run `cherrytop ARGS` in a fresh process; returns its wall time in seconds (stops on failure)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cherrytop.cli", *args], check=True)
    return time.perf_counter() - t0


_ANSWERS: dict = {}
"""(checkpoint folder, seed) -> its held-out tasks and greedy answers."""


def score(run_dir: Path, base: Path, seed: int, stage: str = "ppo") -> dict:
    """The pipeline's evaluation of `run_dir/<stage>` against `base/sft` (cherrytop.pipeline.evaluate_all's)."""
    from cherrytop.config import load_config
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.eval.heldout import answer_heldout
    from cherrytop.eval.heldout import score as graded
    from cherrytop.eval.versus import kl_to_reference, win_rate
    from cherrytop.model.load import load_model
    from cherrytop.world import World
    cfg = load_config("tiny", [], [f"--run.seed={seed}"])
    world, e = World(cfg.world), cfg.eval
    out = {}
    answers = {}
    for name, folder in (("sft", base / "sft"), ("policy", run_dir / stage)):
        if (folder, seed) not in _ANSWERS:  # greedy answers: SFT's are the same for every row of a seed
            model, tok = load_model(folder), load_tokenizer(folder)
            _ANSWERS[folder, seed] = answer_heldout(model, tok, world, e.n_tasks, e.max_new_tokens, e.batch_size, progress=False)
        tasks, answers[name] = _ANSWERS[folder, seed]
        out[name] = graded(tasks, answers[name])
    prompts = [list(t.messages) for t in tasks]
    out["versus_sft"] = win_rate(tasks, answers["policy"], answers["sft"])
    out["kl_to_sft"] = kl_to_reference(load_model(run_dir / stage), load_model(base / "sft"), load_tokenizer(base / "sft"),
                                       prompts, cfg.ppo.max_new_tokens, cfg.ppo.temperature, e.batch_size, seed)
    if stage == "ppo":
        logs = [json.loads(r) for r in (run_dir / "logs" / "ppo.jsonl").read_text().splitlines()]
        out["episodes_per_s"] = logs[-1]["perf/episodes_per_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--algorithms", nargs="+", default=ALGORITHMS + [VERIFIABLE[0]] + list(DPO)[:4])
    ap.add_argument("--runs", default="runs", help="run folder (--run.out_dir)")
    ap.add_argument("--base-name", default="algos-s{seed}", help="the run holding each seed's sft and rm")
    ap.add_argument("--out", default="docs/results/algorithms.md")
    a = ap.parse_args(argv)
    runs, results = Path(a.runs), {}
    for seed in a.seeds:
        common = ["--preset", "tiny", f"--run.seed={seed}", f"--run.out_dir={runs}"]
        base_name = a.base_name.format(seed=seed)
        base = runs / base_name
        cli("pipeline", *common, f"--run.name={base_name}", "--until", "rm")  # skipped where already trained
        for alg in a.algorithms:
            name = f"{base_name}-{alg}"
            if alg in DPO:
                extra = DPO[alg]
                (runs / name / "data").mkdir(parents=True, exist_ok=True)
                for f in (base / "data").glob("comparisons*"):
                    shutil.copy(f, runs / name / "data" / f.name)
                wall = cli("dpo", *common, f"--run.name={name}", f"--dpo.train.init={base / 'sft'}", *extra)
                results[f"{seed}/{alg}"] = {**score(runs / name, base, seed, "dpo"), "wall_s": wall, "args": extra}
                print(json.dumps({f"{seed}/{alg}": results[f"{seed}/{alg}"]}), flush=True)
                continue
            extra = VERIFIABLE[1] if alg == VERIFIABLE[0] else [f"--rl.algorithm={alg}"]
            wall = cli("ppo", *common, f"--run.name={name}", f"--ppo.init={base / 'sft'}",
                       f"--ppo.reward_model={base / 'rm'}", *extra)
            results[f"{seed}/{alg}"] = {**score(runs / name, base, seed), "wall_s": wall, "args": extra}
            print(json.dumps({f"{seed}/{alg}": results[f"{seed}/{alg}"]}), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.write_text(render(results, a.seeds, a.algorithms))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def render(results: dict, seeds: list[int], algorithms: list[str]) -> str:
    lines = ["# Algorithms side by side (tiny preset)", "",
             "Same SFT model, comparisons and reward model per seed; `cherrytop ppo --rl.algorithm=X`, 2,048 episodes "
             "each; `cherrytop dpo` variants (dpo, ipo, simpo, online_dpo = 2 rounds; dpo_pl = Plackett–Luce) on the "
             "same comparisons, no reward model. "
             "Helpful / truthful / harmless: greedy answers to the held-out tasks; win rate vs SFT by the graders "
             "(ties half); KL to SFT in nats per sampled response; wall time of the `cherrytop ppo` command "
             "(loading included). Command: `.venv/bin/python bench/algorithms.py --seeds "
             + " ".join(map(str, seeds)) + "`.", ""]
    for seed in seeds:
        sft = next((results[f"{seed}/{alg}"]["sft"] for alg in algorithms if f"{seed}/{alg}" in results), None)
        lines += [f"## seed {seed}", ""]
        if sft:
            lines += [f"SFT: helpful {sft['helpful']:.3f}, truthful {sft['truthful']:.3f}, harmless {sft['harmless']:.3f}.", ""]
        lines += ["| algorithm | helpful | truthful | harmless | win vs SFT | KL to SFT | wall time (s) | episodes/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for alg in algorithms:
            r = results.get(f"{seed}/{alg}")
            if r:
                p = r["policy"]
                eps = f"{r['episodes_per_s']:.1f}" if "episodes_per_s" in r else "–"
                lines.append(f"| {alg} | {p['helpful']:.3f} | {p['truthful']:.3f} | {p['harmless']:.3f} | "
                             f"{r['versus_sft']['win_rate']:.3f} | {r['kl_to_sft']:.2f} | {r['wall_s']:.0f} | {eps} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
