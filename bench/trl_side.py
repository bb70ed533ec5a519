"""The TRL side of the benchmark: the same tasks as `cherrytop_side.py`, run with TRL's trainers on
the same model folder and data (`make_data.py`), printing one `RESULT {json}` line. It imports
nothing from cherrytop and runs in TRL's own venv (TRL is a benchmark-only dependency):

    bench/.venv-trl/bin/python     bench/trl_side.py --task {sft,rm,grpo,rloo,dpo_pairs,dpo_rankings,gen}   # trl 1.16.0
    bench/.venv-trl-ppo/bin/python bench/trl_side.py --task ppo           # trl 1.12.0 (trl.experimental.ppo)

Settings that differ from TRL's defaults, all to match cherrytop's run (see bench/README.md):
bf16 off and gradient checkpointing off (TRL's defaults; very slow on CPU), no checkpoints, no
evaluation, no reporting integrations, dropout off (the model has none), the tiny preset's batch
sizes, lengths, learning rates and PPO epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Meter, Spec, report  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,  # noqa: E402
                          TrainerCallback)

OUT = Path(__file__).resolve().parent / "out"
MODEL = str(OUT / "model")  # the spec's model folder (main sets it: bench/out/<scale>/model for a GPU scale)
PROMPTS = "prompts.jsonl"  # the spec's prompts file


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (OUT / name).read_text().splitlines() if line.strip()]


def common_args(out_dir: str, spec: Spec) -> dict:
    return dict(output_dir=out_dir, bf16=spec.bf16, fp16=False, gradient_checkpointing=False, report_to="none",
                save_strategy="no", eval_strategy="no", logging_steps=10, seed=0, dataloader_num_workers=0,
                disable_tqdm=True, use_cpu=spec.device == "cpu")


class StepClock(TrainerCallback):
    """Marks each optimizer step's start (after its batch was collated: the Trainer fetches a step's
    `accumulation` micro-batches before on_step_begin) with the work counted by the wrapped collator
    for that step's micro-batches."""

    def __init__(self, meter: Meter, counts: list[float], accumulation: int = 1):
        self.meter, self.counts, self.accumulation = meter, counts, accumulation

    def on_step_begin(self, args, state, control, **kwargs):
        n = len(self.meter.marks) * self.accumulation
        self.meter.step(sum(self.counts[n: n + self.accumulation]))


def counting(collator, counts: list[float], work):
    def collate(examples):
        batch = collator(examples)
        counts.append(work(batch))
        return batch
    return collate


def bench_sft(spec: Spec, out_dir: str) -> None:
    from trl import SFTConfig, SFTTrainer
    tok = AutoTokenizer.from_pretrained(MODEL)
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in read_jsonl("sft.jsonl")]
    args = SFTConfig(**common_args(out_dir, spec), max_steps=spec.sft_steps, per_device_train_batch_size=spec.sft_batch,
                     gradient_accumulation_steps=1, learning_rate=spec.sft_lr, warmup_steps=2, max_length=spec.sft_seq_len,
                     packing=False, padding_free=False)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    meter, counts = Meter(spec.warmup), []
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[StepClock(meter, counts)])
    trainer.data_collator = counting(trainer.data_collator, counts, lambda b: int(b["attention_mask"].sum()))
    trainer.train()
    report("sft", "trl", meter, "tokens", trl_version=_version())


