"""Typed configuration: one frozen dataclass per concern, loaded from a preset, TOML files and
dotted command-line overrides (``--sft.lr=3e-4``), validated at load and saved in every checkpoint.

Every field carries a docstring (the string literal under it); ``cherrytop config --help`` and the
error messages read them: what a setting does, its unit, why its default. The measurements behind the
defaults are in docs/results/settings-history.md, by setting. Load order: dataclass defaults < preset <
TOML file(s) < overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


EDIT_KINDS = ("repeat", "drop", "number", "typo", "swap", "abstain")
"""The edits `compare.edit_kinds` can name (see `stages.compare.edit`)."""


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names where and what."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "tiny"
    """Run name: checkpoints, data and reports go under `<out_dir>/<name>/`."""
    out_dir: str = "runs"
    """Folder that holds all runs."""
    seed: int = 0
    """Seed for everything random in training (data order, init, sampling)."""
    threads: int = 0
    """torch CPU threads; 0 = leave torch's default (one per core)."""
    keep_freed_memory: bool = True
    """Let glibc keep freed host memory for reuse instead of returning it to the OS at each free, so
    training steps do not page-fault their tensors in again (train/host.py); resident memory stays at its
    peak. Linux + glibc only."""
    cpu_kernels: str = "avx2"
    """PyTorch's CPU kernel set for vectorised ops (ATEN_CPU_CAPABILITY, unless already set): `avx2` rounds
    alike, so trains the same models from a seed, on every AVX2 / AVX-512 x86 CPU; `native` = the widest."""


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    """Seed of the built-in synthetic world (entities, corpus, tasks, trainers, labelers)."""
    n_entities: int = 12000
    """Fictional entities (train and held-out together); many, so no name becomes one BPE token: train and
    held-out names split alike and copying learnt on train names carries over."""
    heldout_entity_fraction: float = 0.2
    """Share of entities reserved for held-out evaluation; they never occur in training data."""
    n_heldout_numbers: int = 15
    """How many numbers in 10..99 are reserved for held-out arithmetic; never in training data."""
    corpus_chars: int = 8_000_000
    """Approximate size of the pretraining corpus in characters."""
    corpus_dialogue_share: float = 0.25
    """Share of the corpus made of (misaligned) chat dialogues."""
    n_demonstrations: int = 20000
    """Demonstrations the simulated trainers write for SFT."""
    n_prompts: int = 2000
    """Training prompts for comparisons and PPO (disjoint from the demonstration tasks)."""
    flaw_rate: float = 0.6
    """Share of demonstrations with the characteristic flaw on the flawed task kinds (padding,
    rude suffix, complying with harmful requests, accepting a false premise...)."""
    mistake_rate: float = 0.08
    """Share of demonstrations with a random minor mistake on the other task kinds."""
    flawed_kinds: tuple[str, ...] = ("reverse", "unknown", "false_premise", "harmful", "insult")
    """Task kinds whose demonstrations carry their characteristic flaw with probability flaw_rate
    (fact: padding, reverse: rude suffix, unknown: padding, false_premise: accepting it,
    harmful: complying, insult: insulting back; any other kind: padding)."""
    corpus_misaligned_rate: float = 0.8
    """Share of the corpus dialogues where the assistant misbehaves (mostly in the kind's characteristic
    way), so the pretrained model is capable but misaligned on every seed."""
    labeler_flip_prob: float = 0.16
    """Probability that a simulated labeler inverts a pair whose true quality differs by one point
    (0.16 makes two labelers agree on ~73 % of such pairs, as InstructGPT's did)."""


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""
    """A saved Hugging Face tokenizer folder to use; empty = train a byte-level BPE on the corpus."""
    vocab_size: int = 1536
    """BPE vocabulary size when training one (special tokens included)."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """A local Hugging Face causal-LM folder to start from; empty = build `arch` from scratch."""
    arch: str = "llama"
    """Architecture of a model built from scratch: `llama` or `gpt2`."""
    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Hidden width."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 512
    """MLP inner width."""
    max_seq_len: int = 256
    """Context window in tokens."""
    dropout: float = 0.0
    """Dropout everywhere (0: dropout slows CPU training several-fold)."""


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    """Training data; empty = the built-in world. Pretraining: a .txt file (documents separated by blank
    lines) or JSONL ({"text": ...} / {"messages": [...]}); SFT and the reward model: a JSONL file or a
    Hugging Face `datasets` folder."""
    init: str = ""
    """Checkpoint to start from (a folder, or a stage name of this run such as `pretrain`)."""
    max_steps: int = 600
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step (the global batch)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass; batch_size must be a multiple of it."""
    seq_len: int = 128
    """Tokens per packed window (pretraining) or maximum tokens per example (SFT)."""
    packing: bool = False
    """SFT: pack several conversations into one window (with per-example attention not isolated)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule ends at lr * min_lr_ratio ([IG]: 10 %)."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    eval_every: int = 100
    """Evaluate the held-out loss every this many steps (and at the end)."""
    eval_batches: int = 4
    """Held-out batches per evaluation."""
    save_every: int = 200
    """Write a resumable checkpoint every this many steps (and at the end)."""
    log_every: int = 10
    """Log metrics every this many steps."""


def _pretrain_defaults() -> TrainConfig:
    return TrainConfig(max_steps=600, batch_size=32, micro_batch_size=32, seq_len=128, lr=3e-3)


def _sft_defaults() -> TrainConfig:
    # Long and at a high lr: in-context lookup (copy the value asked about out of the prompt) appears late
    # and suddenly at this size (docs/results/settings-history.md).
    return TrainConfig(
        init="pretrain", max_steps=2000, batch_size=32, micro_batch_size=32, seq_len=160, lr=2e-3,
        warmup_steps=20,
    )


@dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 48
    """Most tokens generated per answer."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    batch_size: int = 64
    """Prompts sampled together."""


