"""Memory planner: `cherrytop plan --model DIR --stage ppo --gpus N` says how much GPU memory each
model of a stage needs (parameters, gradients, optimizer state, activations, KV cache) and which
options — LoRA, FSDP, CPU offload, gradient checkpointing — make it fit.

The model is built on the `meta` device from its config.json (no weights read, nothing downloaded),
so parameter counts are exact for any Hugging Face decoder-only transformer (mixture-of-experts
models are refused: the activation and LoRA formulas below are for dense ones). Bytes per element
follow what cherrytop does on GPU: fp32 weights, fp32 gradients and AdamW moments (4 + 4 + 8 = 16 bytes per
trained parameter), the frozen models' weights in `dist.frozen_dtype` (bf16 on GPU by default: 2 bytes
per parameter; `frozen_bytes=4` for fp32), bf16 autocast activations. Activations per token and layer
follow Korthikanti et al. 2022 ("Reducing activation recomputation", §4.1) with SDPA/flash
attention (no T² scores stored): 11h attention (2h input, 2a queries, 4k keys and values, 2a output
projection input, h dropout mask, with a = heads · head dim and k = key/value heads · head dim: less than
11h with grouped-query attention, more for Gemma's wide heads) + 4h norms + the MLP's (3h + 4f, or 2h + 6f gated)
bytes, h = hidden size, f = MLP width; logits add 6 bytes per vocabulary entry (bf16 + fp32 copy).
With gradient checkpointing only each layer's input (2h bytes) is kept, plus one layer recomputed.
The reward and value models are counted with the policy's trunk (a scalar head, no logits).
FSDP shards weights, gradients and optimizer state over the GPUs and gathers ~2 blocks at a time,
for every model of the stage: PPO's frozen reference and reward model are sharded too (weights
only), as stages/ppo.py does (`parallel`); with LoRA the reference is the policy with its adapter
off and costs nothing. CPU offload moves the shards to CPU memory. These are estimates for planning: allow ~10-20 % for
the CUDA context, allocator fragmentation and communication buffers (`headroom`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024 ** 3
STAGES = ("pretrain", "sft", "rm", "ppo")


@dataclass(frozen=True)
class Shape:
    """What the planner needs to know about one model."""
    params: int
    """All parameters."""
    lora_params: int
    """Parameters of rank-1 LoRA on every linear layer but the output (multiply by r)."""
    layers: int
    hidden: int
    ffn: int
    gated: bool
    """SwiGLU-style MLP (gate, up, down) rather than GPT-2's (fc, proj)."""
    vocab: int
    kv_heads: int
    head_dim: int
    heads: int
    """Query heads: the attention's width is heads · head_dim, which need not be the hidden size (Gemma)."""
    block_params: int
    """Parameters of one transformer block (what FSDP gathers at a time)."""


def read_config(path: str | Path) -> dict:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{p}: no config.json; expected a Hugging Face model folder or its config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None