def bench_rm(spec: Spec, out_dir: str) -> None:
    from trl import RewardConfig, RewardTrainer
    tok = AutoTokenizer.from_pretrained(MODEL)
    rows = read_jsonl("pairs.jsonl")
    args = RewardConfig(**common_args(out_dir, spec), max_steps=spec.rm_steps, per_device_train_batch_size=spec.rm_pairs_batch,
                        gradient_accumulation_steps=1, learning_rate=spec.rm_lr, warmup_steps=2, max_length=spec.rm_seq_len)
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    meter, counts = Meter(spec.warmup), []
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[StepClock(meter, counts)])
    trainer.data_collator = counting(trainer.data_collator, counts, lambda b: int(b["input_ids"].shape[0]) // 2)
    trainer.train()
    report("rm", "trl", meter, "pairs", trl_version=_version())


def bench_dpo(spec: Spec, out_dir: str, rankings: bool) -> None:
    """`DPOTrainer` (trl 1.16.0), sigmoid loss, β = spec.dpo_beta, on chosen/rejected rows: the C(8,2) = 28 pairs
    of each K = 8 ranking (pairs-k8.jsonl, the rankings cherrytop trains on) or the pairwise data (pairs.jsonl).
    A step is the pairs of spec.dpo_rankings_batch prompts (4 × 28 = 112: spec.dpo_trl_micro pairs per pass,
    gradient accumulation for the rest) or spec.dpo_pairs_batch pairs (one pass). π_ref: TRL's default,
    `precompute_ref_log_probs=False`: a second copy of the model (loaded in __init__, outside the window)
    runs a no-grad forward over each micro-batch's chosen and rejected sequences inside the step, so its
    time is in TRL's window."""
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(MODEL)
    rows = read_jsonl(f"pairs-k{spec.dpo_k}.jsonl" if rankings else "pairs.jsonl")
    pairs = spec.dpo_rankings_batch * spec.dpo_k * (spec.dpo_k - 1) // 2 if rankings else spec.dpo_pairs_batch
    micro = spec.dpo_trl_micro if rankings else spec.dpo_pairs_batch
    if pairs % micro:
        raise SystemExit(f"error: {pairs} pairs per step is not a multiple of dpo_trl_micro={micro}")
    accumulation = pairs // micro
    if pairs * spec.dpo_steps > len(rows):  # one epoch: every step a full one
        raise SystemExit(f"error: {spec.dpo_steps} steps of {pairs} pairs need more than the {len(rows)} rows")
    args = DPOConfig(**common_args(out_dir, spec), max_steps=spec.dpo_steps, per_device_train_batch_size=micro,
                     gradient_accumulation_steps=accumulation, learning_rate=spec.dpo_lr, warmup_steps=2,
                     max_length=spec.dpo_seq_len, beta=spec.dpo_beta, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False, disable_dropout=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    meter, counts = Meter(spec.warmup), []
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[StepClock(meter, counts, accumulation)])
    trainer.data_collator = counting(trainer.data_collator, counts, lambda b: int(b["input_ids"].shape[0]) // 2)
    trainer.train()
    report("dpo_rankings" if rankings else "dpo_pairs", "trl", meter, "pairs", trl_version=_version(),
           micro_pairs=micro, accumulation=accumulation)


def prompt_ids(tok) -> list[list[int]]:
    return [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
            for r in read_jsonl(PROMPTS)]


def bench_ppo(spec: Spec, out_dir: str) -> None:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    tok = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    ids = prompt_ids(tok)
    # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, split into
    # num_mini_batches; micro-batch = per_device_train_batch_size. So 32 x 2 / 2 = cherrytop's 64 / 32 / 32.
    # (accelerate then steps the optimizer every 2 micro-batches: 4 AdamW steps per iteration, not 8;
    # the forward/backward work is the same, and an AdamW step on 2.5M parameters is negligible.)
    n_mb = spec.ppo_batch // spec.ppo_minibatch
    args = PPOConfig(**common_args(out_dir, spec), per_device_train_batch_size=spec.ppo_minibatch, gradient_accumulation_steps=n_mb,
                     num_mini_batches=n_mb, total_episodes=spec.ppo_iterations * spec.ppo_batch,
                     num_ppo_epochs=spec.ppo_epochs, response_length=spec.response_len, temperature=spec.temperature,
                     learning_rate=spec.ppo_lr, kl_coef=spec.kl_coef, missing_eos_penalty=1.0, stop_token="eos",
                     local_rollout_forward_batch_size=spec.ppo_batch, num_sample_generations=0)
    policy = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(MODEL + "-reward", num_labels=1, dtype=torch.float32)  # make_data.reward_folder
    value = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1, dtype=torch.float32)
    meter = Meter(spec.ppo_warmup)

    class IterationClock(TrainerCallback):  # PPOTrainer calls on_step_end once per iteration
        def on_train_begin(self, args, state, control, **kwargs):
            meter.step(spec.ppo_batch)

        def on_step_end(self, args, state, control, **kwargs):
            meter.step(spec.ppo_batch)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm, value_model=value,
                         train_dataset=Dataset.from_list([{"input_ids": x} for x in ids]), callbacks=[IterationClock()])
    trainer.train()
    report("ppo", "trl", meter, "episodes", trl_version=_version())