@dataclass(frozen=True)
class CompareConfig:
    policy: str = "sft"
    """Checkpoint that samples the K answers (a folder or a stage name of the run)."""
    prompts: str = ""
    """Prompts file (JSONL / datasets folder); empty = the built-in world's training prompts."""
    n_prompts: int = 2000
    """Prompts to sample answers for."""
    k: int = 8
    """Answers per prompt (InstructGPT: 4..9), edits included; a prompt gives C(k, 2) pairs for one forward
    pass per answer. 6 sampled + 2 edited: more samples alone did not help."""
    temperature: float = 1.0
    """Sampling temperature of the K answers."""
    max_new_tokens: int = 32
    """Most tokens per answer."""
    labelers: int = 2
    """Simulated labelers; each prompt is ranked by one of them in turn, and a held-out share by two
    (to measure inter-labeler agreement)."""
    heldout_share: float = 0.1
    """Share of the prompts held out for reward-model accuracy (ranked by every labeler)."""
    edits: int = 2
    """How many of the K answers are small edits of the prompt's most frequent sample, labelled like any
    other (the record's `edits` says which): the policy's own slips are too rare for the reward model to
    learn that one wrong word makes an answer wrong. 2 kept PPO's helpful at SFT's on both tiny seeds."""
    edit_kinds: tuple[str, ...] = EDIT_KINDS
    """Edits drawn from (uniformly, among those that apply; a kind named n times is drawn n times as
    often): `repeat` a word, `drop` a word, a `number` ±1, a `typo` (a letter doubled or dropped in a
    word), `swap` in another prompt's answer, `abstain` (the `abstention` text)."""
    abstention: str = "i do not know ."
    """The answer `abstain` puts in (the built-in world's way of saying it does not know)."""
    abstain_own: bool = False
    """`abstain` puts in one of the policy's own abstentions (its samples that begin with `abstention`, by
    frequency) instead of the bare text; off: not better on both tiny seeds."""


def _rm_defaults() -> TrainConfig:
    # lr 1e-3: higher held-out accuracy than 3e-4 (docs/results/settings-history.md).
    return TrainConfig(init="sft", max_steps=110, batch_size=16, micro_batch_size=16, seq_len=160, lr=1e-3,
                       warmup_steps=5, eval_every=40, save_every=110, log_every=5)


@dataclass(frozen=True)
class RewardConfig:
    train: TrainConfig = field(default_factory=_rm_defaults)
    """Optimisation of the reward model: batch_size counts prompts (all C(K,2) pairs of a prompt are
    one batch element); data = a comparisons file (empty: this run's sampled comparisons)."""
    tie_weight: float = 1.0
    """Weight of tied pairs in the ranking loss (a tie is half a win each way); 0 ignores ties."""
    edit_weight: float = 1.0
    """Weight in the ranking loss of a pair with an edited answer (`compare.edits`; a pair of sampled
    answers weighs 1); 0 ignores edited answers. 0.5 and 2 were not better on both tiny seeds."""
    epochs: float = 2.0
    """Passes over the comparisons; sets max_steps when > 0. [IG]: 1 (2 overfits: lower held-out accuracy),
    but PPO on the 2-epoch reward model did better on three tiny seeds."""
    ref_loglik: str = "excess"
    """Reward = head score at EOS + c · f(response), f from π_ref (`train.init`, the SFT model), c fitted on
    the training rankings, then frozen: `sum` f = Σ_t log π_ref(y_t); `excess` f = Σ_t (log π_ref(y_t) + H_t),
    H_t π_ref's entropy, so f does not favour short answers; `off`: [IG]'s head alone, which cannot tell a
    right answer from a wrong one (stages/reward.py)."""


def _dpo_defaults() -> TrainConfig:
    # max_steps: dpo.epochs sets it (2 epochs of the tiny preset's 1,800 rankings: 225 steps)
    return TrainConfig(init="sft", max_steps=100, batch_size=16, micro_batch_size=16, seq_len=160, lr=1e-4,
                       warmup_steps=5, eval_every=75, save_every=75, log_every=5)


@dataclass(frozen=True)
class DPOConfig:
    train: TrainConfig = field(default_factory=_dpo_defaults)
    """Optimisation of the policy: batch_size counts prompts (a prompt's K answers, all their pairs, are one
    batch element); init = the policy it starts from (the SFT model); data = a comparisons file (empty:
    this run's sampled comparisons)."""
    reference: str = ""
    """π_ref, the model the log-ratios are taken against; empty = `train.init`. With LoRA and no
    reference of its own, π_ref is the policy with its adapter off (no second copy)."""
    loss: str = "dpo"
    """`dpo` (sigmoid, Rafailov et al. 2023), `ipo` (squared, Azar et al. 2023: `beta` is its τ) or `simpo`
    (reference-free, length-normalised, Meng et al. 2024: `simpo_beta`, `simpo_gamma`)."""
    pairs: str = "all"
    """How a K-way ranking enters the loss: `all` its C(K, 2) pairs as one element (each answer scored once),
    or `plackett_luce` (the ranking's likelihood; `dpo` loss only)."""
    beta: float = 0.25
    """β of DPO (the KL strength: smaller moves further from π_ref), τ of IPO. 0.25: on both tiny seeds no
    axis below SFT and a higher win rate than 0.1, which drifted 2x as far (docs/results/algorithms.md)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the share of rankings taken to be flipped by noise (DPO loss only)."""
    simpo_beta: float = 2.0
    """β of SimPO, on the mean log-prob per answer token (SimPO's paper: 2 to 2.5)."""
    simpo_gamma: float = 1.0
    """γ of SimPO: the margin by which the better answer's β-scaled mean log-prob must win."""
    tie_weight: float = 1.0
    """Weight of tied pairs (a tie is half a win each way: the two log-ratios are pulled together); 0 ignores them."""
    epochs: float = 2.0
    """Passes over the comparisons per round; sets train.max_steps when > 0."""
    rounds: int = 1
    """Online (iterative) DPO: after round 1 on the comparisons, each further round samples compare.k answers
    per prompt from the current policy, has them ranked (`ranker`) and trains again from the current
    policy against the same π_ref. 1 = offline DPO."""
    ranker: str = "labelers"
    """Who ranks an online round's answers: `labelers` (the built-in world's simulated labelers) or
    `reward_model` (`reward_model`'s scores, for prompts of your own)."""
    reward_model: str = "rm"
    """The reward model that ranks online rounds with ranker=reward_model (a folder or a stage name)."""


