"""What both sides of the benchmark share: the matched settings (`Spec`) and the meter that turns
step timestamps into a throughput. Imported by `cherrytop_side.py` (cherrytop's venv) and by
`trl_side.py` (TRL's venv), so it depends on the standard library only."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class Spec:
    """Settings both sides run with; the defaults are the tiny preset's (src/cherrytop/config.py)."""
    threads: int = 1
    """torch CPU threads on both sides. 1: the 2-core machine is shared, and with 2 threads OpenMP's
    spinning under contention made a one-token forward pass ~15x slower on both sides."""
    warmup: int = 2
    """Steps (or PPO iterations, or generation batches) run before the clock starts."""
    sft_steps: int = 24
    """SFT optimizer steps (warm-up included)."""
    sft_batch: int = 32
    """SFT sequences per step, one forward/backward pass (tiny: sft.batch_size = micro_batch_size = 32)."""
    sft_seq_len: int = 160
    """SFT maximum tokens per example (tiny: sft.seq_len)."""
    sft_lr: float = 1e-3
    """SFT learning rate (tiny: sft.lr)."""
    rm_steps: int = 24
    """Reward-model optimizer steps (warm-up included)."""
    rm_pairs_batch: int = 32
    """Pairwise data: chosen/rejected pairs per step on both sides (64 sequences per pass)."""
    rm_rankings_batch: int = 16
    """K = 4 rankings per step for cherrytop (tiny: rm.train.batch_size = 16): 64 sequences, 96 pairs
    per pass; TRL trains the same rankings as pairs, rm_pairs_batch (64 sequences) per step."""
    rm_seq_len: int = 160
    """Reward-model maximum tokens per sequence (tiny: rm.train.seq_len)."""
    rm_lr: float = 3e-4
    """Reward-model learning rate (tiny: rm.train.lr)."""
    ppo_iterations: int = 4
    """PPO / GRPO / RLOO iterations (rollout batch + updates), warm-up included (ppo_warmup of them)."""
    ppo_warmup: int = 1
    """PPO iterations run before the clock starts."""
    ppo_batch: int = 64
    """Episodes per rollout batch (tiny: ppo.batch_size)."""
    ppo_minibatch: int = 32
    """Episodes per optimizer step (tiny: ppo.minibatch_size); micro-batch = minibatch."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (tiny: ppo.ppo_epochs; TRL GRPO / RLOO `num_iterations`)."""
    response_len: int = 24
    """Most sampled tokens per response (tiny: ppo.max_new_tokens)."""
    temperature: float = 1.0
    """Sampling temperature (tiny: ppo.temperature)."""
    ppo_lr: float = 1e-4
    """Policy (and PPO's value) learning rate (ppo.lr, ppo.value_lr)."""
    kl_coef: float = 0.5
    """KL penalty β in the reward (tiny: ppo.kl_coef): PPO's per-token penalty, and RLOO's (TRL `RLOOConfig.beta`)."""
    group_size: int = 4
    """GRPO / RLOO answers per prompt (tiny: rl.group_size; TRL `num_generations`): ppo_batch // group_size prompts
    per rollout batch, each sampled group_size times."""
    grpo_kl_coef: float = 0.04
    """GRPO's β of the k3 KL term in the loss (tiny: rl.kl_loss_coef, the GRPO paper's; TRL `GRPOConfig.beta`)."""
    dpo_steps: int = 24
    """DPO optimizer steps (warm-up included)."""
    dpo_k: int = 8
    """Answers per ranking of the DPO rankings row (make_data's rankings-k<dpo_k>.jsonl, strict orders:
    C(dpo_k, 2) = 28 pairs per prompt, no ties)."""
    dpo_rankings_batch: int = 4
    """K = 8 rankings (prompts) per DPO optimizer step: cherrytop one pass of 32 answers (dpo.train.batch_size
    = micro_batch_size = 4); TRL the same 4 × 28 = 112 pairs as dpo_trl_micro pairs per pass, with gradient
    accumulation (4 passes of 28 pairs, 56 sequences each)."""
    dpo_trl_micro: int = 28
    """TRL's pairs per forward/backward pass in the DPO rankings row (`per_device_train_batch_size`; one
    prompt's pairs); dpo_rankings_batch · C(dpo_k, 2) must be a multiple of it."""
    dpo_pairs_batch: int = 32
    """Pairwise DPO data: chosen/rejected pairs per step on both sides, one pass of 64 sequences each."""
    dpo_seq_len: int = 160
    """DPO maximum tokens per prompt + answer (tiny: dpo.train.seq_len; TRL `max_length`)."""
    dpo_lr: float = 1e-4
    """DPO learning rate (tiny: dpo.train.lr)."""
    dpo_beta: float = 0.1
    """DPO's β (tiny: dpo.beta; TRL `DPOConfig.beta`), sigmoid loss on both sides."""
    gen_batches: int = 6
    """Generation benchmark: batches of `ppo_batch` prompts (warm-up included)."""
    scale: str = "tiny"
    """The model: `tiny` (the tiny preset's, vocabulary 1,536), or a random-weight Llama of issue 7's GPU
    table (make_data.SCALES: `125m`, `1b`; vocabulary 32,000) in bench/out/<scale>/model."""
    device: str = "cpu"
    """`cpu` or `cuda` (both sides; each process has the one GPU)."""
    bf16: bool = False
    """bf16 on both sides: TRL `bf16=True` and cherrytop `dist.bf16` (autocast) for training and PPO,
    bf16 weights for the generation rows. Off on CPU (TRL's bf16 is very slow there)."""
    prompt_len: int = 0
    """0: the world's prompts as they come (~30-60 tokens); n > 0: every prompt exactly n tokens
    (make_data's prompts-<n>.jsonl)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes carried into the results."""

    @classmethod
    def gpu(cls, scale: str, **changes) -> "Spec":
        """Issue 7's GPU settings: a random-weight Llama of `scale`, bf16, batch 64 of 64-token prompts,
        128 sampled tokens, PPO with 4 minibatches and 1 epoch (as TRL's PPO defaults)."""
        return cls(**{**dict(scale=scale, device="cuda", bf16=True, prompt_len=64, ppo_batch=64, ppo_minibatch=16,
                             ppo_epochs=1, response_len=128, ppo_iterations=4, gen_batches=4), **changes})

    def smoke(self) -> "Spec":
        """The same code paths at a size a CPU runs in minutes (to check a GPU run will work, not to time)."""
        return replace(self, sft_steps=4, sft_batch=4, rm_steps=4, rm_pairs_batch=4, rm_rankings_batch=2, ppo_iterations=3,
                       dpo_steps=4, dpo_rankings_batch=2, dpo_pairs_batch=4,
                       ppo_batch=8, ppo_minibatch=4, response_len=8, gen_batches=3, warmup=1)

    @property
    def data(self) -> str:
        """The benchmark's folder of inputs (relative to bench/out) holding this scale's model."""
        return "model" if self.scale == "tiny" else f"{self.scale}/model"

    @property
    def prompts(self) -> str:
        """The prompts file (in bench/out) for this spec's prompt length."""
        return "prompts.jsonl" if self.prompt_len == 0 else f"prompts-{self.prompt_len}.jsonl"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        return cls(**json.loads(text))