def shape(config: dict) -> Shape:
    """Exact counts from the model built on the meta device (no memory, no download). A config the
    planner cannot model (not a transformer causal LM, a mixture of experts) is a one-line ValueError."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.pytorch_utils import Conv1D
    if not isinstance(config, dict):
        raise ValueError(f"config.json holds a JSON {type(config).__name__}; expected an object (a Hugging Face model config)")
    cfg_dict = dict(config)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type; expected a Hugging Face model config")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json: unknown model_type '{model_type}' (this transformers does not know it)")
    try:
        hf = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise ValueError(f"config.json is not a valid {model_type} config: {str(e).strip().splitlines()[-1].strip()}") from None
    if type(hf) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(hf, "num_attention_heads", None) is None:
        raise ValueError(f"config.json: model_type '{model_type}' is not a transformer causal LM; "
                         "the planner models decoder-only transformers (Llama-, GPT-2-, Qwen-style)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    if any("Expert" in type(m).__name__ for m in model.modules()):
        raise ValueError(f"config.json: '{model_type}' is a mixture-of-experts model; the planner's activation and "
                         "LoRA formulas are for dense models (every token through one MLP)")
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    lora = 0
    for m in model.modules():  # what peft's all-linear adapts: every nn.Linear (subclasses too) and Conv1D
        if m is out_emb:
            continue
        w = getattr(m, "weight", None)
        if isinstance(m, (torch.nn.Linear, Conv1D)) and w is not None and w.dim() == 2:
            lora += w.shape[0] + w.shape[1]  # r·(in + out) with r = 1
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    hidden = hf.hidden_size
    heads = hf.num_attention_heads
    kv = kv_heads(hf)
    ffn = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * hidden
    gated = any(hasattr(getattr(b, "mlp", None), n) for b in blocks for n in ("gate_proj", "gate_up_proj"))  # Phi-3 fuses them
    return Shape(params=params, lora_params=lora, layers=hf.num_hidden_layers, hidden=hidden, ffn=ffn, gated=gated,
                 vocab=hf.vocab_size, kv_heads=kv, head_dim=getattr(hf, "head_dim", None) or hidden // heads, heads=heads,
                 block_params=sum(p.numel() for p in blocks[0].parameters()) if blocks else params // max(1, hf.num_hidden_layers))


def kv_heads(hf) -> int:
    """Key/value heads as the attention layers build them: `num_key_value_heads` (Llama, Qwen, GPT-BigCode),
    Falcon's `num_kv_heads` only with its new decoder architecture, one for multi-query attention
    (Falcon-7B), else one per query head (GPT-2)."""
    kv = getattr(hf, "num_key_value_heads", None)
    if kv is None and getattr(hf, "new_decoder_architecture", False):
        kv = getattr(hf, "num_kv_heads", None)
    elif kv is None and getattr(hf, "multi_query", False):
        kv = 1
    return kv or hf.num_attention_heads


@dataclass(frozen=True)
class Workload:
    """Per-GPU batch and lengths."""
    micro_batch: int = 4
    """Sequences per forward/backward on one GPU."""
    seq_len: int = 1024
    """Tokens per training sequence (PPO: prompt + response)."""
    rollout_batch: int = 16
    """PPO: sequences generated together on one GPU (KV cache)."""
    lora_r: int = 16
    """Rank used when LoRA is an option."""


@dataclass(frozen=True)
class Options:
    lora: bool = False
    fsdp: bool = False
    offload: bool = False
    grad_checkpointing: bool = False

    def label(self, gpus: int = 2) -> str:
        on = [n for n, v in (("LoRA", self.lora), ("FSDP", self.fsdp), ("offload", self.offload),
                             ("grad-ckpt", self.grad_checkpointing)) if v]
        if on:
            return " + ".join(on)
        return "plain DDP (full copy per GPU)" if gpus > 1 else "plain (full fine-tuning on one GPU)"


@dataclass
class ModelMemory:
    """Bytes per GPU for one model of the stage."""
    role: str
    trained: bool
    params: int
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    cpu: float = 0.0
    """Bytes moved to CPU memory by offload (per GPU)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache


@dataclass
class Plan:
    stage: str
    gpus: int
    gpu_bytes: float
    options: Options
    models: list[ModelMemory] = field(default_factory=list)
    cpu_node_bytes: float = float("inf")
    """CPU memory of one node (offload must fit there for the node's GPUs)."""
    gpus_per_node: int = 8

    @property
    def total(self) -> float:
        return sum(m.total for m in self.models)

    @property
    def cpu_per_node(self) -> float:
        return sum(m.cpu for m in self.models) * min(self.gpus, self.gpus_per_node)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes and self.cpu_per_node <= self.cpu_node_bytes


def activation_bytes_per_token(s: Shape, trained: bool, checkpointing: bool, lm: bool) -> float:
    """Activation bytes per token of one forward pass: stored for the backward pass when `trained`
    (all layers, or only layer inputs + one recomputed layer with checkpointing), else only one
    layer's worth at a time; plus the logits for a language model (not for a scalar head)."""
    h, f = s.hidden, s.ffn
    a, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim  # attention width, key/value width
    mlp = 2 * h + 6 * f if s.gated else 3 * h + 4 * f
    attention = 2 * h + 2 * a + 4 * kv + 2 * a + h  # input, q, k and v, the output projection's input, dropout mask: 11h when a = kv = h
    per_layer = attention + 4 * h + mlp
    logits = 6 * s.vocab if lm else 0
    if not trained:
        return per_layer + logits
    if checkpointing:
        return s.layers * 2 * h + per_layer + logits
    return s.layers * per_layer + logits


def roles(stage: str, critic: bool = True) -> list[tuple[str, bool, bool]]:
    """(role, trained, generates) of the models a stage holds; PPO's value model only with a `critic`
    (`--rl.algorithm=ppo`; the critic-free methods load none)."""
    if stage == "ppo":
        return [("policy", True, True), ("reference", False, False), ("reward", False, False)] + (
            [("value", True, False)] if critic else [])
    return [("reward" if stage == "rm" else "model", True, False)]