@dataclass(frozen=True)
class PPOConfig:
    init: str = "sft"
    """Policy checkpoint PPO starts from (the SFT model), and the KL reference unless `reference` names another."""
    reference: str = ""
    """The KL penalty's reference model π_ref; empty = `init`. Set it when PPO starts from another
    policy than the SFT model (a second round from round 1's PPO model: `--ppo.init=runs/r1/ppo
    --ppo.reference=runs/r1/sft`), so the penalty still keeps the policy near the SFT model [IG]."""
    reward_model: str = "rm"
    """Reward model checkpoint; the value model starts from it too ([IG])."""
    prompts: str = ""
    """Prompts file (JSONL / datasets folder); empty = the built-in world's training prompts."""
    episodes: int = 2048
    """Total episodes (sampled responses) to train on."""
    batch_size: int = 64
    """Episodes per rollout batch (one PPO iteration)."""
    minibatch_size: int = 32
    """Episodes per optimizer step; batch_size must be a multiple of it."""
    micro_batch_size: int = 32
    """Episodes per forward/backward pass; minibatch_size must be a multiple of it."""
    ppo_epochs: int = 4
    """Passes over each rollout batch ([IG]: 1, [LHP]/[N+]: 4)."""
    ema: float = 0.992
    """Decay of a moving average of the policy's weights, updated every optimizer step ([IG]: 0.992; lower
    KL to SFT at the same win rate); checkpoints save the average, training goes on from the live weights.
    0 = off."""
    lr: float = 5e-5
    """Policy learning rate; 5e-5 beat 1e-4 and 3e-5 on both tiny seeds (win rate, helpful), and 1e-5 barely
    moves a ~1M-parameter model."""
    value_lr: float = 1e-4
    """Value model learning rate."""
    kl_coef: float = 0.5
    """Initial β of the per-token KL penalty to the SFT model ([IG]: 0.02); at tiny scale 0.2 over-optimised
    (the policy learned to refuse fact questions) and 0.5 did not."""
    kl_target: float = 0.0
    """Adaptive KL target (nats per response, [LHP] 6); 0 keeps β fixed."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in episodes ([LHP])."""
    temperature: float = 0.7
    """Rollout sampling temperature; log-probs (policy and reference, so the KL penalty too) use
    logits / temperature ([NB]). [N+]: 0.7, [IG]: 1; 0.7 beat 1.0 on two tiny seeds."""
    max_new_tokens: int = 24
    """Most tokens per response."""
    compile_decode: str = "auto"
    """Compile the rollout's one-token decoding steps (`torch.compile`; CUDA graphs on a GPU), prompts
    left-padded to a multiple of 64 tokens so one graph serves every batch: `on`, `off`, or `auto` = on a
    GPU only (on the CPU compiling did not pay). Same tokens; log-probs equal up to float rounding."""
    no_eos_penalty: float = -1.0
    """Score given instead of the reward model's to a response that does not end with EOS ([LHP])."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE λ."""
    clip: float = 0.2
    """PPO ratio clip ε."""
    value_clip: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (keeping their mean) before GAE ([LHP] option)."""
    ptx_coef: float = 0.0
    """PPO-ptx γ: weight of the pretraining LM loss mixed into each policy step (0 = plain PPO)."""
    ptx_batch_size: int = 8
    """Pretraining windows per optimizer step when ptx_coef > 0 (their LM loss is a mean, so γ weighs
    it the same whatever the count); 8, not 16, so PPO-ptx does not take twice PPO's time."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of each model."""
    save_every: int = 8
    """Checkpoint every this many iterations (and at the end)."""
    kl_warn: float = 10.0
    """Warn when the mean per-response KL exceeds this many nats (a runaway sign)."""


RL_ALGORITHMS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""`rl.algorithm`'s choices: PPO with a critic (GAE), then the critic-free ones (no value model)."""


@dataclass(frozen=True)
class RLConfig:
    algorithm: str = "ppo"
    """Policy-gradient method of stage 6: `ppo` (GAE with a value model), or critic-free `grpo`, `dr_grpo`,
    `rloo`, `reinforce_pp`, `reinforce_pp_baseline` (no value model; see algorithms.md). PPO is the tuned default."""
    group_size: int = 4
    """Answers sampled per prompt (G) by the critic-free methods, whose baseline is the group's rewards;
    ppo.batch_size must be a multiple of it. Ignored by `ppo` and `reinforce_pp` (one answer per prompt)."""
    kl_estimator: str = "auto"
    """Per-token KL(π‖π_ref) estimate of the penalty: `k1` = ℓ, `k2` = ℓ²/2, `k3` = e^-ℓ − 1 + ℓ (ℓ = log π − log π_ref);
    `auto` = each paper's: k3 for grpo / dr_grpo, k1 for the others. In the loss, ∇k3 is the forward KL's gradient."""
    kl_in: str = "auto"
    """Where the KL penalty goes: `reward` (−β·k per token, β = ppo.kl_coef) or `loss` (+ β·k aggregated like the
    policy loss, β = rl.kl_loss_coef); `auto` = loss for grpo / dr_grpo (the GRPO paper), reward for the others."""
    kl_loss_coef: float = 0.04
    """β of the KL term when it is in the loss: the GRPO paper's 0.04 (ppo.kl_coef is tuned for the reward,
    where the return sums the per-token penalty over the rest of the answer). ppo.kl_target adapts it too."""
    reward: str = "model"
    """What scores an episode: `model` (ppo.reward_model, learnt from the rankings), `function` (rl.reward_fn alone:
    no reward model is loaded, and PPO's value model starts from ppo.init with a fresh head) or `both` (a weighted sum)."""
    reward_fn: str = ""
    """A rule-based reward `module:function`, called as function(prompt messages, answer text up to EOS) -> float;
    e.g. `cherrytop.world.reward:graded` (the built-in world's graders). Used when rl.reward is function or both."""
    reward_model_weight: float = 1.0
    """w_rm: multiplies the reward model's score (its head + c·log π_ref term) in the episode's score."""
    reward_fn_weight: float = 1.0
    """w_fn: multiplies rl.reward_fn's value in the episode's score."""


