"""The cherrytop side of the benchmark: runs one task through cherrytop's real entry points
(`stages.sft.run`, `stages.reward.run`, `stages.ppo.run` with `rl.algorithm` ppo / grpo / rloo,
`stages.dpo.run`, `rollout.sampler.sample`) on the shared inputs of `make_data.py`, and prints one `RESULT {json}` line.
Started by compare.py in a fresh process per task (so peak memory is per task), with cherrytop's venv:

    .venv/bin/python bench/cherrytop_side.py --task {sft,rm_pairs,rm_rankings,ppo,grpo,rloo,dpo_pairs,dpo_rankings,gen} \
        [--spec JSON]

The step clock is read by wrapping the function each loop calls at the start of a step (the
micro-batch builder, or the PPO rollout): nothing inside cherrytop is changed for the benchmark.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Meter, Spec, report  # noqa: E402

import torch  # noqa: E402

from cherrytop.config import load_config  # noqa: E402
from cherrytop.train import host  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def _common(spec: Spec, run_dir: str) -> list[str]:
    return [f"--run.out_dir={run_dir}", "--run.name=bench", f"--run.threads={spec.threads}",
            f"--dist.bf16={str(spec.bf16).lower()}"]


def _model(spec: Spec) -> Path:
    return OUT / spec.data


def bench_sft(spec: Spec, run_dir: str) -> None:
    from cherrytop.stages import sft
    from cherrytop.train import loop
    cfg = load_config("tiny", overrides=_common(spec, run_dir) + [
        f"--sft.data={OUT / 'sft.jsonl'}", f"--sft.init={_model(spec)}", f"--sft.max_steps={spec.sft_steps}",
        f"--sft.batch_size={spec.sft_batch}", f"--sft.micro_batch_size={spec.sft_batch}",
        f"--sft.seq_len={spec.sft_seq_len}", f"--sft.lr={spec.sft_lr}", "--sft.warmup_steps=2",
        "--sft.eval_every=100000", "--sft.save_every=100000", "--sft.log_every=10", "--sft.eval_batches=1"])
    meter = Meter(spec.warmup)
    _time_loop(loop, meter, lambda b: int(b["attention_mask"].sum()))
    sft.run(cfg, fresh=True)
    report("sft", "cherrytop", meter, "tokens")


def bench_rm(spec: Spec, run_dir: str, rankings: bool) -> None:
    from cherrytop.stages import reward
    from cherrytop.train import loop
    data = OUT / ("rankings.jsonl" if rankings else "pairs.jsonl")
    batch = spec.rm_rankings_batch if rankings else spec.rm_pairs_batch
    cfg = load_config("tiny", overrides=_common(spec, run_dir) + [
        f"--rm.train.data={data}", f"--rm.train.init={_model(spec)}", "--rm.epochs=0",
        f"--rm.train.max_steps={spec.rm_steps}", f"--rm.train.batch_size={batch}",
        f"--rm.train.micro_batch_size={batch}", f"--rm.train.seq_len={spec.rm_seq_len}", f"--rm.train.lr={spec.rm_lr}",
        "--rm.train.eval_every=100000", "--rm.train.save_every=100000", "--rm.train.eval_batches=1"])
    meter = Meter(spec.warmup)
    _time_loop(loop, meter, lambda b: int(b["pref"].sum()) + int(b["tie"].sum()) // 2)
    reward.run(cfg, fresh=True)
    report("rm_rankings" if rankings else "rm_pairs", "cherrytop", meter, "pairs")


def _time_loop(loop, meter: Meter, work, rows: list[int] | None = None) -> None:
    """Wrap `loop.run` so that each step's micro-batch builder marks the step start and its work
    (and, given `rows`, appends the step's sequences to it)."""
    inner = loop.run

    def run(stage, cfg, fresh=False):
        build = stage.micro_batches

        def timed(step):
            t0 = time.perf_counter()
            batches = build(step)
            meter.step(sum(work(b) for b in batches), at=t0)
            if rows is not None:
                rows.append(sum(int(b["input_ids"].shape[0]) for b in batches))
            return batches
        stage.micro_batches = timed
        return inner(stage, cfg, fresh)
    loop.run = run


def bench_dpo(spec: Spec, run_dir: str, rankings: bool) -> None:
    """`cherrytop dpo` (`stages.dpo.run`, sigmoid loss, β = spec.dpo_beta) on K = 8 rankings (each prompt's 8
    answers scored once, all 28 pairs in the loss) or on pairwise data (K = 2). Work = strict pairs.

    π_ref's log-probs: cherrytop computes them once, for the whole file, before its first step
    (`dpo.reference_logps`, outside the step window); TRL's DPOTrainer (precompute_ref_log_probs=False, its
    default) runs π_ref on every pair inside each step. So that cherrytop's number includes its π_ref
    work, the time of that pass (wall and CPU) is charged pro rata: ref seconds × (answers trained on in
    the window / answers π_ref scored), added to the window's seconds. The uncharged rate and the whole
    pass's time are in the result too (`per_s_without_ref`, `ref_pass_s`, `ref_pass_answers`)."""
    from cherrytop.stages import dpo
    from cherrytop.train import loop
    data = OUT / (f"rankings-k{spec.dpo_k}.jsonl" if rankings else "pairs.jsonl")
    batch = spec.dpo_rankings_batch if rankings else spec.dpo_pairs_batch
    cfg = load_config("tiny", overrides=_common(spec, run_dir) + [
        f"--dpo.train.data={data}", f"--dpo.train.init={_model(spec)}", "--dpo.epochs=0", "--dpo.loss=dpo",
        f"--dpo.beta={spec.dpo_beta}", f"--dpo.train.max_steps={spec.dpo_steps}", f"--dpo.train.batch_size={batch}",
        f"--dpo.train.micro_batch_size={batch}", f"--dpo.train.seq_len={spec.dpo_seq_len}",
        f"--dpo.train.lr={spec.dpo_lr}", "--dpo.train.warmup_steps=2", "--dpo.train.eval_every=100000",
        "--dpo.train.save_every=100000", "--dpo.train.eval_batches=1"])
    meter, rows = Meter(spec.warmup), []
    _time_loop(loop, meter, lambda b: int(b["pref"].sum()), rows)  # strict pairs (the data has no ties)
    ref = {"s": 0.0, "cpu_s": 0.0, "answers": 0}
    inner = dpo.reference_logps

    def reference_logps(lm, encoded, pad_id, seq_len):
        t0, c0 = time.perf_counter(), time.process_time()
        out = inner(lm, encoded, pad_id, seq_len)
        ref["s"] += time.perf_counter() - t0
        ref["cpu_s"] += time.process_time() - c0
        ref["answers"] += sum(len(e) for e in encoded)
        return out
    dpo.reference_logps = reference_logps
    dpo.run(cfg, fresh=True)
    if not ref["answers"]:
        raise RuntimeError("dpo.reference_logps was not called: the π_ref pass was not timed")
    r = meter.result("pairs")
    share = sum(rows[spec.warmup:-1]) / ref["answers"]  # the window's answers / the answers π_ref scored
    seconds, cpu = r["seconds"] + share * ref["s"], r["cpu_seconds"] + share * ref["cpu_s"]
    report("dpo_rankings" if rankings else "dpo_pairs", "cherrytop", meter, "pairs",
           per_s=r["work"] / seconds, seconds=seconds, per_cpu_s=r["work"] / cpu, cpu_seconds=cpu,
           per_s_without_ref=r["per_s"], ref_pass_s=ref["s"], ref_pass_answers=ref["answers"],
           ref_charged_s=share * ref["s"], window_answers=sum(rows[spec.warmup:-1]))


def bench_ppo(spec: Spec, run_dir: str, algorithm: str = "ppo") -> None:
    """`cherrytop ppo` with `--rl.algorithm=algorithm`: ppo (GAE, value model), or the critic-free grpo / rloo
    (spec.group_size answers per prompt, no value model) with their KL set explicitly as TRL's trainers do it:
    GRPO k3 in the loss with β = spec.grpo_kl_coef, RLOO k1 in the reward with β = spec.kl_coef."""
    from cherrytop.stages import ppo
    rl = {"ppo": [],
          "grpo": [f"--rl.group_size={spec.group_size}", "--rl.kl_estimator=k3", "--rl.kl_in=loss",
                   f"--rl.kl_loss_coef={spec.grpo_kl_coef}"],
          "rloo": [f"--rl.group_size={spec.group_size}", "--rl.kl_estimator=k1", "--rl.kl_in=reward"]}[algorithm]
    cfg = load_config("tiny", overrides=_common(spec, run_dir) + [
        f"--ppo.init={_model(spec)}", f"--ppo.reward_model={_model(spec)}-reward", f"--ppo.prompts={OUT / spec.prompts}",
        f"--ppo.episodes={spec.ppo_iterations * spec.ppo_batch}", f"--ppo.batch_size={spec.ppo_batch}",
        f"--ppo.minibatch_size={spec.ppo_minibatch}", f"--ppo.micro_batch_size={spec.ppo_minibatch}",
        f"--ppo.ppo_epochs={spec.ppo_epochs}", f"--ppo.max_new_tokens={spec.response_len}",
        f"--ppo.temperature={spec.temperature}", f"--ppo.lr={spec.ppo_lr}", f"--ppo.value_lr={spec.ppo_lr}",
        f"--ppo.kl_coef={spec.kl_coef}", "--ppo.save_every=100000", f"--rl.algorithm={algorithm}", *rl])
    meter = Meter(spec.ppo_warmup)
    inner = ppo.rollout
    lengths = []

    def rollout(*args, **kwargs):
        meter.step(spec.ppo_batch)
        batch, stats = inner(*args, **kwargs)
        lengths.append(stats["rollout/length"])
        return batch, stats
    inner_update = ppo.update

    def update(*args, **kwargs):
        out = inner_update(*args, **kwargs)
        if len(meter.marks) == spec.ppo_iterations:  # the last iteration's end closes the window
            meter.step(0)
        return out
    ppo.rollout, ppo.update = rollout, update
    ppo.run(cfg, fresh=True)
    report(algorithm, "cherrytop", meter, "episodes", mean_response_len=sum(lengths) / len(lengths))


def bench_gen(spec: Spec) -> None:
    """`rollout.sampler.sample` as PPO's rollout calls it (compiled decoding steps on a GPU, ppo.compile_decode
    = auto); bf16 weights with `spec.bf16`, as on TRL's side."""
    from cherrytop.data.records import read_prompts
    from cherrytop.data.tokenizer import encode_prompt, load_tokenizer
    from cherrytop.model.load import load_model
    from cherrytop.rollout.sampler import left_pad, sample, wants_compile
    device = torch.device(spec.device)
    tok = load_tokenizer(_model(spec))
    model = load_model(_model(spec), torch.bfloat16 if spec.bf16 else torch.float32).to(device).eval()
    prompts = [encode_prompt(tok, [m.to_json() for m in p.messages]) for p in read_prompts(OUT / spec.prompts)]
    gen = torch.Generator(device=device).manual_seed(0)
    meter, steps = Meter(spec.warmup), []
    for i in range(spec.gen_batches):
        ids, mask = left_pad(prompts[i * spec.ppo_batch: (i + 1) * spec.ppo_batch], tok.pad_token_id)
        t0 = time.perf_counter()
        s = sample(model, ids.to(device), mask.to(device), max_new_tokens=spec.response_len, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id, temperature=spec.temperature, generator=gen,
                   compiled=wants_compile("auto", device))
        meter.step(int(s.mask.sum()), at=t0)
        steps.append(s.tokens.shape[1])
    meter.step(0)
    report("gen", "cherrytop", meter, "tokens", decode_steps=sum(steps[spec.warmup:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="cherrytop side of the TRL comparison")
    ap.add_argument("--task", required=True, choices=["sft", "rm_pairs", "rm_rankings", "ppo", "grpo", "rloo",
                                                    "dpo_pairs", "dpo_rankings", "gen"])
    ap.add_argument("--spec", default="{}", help="Spec as JSON (harness.Spec); defaults = the tiny preset")
    args = ap.parse_args(argv)
    spec = Spec.from_json(args.spec)
    host.configure(load_config("tiny", overrides=[f"--run.threads={spec.threads}"]).run)  # as every `cherrytop` command
    with tempfile.TemporaryDirectory(prefix="cherrytop-bench-") as run_dir:
        if args.task == "sft":
            bench_sft(spec, run_dir)
        elif args.task.startswith("rm_"):
            bench_rm(spec, run_dir, rankings=args.task == "rm_rankings")
        elif args.task.startswith("dpo_"):
            bench_dpo(spec, run_dir, rankings=args.task == "dpo_rankings")
        elif args.task in ("ppo", "grpo", "rloo"):
            bench_ppo(spec, run_dir, args.task)
        else:
            bench_gen(spec)


if __name__ == "__main__":
    main()