def bench_group(spec: Spec, out_dir: str, algorithm: str) -> None:
    """`GRPOTrainer` / `RLOOTrainer` (trl 1.16.0, transformers `generate`, no vLLM) at cherrytop's GRPO / RLOO
    settings: spec.group_size answers per prompt (`num_generations`), a rollout batch of spec.ppo_batch answers
    (`steps_per_generation` micro-batches of spec.ppo_minibatch, one optimizer step each), spec.ppo_epochs
    passes over it (`num_iterations`), and the same KL: GRPO k3 in the loss with β = spec.grpo_kl_coef, its
    loss `loss_type="grpo"` (each answer's token mean, then the mean over answers: cherrytop's
    seq_mean_token_mean; TRL's default "dapo" is a token sum over the generation batch's tokens), advantages
    scaled by the group's std (`scale_rewards="group"`); RLOO k1 summed per answer in the reward with
    β = spec.kl_coef, leave-one-out baseline, no advantage normalisation (TRL's default, as cherrytop)."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
    tok = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    rows = [{"prompt": r["messages"]} for r in read_jsonl(PROMPTS)]  # conversational: TRL applies the chat template
    steps = spec.ppo_batch // spec.ppo_minibatch  # optimizer steps per pass over a rollout batch
    per_iteration = steps * spec.ppo_epochs  # optimizer steps per rollout batch (TRL generates every this many)
    common = dict(**common_args(out_dir, spec), per_device_train_batch_size=spec.ppo_minibatch,
                  gradient_accumulation_steps=1, steps_per_generation=steps, num_generations=spec.group_size,
                  max_completion_length=spec.response_len, temperature=spec.temperature, top_p=1.0, top_k=0,
                  num_iterations=spec.ppo_epochs, epsilon=0.2, learning_rate=spec.ppo_lr, max_grad_norm=1.0,
                  adam_epsilon=1e-5, lr_scheduler_type="constant", max_steps=spec.ppo_iterations * per_iteration,
                  use_vllm=False, mask_truncated_completions=False, disable_dropout=True, log_completions=False)
    if algorithm == "grpo":
        args = GRPOConfig(**common, beta=spec.grpo_kl_coef, loss_type="grpo", scale_rewards="group")
        trainer_cls = GRPOTrainer
    else:
        args = RLOOConfig(**common, beta=spec.kl_coef, normalize_advantages=False)
        trainer_cls = RLOOTrainer
    policy = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(MODEL + "-reward", num_labels=1, dtype=torch.float32)  # make_data.reward_folder
    rm_tok = AutoTokenizer.from_pretrained(MODEL + "-reward")
    rm.config.pad_token_id = rm_tok.pad_token_id
    meter = Meter(spec.ppo_warmup)

    class IterationClock(TrainerCallback):
        """An iteration = one generation batch and its per_iteration optimizer steps (GA = 1: one micro-batch
        each). Its start is the start of the optimizer step that generates (TRL generates inside the first
        training_step of the iteration, after on_step_begin); the end of the last step closes the window."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % per_iteration == 0:
                meter.step(spec.ppo_batch)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == args.max_steps:
                meter.step(0)
    trainer = trainer_cls(model=policy, reward_funcs=rm, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, reward_processing_classes=rm_tok, callbacks=[IterationClock()])
    lengths = []
    inner = trainer._generate_and_score_completions

    def generate_and_score(*a, **kw):  # the mean answer length, as cherrytop's side reports it
        out = inner(*a, **kw)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return out
    trainer._generate_and_score_completions = generate_and_score
    trainer.train()
    if len(lengths) != spec.ppo_iterations:
        raise RuntimeError(f"{len(lengths)} generation batches for {spec.ppo_iterations} iterations")
    report(algorithm, "trl", meter, "episodes", trl_version=_version(), mean_response_len=sum(lengths) / len(lengths))


def bench_gen(spec: Spec, static: bool = False) -> None:
    """transformers' `generate` (dynamic KV cache) exactly as TRL's PPO calls it for rollouts; `static`:
    with `cache_implementation="static"`, which transformers compiles on a GPU (its fast path).
    bf16 weights with `spec.bf16`."""
    from transformers import GenerationConfig
    tok = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16 if spec.bf16 else torch.float32)
    model = model.to(spec.device).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    gc = GenerationConfig(max_new_tokens=spec.response_len, temperature=spec.temperature + 1e-7, top_k=0, top_p=1.0,
                          do_sample=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          **({"cache_implementation": "static"} if static else {}))
    ids = prompt_ids(tok)
    torch.manual_seed(0)
    meter, steps = Meter(spec.warmup), []
    for i in range(spec.gen_batches):
        enc = tok.pad({"input_ids": ids[i * spec.ppo_batch: (i + 1) * spec.ppo_batch]}, return_tensors="pt").to(spec.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gc)
        resp = out[:, enc["input_ids"].shape[1]:]
        is_eos = (resp == tok.eos_token_id).int()
        after = is_eos.cumsum(1) - is_eos  # EOS seen before this position
        meter.step(int((after == 0).sum()), at=t0)
        steps.append(resp.shape[1])
    meter.step(0)
    report("gen_static" if static else "gen", "trl", meter, "tokens", trl_version=_version(),
           decode_steps=sum(steps[spec.warmup:]))


def _version() -> str:
    import trl
    import transformers
    return f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="TRL side of the cherrytop comparison")
    ap.add_argument("--task", required=True, choices=["sft", "rm", "ppo", "grpo", "rloo", "dpo_pairs", "dpo_rankings",
                                                    "gen", "gen_static"])
    ap.add_argument("--spec", default="{}", help="Spec as JSON (harness.Spec); defaults = the tiny preset")
    args = ap.parse_args(argv)
    spec = Spec.from_json(args.spec)
    torch.set_num_threads(spec.threads)
    global MODEL, PROMPTS
    MODEL, PROMPTS = str(OUT / spec.data), spec.prompts
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        {"sft": lambda: bench_sft(spec, out_dir), "rm": lambda: bench_rm(spec, out_dir),
         "ppo": lambda: bench_ppo(spec, out_dir), "grpo": lambda: bench_group(spec, out_dir, "grpo"),
         "rloo": lambda: bench_group(spec, out_dir, "rloo"), "gen": lambda: bench_gen(spec),
         "dpo_pairs": lambda: bench_dpo(spec, out_dir, rankings=False),
         "dpo_rankings": lambda: bench_dpo(spec, out_dir, rankings=True),
         "gen_static": lambda: bench_gen(spec, static=True)}[args.task]()


if __name__ == "__main__":
    main()