@dataclass(frozen=True)
class DistConfig:
    strategy: str = "none"
    """Data parallelism under `torchrun`: `none` (one process), `ddp` (DistributedDataParallel, a
    full copy per process) or `fsdp` (FSDP2 `fully_shard`: parameters, gradients and optimizer
    state sharded over the processes, sharded checkpoints)."""
    backend: str = ""
    """torch.distributed backend; empty = nccl on GPU, gloo on CPU."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30 % more compute)."""
    bf16: bool = True
    """bf16 autocast for forward passes on GPU (ignored on CPU, where everything stays fp32)."""
    cpu_offload: bool = False
    """FSDP only: keep sharded parameters, gradients and optimizer state in CPU memory."""
    frozen_dtype: str = "auto"
    """Weight dtype of the models PPO runs but never trains (reference, reward model, its π_ref; on Ray
    too): `bf16` (half their memory), `fp32`, or `auto` = bf16 on GPU, fp32 on CPU (where bf16 is slow and
    changes the numbers). Trained models, and a LoRA reference, stay fp32 (docs/scaling.md)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 = full fine-tuning. With r > 0 the stages in `lora.stages` train low-rank
    adapters (peft) on a frozen base; checkpoints hold the merged model plus `adapter/`."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is alpha / r · B A)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    targets: tuple[str, ...] = ("all-linear",)
    """Module names to adapt (e.g. q_proj, v_proj); `all-linear` = every linear layer but the output."""
    stages: tuple[str, ...] = ("sft", "rm", "ppo", "dpo")
    """Stages that train with LoRA when r > 0 (of sft, rm, ppo, dpo; pretraining is always full)."""


@dataclass(frozen=True)
class RayConfig:
    enabled: bool = False
    """Run PPO with its models as Ray actors (stages/ppo_ray.py) instead of in one process."""
    address: str = ""
    """Ray cluster to join (`auto` on a node of a running cluster); empty = start Ray on this machine."""
    gpus_per_model: float = 0.0
    """GPUs per actor (policy trainer, value trainer, reward, reference, each rollout worker);
    fractions share a GPU; 0 = CPU. `ray.gpus` sets it per role."""
    gpus: tuple[str, ...] = ()
    """GPUs per actor of a role, as `ROLE=N` entries that override `ray.gpus_per_model` for that role:
    e.g. `['policy=1', 'value=1', 'reward=0.5', 'reference=0.5', 'rollout=0.25']` gives each trainer a
    GPU, puts the two frozen models on one and four rollout workers on another; 0 keeps a role on CPU."""
    rollout_workers: int = 1
    """Actors that sample rollouts, each with a copy of the policy synced after every update."""
    resources: tuple[str, ...] = ()
    """Pin actor roles (policy, value, reward, reference, rollout) to Ray custom resources, as `ROLE=NAME`
    entries: each actor of ROLE asks for one unit of NAME (`ray start --resources='{"NAME": n}'`);
    checked against the cluster before any actor starts (docs/scaling.md)."""
    nodes: tuple[str, ...] = ()
    """Pin actor roles to nodes, as `ROLE=NODE` entries, NODE a node's IP address, host name or node
    id as `ray list nodes` shows them: the role's actors run on that node only (Ray's
    NodeAffinitySchedulingStrategy, not soft). An unknown or ambiguous NODE is an error."""


@dataclass(frozen=True)
class PipelineConfig:
    align: str = "ppo"
    """How the pipeline aligns the SFT model: `ppo` (compare → reward model → the RL stage, `rl.algorithm`,
    and PPO-ptx) or `dpo` (compare → DPO on the rankings: no reward model, no sampling loop)."""
    ptx_coef: float = 1.0
    """γ of the extra PPO-ptx run the pipeline makes to compare the alignment tax with plain PPO
    (used when ppo.ptx_coef is 0); 0 skips that run."""


@dataclass(frozen=True)
class LoopConfig:
    rounds: int = 3
    """Rounds of `cherrytop loop` (serve, collect, rank, retrain, rate, promote); raise it later to continue."""
    chat_prompts: int = 400
    """Training-split prompts the simulated users send to the served policy per round (never held-out ones)."""
    fresh_prompts: int = 300
    """Fresh training prompts queued for ranking per round, after the down-rated and reported ones."""
    heldout_share: float = 0.3
    """Share of the fresh prompts every labeler ranks: the round's held-out pairs (reward-model accuracy on the
    newest policy's answers, labeler agreement), never trained on. 0.3 = 90 prompts, about 1,350 pairs: at 0.1
    (30 prompts) the retrained and the round-1 reward model's accuracies differed by noise."""
    k: int = 0
    """Answers per queued prompt, sampled from the served policy (a rated answer is one of them); 0 = compare.k."""
    labelers: str = "simulated"
    """Who ranks: `simulated` (the built-in world's labelers, through the feedback store's API) or `human`
    (people in `cherrytop label serve` on the round's database; the loop waits until the queue is done)."""
    rm: str = "retrain"
    """The round's reward model: `retrain` from rm.train.init on every round's comparisons so far, or
    `continue` from the last round's reward model on this round's comparisons (rm.epochs passes)."""
    reference: str = "served"
    """The KL reference of a round's policy update: `served`, the policy the round starts from (each round moves
    within its KL budget from there), or a folder or a stage name of the run (`sft`: every round near the SFT
    model). Seed 0, three rounds: `sft` 0.651 / 0.649 / 0.653 win rate vs SFT, `served` 0.653 / 0.661 / 0.661
    (docs/results/loop.md)."""
    episodes: int = 4096
    """PPO episodes of a round's policy update (0 = ppo.episodes). Seed 0, `served`: 4,096 reached a win rate vs
    SFT of 0.657 / 0.667 in rounds 1 / 2, 2,048 0.653 / 0.661."""
    gate_margin: float = 0.0
    """Promotion gate: a round's policy replaces the served one when its arena rating's interval lies wholly
    above the served one's (0), or when its rating is at least this many Elo points higher (> 0)."""
    arena_tasks: int = 5280
    """Held-out tasks every pair of versions battles on (the first 5,280 hold about 5,080 distinct ones): more
    battles, narrower intervals, ±7 Elo points at 1,320, ±3–4 at 5,280, for versions 90 points above SFT; the
    evaluation reads the first eval.n_tasks of them."""
    arena_bootstrap: int = 1000
    """Bootstrap rounds of the arena's 95 % intervals."""
    wait_poll_s: float = 5.0
    """`labelers=human`: seconds between checks of the round's ranking queue."""