class Meter:
    """Marks the start of each step. The timed window runs from the start of step `warmup` to the
    start of the last step, and counts the work of the steps in between; the last step only closes
    the window. Both sides can see when a step starts (a callback, a wrapped data function), so
    neither side's end-of-run work (final checkpoint, evaluation) enters the numbers."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.marks: list[float] = []
        self.cpu: list[float] = []  # process CPU time at each mark: robust to other jobs on the machine
        self.work: list[float] = []

    def step(self, work: float, at: float | None = None) -> None:
        """Mark the start (now, or `at`, a perf_counter time) of a step that does `work` units
        (tokens, pairs, episodes). On a GPU the device is synchronised first, so that queued work is
        counted in the step that queued it."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter() if at is None else at)
        self.cpu.append(time.process_time())
        self.work.append(work)

    def result(self, unit: str) -> dict:
        if len(self.marks) < self.warmup + 2:
            raise RuntimeError(f"only {len(self.marks)} steps seen; expected at least {self.warmup + 2}")
        seconds = self.marks[-1] - self.marks[self.warmup]
        work = sum(self.work[self.warmup:-1])
        cpu = self.cpu[-1] - self.cpu[self.warmup]
        return {"unit": unit, "per_s": work / seconds, "seconds": seconds, "work": work,
                "per_cpu_s": work / cpu, "cpu_seconds": cpu, "steps": len(self.marks) - 1 - self.warmup}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process's tensors in MiB (None without a GPU in use)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def report(task: str, side: str, meter: Meter, unit: str, **extra) -> None:
    """The one JSON line a side prints last: what compare.py reads."""
    out = {"task": task, "side": side, **meter.result(unit), "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), **extra}
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