def plan(s: Shape, stage: str, gpus: int, gpu_gib: float, opts: Options, w: Workload = Workload(),
         cpu_node_gib: float = float("inf"), gpus_per_node: int = 8, frozen_bytes: int = 2, critic: bool = True) -> Plan:
    """Bytes per GPU of each model of `stage` with options `opts`; `frozen_bytes` per weight of the
    models that are not trained (PPO's reference and reward model: 2 in bf16, 4 in fp32); `critic`:
    PPO holds a value model (False for the critic-free algorithms)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; expected one of {', '.join(STAGES)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    out = Plan(stage, gpus, gpu_gib * GiB, opts, cpu_node_bytes=cpu_node_gib * GiB, gpus_per_node=gpus_per_node)
    shard = gpus if opts.fsdp else 1
    tokens = w.micro_batch * w.seq_len
    for role, trained, generates in roles(stage, critic):
        lora_here = opts.lora and trained and stage != "pretrain"
        if role == "reference" and opts.lora:
            continue  # the policy with its adapter off: no memory of its own
        m = ModelMemory(role, trained, s.params)
        trainable = s.lora_params * w.lora_r if lora_here else (s.params if trained else 0)
        wb = 4 if trained else frozen_bytes  # bytes per weight
        m.weights = wb * s.params / shard + (wb * 2 * s.block_params if opts.fsdp else 0)  # + ~2 gathered blocks
        if lora_here:
            m.weights += 4 * trainable / shard
        m.grads = 4 * trainable / shard
        m.optimizer = 8 * trainable / shard
        if opts.offload and opts.fsdp:
            m.cpu = m.weights - wb * 2 * s.block_params + m.grads + m.optimizer
            m.weights, m.grads, m.optimizer = wb * 2 * s.block_params, 0.0, 0.0
        lm = role in ("model", "policy", "reference")
        m.activations = activation_bytes_per_token(s, trained, opts.grad_checkpointing, lm) * tokens
        if generates:  # k and v, bf16, every layer, the whole rollout batch at full length
            m.kv_cache = 2 * 2 * s.layers * s.kv_heads * s.head_dim * w.seq_len * w.rollout_batch
        out.models.append(m)
    return out


def all_options(stage: str) -> list[Options]:
    """Every combination, cheapest first: full fine-tuning before LoRA, no offload before offload,
    no recomputation before gradient checkpointing."""
    combos = []
    for lora, fsdp, offload, gc in itertools.product((False, True), repeat=4):
        if offload and not fsdp or lora and stage == "pretrain":
            continue
        combos.append(Options(lora, fsdp, offload, gc))
    return sorted(combos, key=lambda o: (o.offload, o.lora, o.grad_checkpointing, o.fsdp))


def gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def report(path: str | Path, stage: str, gpus: int, gpu_gib: float = 80.0, w: Workload = Workload(),
           headroom: float = 0.9, cpu_node_gib: float = 1024.0, gpus_per_node: int = 8, frozen_bytes: int = 2,
           critic: bool = True) -> str:
    """The printed plan: the model, the first option set that fits (with its breakdown per model),
    and every option set with its per-GPU total; `critic`: as `plan`."""
    s = shape(read_config(path))
    usable = gpu_gib * headroom
    plans = [plan(s, stage, gpus, usable, o, w, cpu_node_gib * headroom, gpus_per_node, frozen_bytes, critic)
             for o in all_options(stage)]
    lines = [f"model {path}: {s.params / 1e9:.3f}B parameters, {s.layers} layers, hidden {s.hidden}, "
             f"vocab {s.vocab}; LoRA r={w.lora_r}: {s.lora_params * w.lora_r / 1e6:.1f}M trainable",
             f"stage {stage} on {gpus} GPU(s) of {gpu_gib:g} GiB ({headroom:.0%} usable = {usable:.1f} GiB); "
             f"micro-batch {w.micro_batch} x {w.seq_len} tokens" + (f", rollout batch {w.rollout_batch}" if stage == "ppo" else "")
             + f"; offload may use {cpu_node_gib * headroom:.0f} GiB of CPU memory per node of {min(gpus, gpus_per_node)} GPUs"
             + (f"; frozen models in {'bf16' if frozen_bytes == 2 else 'fp32'}" if stage == "ppo" else "")
             + ("; no value model (critic-free --rl.algorithm)" if stage == "ppo" and not critic else ""),
             ""]
    best = next((p for p in plans if p.fits), None)
    shown = best or min(plans, key=lambda p: p.total)
    lines.append(("fits with: " if best else "does NOT fit; closest: ") + shown.options.label(gpus))
    lines.append(f"{'model':<10} {'params(B)':>9} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'KV':>8} {'total':>8} GiB/GPU"
                 + ("   CPU GiB/GPU" if shown.options.offload else ""))
    for m in shown.models:
        lines.append(f"{m.role:<10} {m.params / 1e9:9.3f} {gib(m.weights)} {gib(m.grads)} {gib(m.optimizer)} "
                     f"{gib(m.activations)} {gib(m.kv_cache)} {gib(m.total)}" + (f"   {gib(m.cpu)}" if shown.options.offload else ""))
    lines.append(f"{'all':<10} {'':>9} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} {gib(shown.total)}"
                 + (f"   {gib(shown.cpu_per_node)} CPU GiB per node" if shown.options.offload else ""))
    lines += ["", "every option set (GiB per GPU):"]
    for p in plans:
        cpu = f"  (CPU {p.cpu_per_node / GiB:.0f} GiB per node)" if p.options.offload else ""
        lines.append(f"  {'fits ' if p.fits else 'no   '} {gib(p.total)}  {p.options.label(gpus)}{cpu}")
    return "\n".join(lines)