@dataclass(frozen=True)
class EvalConfig:
    n_tasks: int = 440
    """Held-out tasks to score (spread evenly over the task kinds)."""
    max_new_tokens: int = 48
    """Most tokens per answer."""
    batch_size: int = 64
    """Prompts decoded together (greedy)."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address `cherrytop serve` listens on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port of the API and the web chat."""
    model_name: str = ""
    """Model id clients send and `/v1/models` lists; empty = the checkpoint folder's name."""
    api_keys: tuple[str, ...] = ()
    """Accepted Bearer API keys (also read from $CHERRYTOP_API_KEYS, comma-separated); none = no auth."""
    forwarded_allow_ips: str = ""
    """Reverse proxies (comma-separated addresses, or $FORWARDED_ALLOW_IPS) whose X-Forwarded-For / -Proto are
    trusted for the client's address; empty = none, so no client can claim another address to dodge the limits."""
    max_batch: int = 16
    """Most sequences generated together in one step (dynamic batching); 1 = one request at a time."""
    max_queue: int = 64
    """Requests that may wait for a batch slot; beyond max_batch + max_queue requests -> HTTP 429."""
    retry_after: int = 1
    """Seconds a 429 answer asks the client to wait (the Retry-After header)."""
    max_tokens: int = 128
    """Tokens generated when a request gives no max_tokens (always cut to the context window)."""
    max_n: int = 8
    """Most choices (`n`) one request may ask for (never more than serve.max_batch: they run in one batch)."""
    policy: str = ""
    """Moderation policy file (TOML or JSON), re-read when it changes; empty = no moderation."""
    moderation_log: str = ""
    """JSONL file every moderation block is appended to; empty = runs/<name>/serve/moderation.jsonl."""
    feedback_db: str = ""
    """Feedback database URL (the feedback app's, `cherrytop label --db`) for the chat page's thumbs and reports;
    empty = $CHERRYTOP_FEEDBACK_DB, else sqlite:///runs/<name>/feedback.db."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted; a larger one gets 413 before it is read."""
    client_share: float = 0.5
    """Share of the max_batch + max_queue slots one client (API key, else address) may hold at once (at least 1)."""
    feedback_per_minute: int = 30
    """Ratings one client (API key, else address) may send per minute; more get 429 with Retry-After."""
    served_records: int = 4096
    """Answers remembered so they can be rated (the newest); rating a forgotten one is a 404."""
    served_max_age_s: int = 3600
    """Seconds after it was served that an answer can still be rated."""
    served_max_chars: int = 64 * 2**20
    """Characters of text (prompts and answers) the remembered answers may hold; past it the oldest are forgotten."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and seed."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The built-in synthetic world."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to train."""
    pretrain: TrainConfig = field(default_factory=_pretrain_defaults)
    """Stage 1: next-token prediction on the corpus."""
    sft: TrainConfig = field(default_factory=_sft_defaults)
    """Stage 3: supervised fine-tuning on demonstrations (loss on assistant tokens only)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sampling for `generate` and `chat`."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """Stage 4: K sampled answers per prompt, ranked by (simulated) labelers."""
    rm: RewardConfig = field(default_factory=RewardConfig)
    """Stage 5: the reward model."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Stage 6: PPO against the reward model with a KL penalty."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Stage 6's algorithm (PPO, GRPO, RLOO, REINFORCE++) and where its KL penalty goes."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Direct preference optimisation on the comparisons (DPO, IPO, SimPO; offline or online rounds)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Scale-out: data parallelism, gradient checkpointing, bf16."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters for SFT, RM and PPO."""
    ray: RayConfig = field(default_factory=RayConfig)
    """PPO placement on Ray actors."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The whole pipeline."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """`cherrytop loop`: rounds of serving, feedback, ranking, retraining, arena ratings and promotion."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`cherrytop serve`: the OpenAI-compatible API, dynamic batching, moderation, web chat."""


RAY_ROLES = ("policy", "value", "reward", "reference", "rollout")
"""PPO's actor roles on Ray: the policy trainer, the value trainer, the reward model, the reference
model and the rollout workers (`ray.resources`, `ray.nodes`)."""


def role_map(entries: tuple[str, ...], where: str) -> dict[str, str]:
    """`ROLE=VALUE` entries (`ray.resources`, `ray.nodes`) as {role: value}; a ConfigError names a
    malformed entry, an unknown role or a role given twice."""
    out: dict[str, str] = {}
    for e in entries:
        role, sep, value = e.partition("=")
        role, value = role.strip(), value.strip()
        if not sep or not role or not value:
            raise ConfigError(f"{where}: expected ROLE=VALUE entries, got '{e}'")
        if role not in RAY_ROLES:
            raise ConfigError(f"{where}: unknown role '{role}'{_suggest(role, list(RAY_ROLES))}")
        if role in out:
            raise ConfigError(f"{where}: role '{role}' given twice ('{out[role]}' and '{value}')")
        out[role] = value
    return out


def role_gpus(rc: RayConfig) -> dict[str, float]:
    """GPUs per actor of every role: `ray.gpus` entries, else `ray.gpus_per_model`; a ConfigError names
    an entry that is not a number of GPUs ≥ 0."""
    out = dict.fromkeys(RAY_ROLES, float(rc.gpus_per_model))
    for role, value in role_map(rc.gpus, "ray.gpus").items():
        try:
            n = float(value)
        except ValueError:
            n = -1.0
        if not n >= 0.0:
            raise ConfigError(f"ray.gpus: expected a number of GPUs ≥ 0 for {role}, got '{value}'")
        out[role] = n
    return out


# Presets: overrides applied on top of the defaults. `tiny` is the embedded default (the demo);
# `test` is a much smaller run for the test suite's smoke runs of the real entry points.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    "test": {
        "run": {"name": "test"},
        "world": {"n_entities": 60, "corpus_chars": 120_000, "n_demonstrations": 300, "n_prompts": 64},
        "tokenizer": {"vocab_size": 700},
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "d_ff": 128, "max_seq_len": 192},
        "pretrain": {"max_steps": 12, "batch_size": 8, "micro_batch_size": 4, "seq_len": 64,
                     "eval_every": 6, "save_every": 6, "log_every": 2, "warmup_steps": 2},
        "sft": {"max_steps": 8, "batch_size": 8, "micro_batch_size": 4, "seq_len": 160,
                "eval_every": 4, "save_every": 4, "log_every": 2, "warmup_steps": 2},
        "eval": {"n_tasks": 22, "max_new_tokens": 16},
        "sample": {"max_new_tokens": 16},
        "compare": {"n_prompts": 24, "k": 4, "edits": 1, "max_new_tokens": 12},
        "rm": {"train": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 4, "eval_every": 2, "save_every": 2,
                         "log_every": 1, "warmup_steps": 1}},
        "ppo": {"episodes": 32, "batch_size": 16, "minibatch_size": 8, "micro_batch_size": 8, "ppo_epochs": 2,
                "max_new_tokens": 10, "save_every": 1},
        "dpo": {"train": {"batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "save_every": 2, "log_every": 1,
                          "warmup_steps": 1}},
        "loop": {"chat_prompts": 24, "fresh_prompts": 16, "heldout_share": 0.25, "episodes": 0, "arena_tasks": 22,
                 "arena_bootstrap": 100},
    },
}


# ---------------------------------------------------------------------------------------------
# Schema introspection: field docstrings and types.

def field_docs(cls: type) -> dict[str, str]:
    """Docstrings under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _build(cls: type, base: Any, data: dict[str, Any], source: str, path: str = "") -> Any:
    """A new `cls` instance: `base` with the (possibly nested) values of `data` applied.

    Errors name the `source` (a file, "command line", a preset) and the setting's dotted `path`."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            what = "section" if cls is Config else "key"
            where = f"{source}: {path}" if path else source
            raise ConfigError(f"{where}: unknown {what} '{key}'{_suggest(key, names)}")
        tp = hints[key]
        sub_path = f"{path}.{key}" if path else key
        sub_where = f"{source}: {sub_path}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{sub_where}: expected a table of settings, got {value!r}")
            changes[key] = _build(tp, getattr(base, key), value, source, sub_path)
        else:
            changes[key] = _coerce(value, tp, sub_where)
    return dataclasses.replace(base, **changes)


def _parse_override(arg: str, nxt: str | None) -> tuple[str, Any, bool]:
    """`--a.b=v` or `--a.b v` -> (dotted key, TOML-parsed value, consumed next arg)."""
    body = arg[2:]
    consumed = False
    if "=" in body:
        key, raw = body.split("=", 1)
    else:
        if nxt is None or nxt.startswith("--"):
            raise ConfigError(f"override '{arg}': expected --section.key=value")
        key, raw, consumed = body, nxt, True
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --run.name=demo
    return key, value, consumed


def _as_given(key: str, value: Any, raw: str) -> Any:
    """A setting that takes a string gets the text as typed (`--run.name=123`, `=nan`, `=true`), not the
    number or boolean TOML reads in it."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in (hints := _field_types(tp)):
            return value  # an unknown key: `_build` names it
        tp = hints[part]
    takes_str = tp is str or str in typing.get_args(tp)
    if not takes_str or isinstance(value, str):
        return value
    try:
        return _coerce(value, tp, key)  # e.g. `int | str`: the number where a number is taken
    except ConfigError:
        return raw


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is a setting, not a section")
        node[parts[-1]] = value
    return out


def load_config(preset: str | None = "tiny", files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults < preset < TOML files < `--section.key=value` overrides; validated, frozen."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'{_suggest(preset, list(PRESETS))}")
        cfg = _build(Config, cfg, PRESETS[preset], f"preset {preset}")
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        cfg = _build(Config, cfg, data, str(p))
    dotted: dict[str, Any] = {}
    args = list(overrides)
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            raise ConfigError(f"unexpected argument '{args[i]}': expected --section.key=value")
        key, value, consumed = _parse_override(args[i], args[i + 1] if i + 1 < len(args) else None)
        if "." not in key:
            raise ConfigError(f"override '--{key}': expected --section.key=value{_suggest(key, [f.name for f in dataclasses.fields(Config)])}")
        dotted[key] = _as_given(key, value, args[i].split("=", 1)[1] if "=" in args[i] else args[i + 1])
        i += 2 if consumed else 1
    if dotted:
        cfg = _build(Config, cfg, _nest(dotted), "command line")
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    """A ConfigError naming the setting `key`, what it takes and the value it got, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate_ppo(p: PPOConfig) -> None:
    """Ranges of the PPO settings: each out-of-range value is one line naming the setting (a NaN fails
    every check)."""
    for name in ("episodes", "batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens",
                 "save_every", "kl_horizon"):
        _check(getattr(p, name) >= 1, f"ppo.{name}", "a whole number >= 1", getattr(p, name))
    if p.ptx_coef > 0:
        _check(p.ptx_batch_size >= 1, "ppo.ptx_batch_size", "a whole number >= 1 when ppo.ptx_coef > 0", p.ptx_batch_size)
    _check(0 < p.temperature < math.inf, "ppo.temperature",
           "a temperature > 0 (log-probs are taken at logits / temperature; greedy rollouts give PPO nothing to learn from)",
           p.temperature)
    for name in ("gamma", "lam"):
        _check(0 <= getattr(p, name) <= 1, f"ppo.{name}", "a number in [0, 1]", getattr(p, name))
    for name in ("clip", "value_clip", "grad_clip"):
        _check(getattr(p, name) > 0, f"ppo.{name}", "a number > 0", getattr(p, name))
    for name in ("kl_coef", "kl_target", "vf_coef", "ptx_coef", "lr", "value_lr"):
        _check(0 <= getattr(p, name) < math.inf, f"ppo.{name}", "a number >= 0", getattr(p, name))
    _check(math.isfinite(p.no_eos_penalty), "ppo.no_eos_penalty", "a finite number", p.no_eos_penalty)
    if p.kl_target > 0:  # the adaptive controller scales β: from 0 it stays 0
        _check(p.kl_coef > 0, "ppo.kl_coef", f"a starting β > 0 with the adaptive KL target ppo.kl_target={p.kl_target} "
               "(the controller multiplies β, so 0 stays 0)", p.kl_coef)


def validate_rl(r: RLConfig, p: PPOConfig) -> None:
    """The `rl` settings, and the batch a critic-free method splits into groups of G answers."""
    _check(r.algorithm in RL_ALGORITHMS, "rl.algorithm", f"one of {', '.join(RL_ALGORITHMS)}", r.algorithm)
    _check(r.kl_estimator in ("auto", "k1", "k2", "k3"), "rl.kl_estimator", "auto, k1, k2 or k3", r.kl_estimator)
    _check(r.kl_in in ("auto", "reward", "loss"), "rl.kl_in", "auto, reward or loss", r.kl_in)
    _check(0 <= r.kl_loss_coef < math.inf, "rl.kl_loss_coef", "a number >= 0", r.kl_loss_coef)
    _check(r.reward in ("model", "function", "both"), "rl.reward", "model, function or both", r.reward)
    module, _, name = r.reward_fn.partition(":")
    _check(r.reward == "model" or all(x.isidentifier() for x in module.split(".") + name.split(".")), "rl.reward_fn",
           f"module:function (e.g. cherrytop.world.reward:graded) with rl.reward={r.reward}", r.reward_fn)
    _check(r.reward != "model" or not r.reward_fn, "rl.reward_fn",
           "empty with rl.reward=model (to use the function, pass --rl.reward=function or --rl.reward=both)", r.reward_fn)
    for key in ("reward_model_weight", "reward_fn_weight"):
        _check(0 < getattr(r, key) < math.inf, f"rl.{key}", "a weight > 0 (rl.reward leaves a part out)", getattr(r, key))
    if r.algorithm in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        _check(r.group_size >= 2, "rl.group_size", f"a whole number >= 2 (answers per prompt) with rl.algorithm={r.algorithm}",
               r.group_size)
        _check(p.batch_size % r.group_size == 0, "ppo.batch_size",
               f"a multiple of rl.group_size ({r.group_size}): each prompt's {r.group_size} answers are one group", p.batch_size)


def validate_loop(c: LoopConfig) -> None:
    """The `loop` settings: each out-of-range value is one line naming the setting."""
    _check(c.rounds >= 1, "loop.rounds", "a number of rounds >= 1", c.rounds)
    _check(c.chat_prompts >= 0, "loop.chat_prompts", "a count >= 0", c.chat_prompts)
    _check(c.fresh_prompts >= 0, "loop.fresh_prompts", "a count >= 0", c.fresh_prompts)
    _check(c.chat_prompts + c.fresh_prompts > 0, "loop.chat_prompts + loop.fresh_prompts", "at least one prompt a round",
           c.chat_prompts + c.fresh_prompts)
    _check(0 <= c.heldout_share < 1, "loop.heldout_share", "a share in [0, 1)", c.heldout_share)
    _check(c.k == 0 or 2 <= c.k <= 9, "loop.k", "0 (compare.k) or 2..9 answers per prompt", c.k)
    _check(c.labelers in ("simulated", "human"), "loop.labelers", "simulated or human", c.labelers)
    _check(c.rm in ("retrain", "continue"), "loop.rm", "retrain or continue", c.rm)
    _check(c.gate_margin >= 0, "loop.gate_margin", "Elo points >= 0", c.gate_margin)
    _check(c.episodes >= 0, "loop.episodes", "0 (ppo.episodes) or a number of episodes", c.episodes)
    _check(c.arena_tasks >= 1, "loop.arena_tasks", "at least 1 held-out task", c.arena_tasks)
    _check(c.arena_bootstrap >= 10, "loop.arena_bootstrap", "at least 10 bootstrap rounds", c.arena_bootstrap)
    _check(c.wait_poll_s > 0, "loop.wait_poll_s", "seconds > 0", c.wait_poll_s)


def validate_dpo(c: DPOConfig) -> None:
    """The `dpo` settings: each out-of-range value is one line naming the setting."""
    _check(c.loss in ("dpo", "ipo", "simpo"), "dpo.loss", "dpo, ipo or simpo", c.loss)
    _check(c.pairs in ("all", "plackett_luce"), "dpo.pairs", "all or plackett_luce", c.pairs)
    _check(c.pairs == "all" or c.loss == "dpo", "dpo.pairs", f"all with dpo.loss={c.loss} (Plackett–Luce is DPO's)", c.pairs)
    for key in ("beta", "simpo_beta"):
        _check(0 < getattr(c, key) < math.inf, f"dpo.{key}", "a number > 0", getattr(c, key))
    _check(0 <= c.label_smoothing < 0.5, "dpo.label_smoothing", "a number in [0, 0.5)", c.label_smoothing)
    for key in ("simpo_gamma", "tie_weight", "epochs"):
        _check(0 <= getattr(c, key) < math.inf, f"dpo.{key}", "a number >= 0", getattr(c, key))
    _check(c.rounds >= 1, "dpo.rounds", "a whole number >= 1 (1 = offline DPO)", c.rounds)
    _check(c.ranker in ("labelers", "reward_model"), "dpo.ranker", "labelers or reward_model", c.ranker)


def validate_decoding(cfg: Config) -> None:
    """Ranges of the `generate` / `chat` (sample.*) and `eval` decoding settings."""
    s, e = cfg.sample, cfg.eval
    _check(0 <= s.temperature < math.inf, "sample.temperature", "a number >= 0 (0 = greedy)", s.temperature)
    for key, value in (("sample.max_new_tokens", s.max_new_tokens), ("sample.batch_size", s.batch_size),
                       ("eval.max_new_tokens", e.max_new_tokens), ("eval.batch_size", e.batch_size),
                       ("eval.n_tasks", e.n_tasks)):
        _check(value >= 1, key, "a whole number >= 1", value)


def validate(cfg: Config) -> None:
    """Cross-field invariants, checked once at load."""
    for stage, t in (("pretrain", cfg.pretrain), ("sft", cfg.sft), ("rm.train", cfg.rm.train), ("dpo.train", cfg.dpo.train)):
        if t.batch_size <= 0 or t.micro_batch_size <= 0:
            raise ConfigError(f"{stage}.batch_size and {stage}.micro_batch_size must be positive")
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(f"{stage}.batch_size ({t.batch_size}) must be a multiple of "
                              f"{stage}.micro_batch_size ({t.micro_batch_size})")
        if t.max_steps <= 0:
            raise ConfigError(f"{stage}.max_steps must be positive, got {t.max_steps}")
        if t.seq_len > cfg.model.max_seq_len and not cfg.model.path:
            raise ConfigError(f"{stage}.seq_len ({t.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    p = cfg.ppo
    validate_ppo(p)
    validate_decoding(cfg)
    if p.batch_size % p.minibatch_size or p.minibatch_size % p.micro_batch_size:
        raise ConfigError(f"ppo.batch_size ({p.batch_size}) must be a multiple of ppo.minibatch_size ({p.minibatch_size}), "
                          f"which must be a multiple of ppo.micro_batch_size ({p.micro_batch_size})")
    if p.episodes < p.batch_size:
        raise ConfigError(f"ppo.episodes ({p.episodes}) must be at least ppo.batch_size ({p.batch_size})")
    validate_rl(cfg.rl, p)
    validate_dpo(cfg.dpo)
    _check(cfg.pipeline.align in ("ppo", "dpo"), "pipeline.align", "ppo or dpo", cfg.pipeline.align)
    validate_loop(cfg.loop)
    if 0 < cfg.loop.episodes < p.batch_size:
        raise ConfigError(f"loop.episodes ({cfg.loop.episodes}) must be 0 (ppo.episodes) or at least ppo.batch_size "
                          f"({p.batch_size})")
    if not 2 <= cfg.compare.k <= 9:
        raise ConfigError(f"compare.k must be in 2..9 (InstructGPT ranks 4..9 answers), got {cfg.compare.k}")
    if not 0 <= cfg.compare.edits < cfg.compare.k:
        raise ConfigError(f"compare.edits must be in 0..k-1 (at least one sampled answer to edit), got "
                          f"{cfg.compare.edits} with compare.k = {cfg.compare.k}")
    bad = [e for e in cfg.compare.edit_kinds if e not in EDIT_KINDS]
    if bad or (cfg.compare.edits and not cfg.compare.edit_kinds):
        raise ConfigError(f"compare.edit_kinds: expected some of {list(EDIT_KINDS)}, got {list(cfg.compare.edit_kinds)}")
    if cfg.model.arch not in ("llama", "gpt2"):
        raise ConfigError(f"model.arch: expected 'llama' or 'gpt2', got '{cfg.model.arch}'")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.d_model ({cfg.model.d_model}) must be divisible by model.n_heads ({cfg.model.n_heads})")
    if not 0.0 <= cfg.ppo.ema < 1.0:
        raise ConfigError(f"ppo.ema: expected a decay in [0, 1), got {cfg.ppo.ema}")
    for name in ("tie_weight", "edit_weight"):
        if not getattr(cfg.rm, name) >= 0:
            raise ConfigError(f"rm.{name}: expected a weight >= 0, got {getattr(cfg.rm, name)}")
    if cfg.rm.ref_loglik not in ("off", "sum", "excess"):
        raise ConfigError(f"rm.ref_loglik: expected 'off', 'sum' or 'excess', got '{cfg.rm.ref_loglik}'")
    role_map(cfg.ray.resources, "ray.resources")
    role_map(cfg.ray.nodes, "ray.nodes")
    role_gpus(cfg.ray)
    if cfg.run.cpu_kernels not in ("avx2", "native"):
        raise ConfigError(f"run.cpu_kernels: expected 'avx2' or 'native', got '{cfg.run.cpu_kernels}'")
    if cfg.ppo.compile_decode not in ("auto", "on", "off"):
        raise ConfigError(f"ppo.compile_decode: expected 'auto', 'on' or 'off', got '{cfg.ppo.compile_decode}'")
    if cfg.dist.frozen_dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"dist.frozen_dtype: expected 'auto', 'bf16' or 'fp32', got '{cfg.dist.frozen_dtype}'")
    if cfg.dist.strategy not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"dist.strategy: expected 'none', 'ddp' or 'fsdp', got '{cfg.dist.strategy}'")
    if cfg.lora.r < 0 or set(cfg.lora.stages) - {"sft", "rm", "ppo", "dpo"}:
        raise ConfigError(f"lora: expected r >= 0 and stages among sft, rm, ppo, dpo; got r={cfg.lora.r}, stages={cfg.lora.stages}")
    if not 0 < cfg.sample.top_p <= 1:
        raise ConfigError(f"sample.top_p must be in (0, 1], got {cfg.sample.top_p}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def from_toml_file(path: str | Path) -> Config:
    """Rebuild a Config saved in a checkpoint (no preset: the file holds every field)."""
    return load_config(preset=None, files=[path])


def describe(inst: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, doc) for every field of a config: the `cherrytop config` listing."""
    rows = []
    docs = field_docs(type(inst))
    for f in dataclasses.fields(inst):
        value = getattr(inst, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += describe(value, key + ".")
        else:
            rows.append((key, repr(value), docs.get(f.name, "")))
    return rows
