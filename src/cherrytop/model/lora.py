"""LoRA adapters (peft, through transformers' adapter integration), gradient checkpointing and bf16
autocast for the training stages.

With `--lora.r=R` the SFT, RM and PPO models get rank-R adapters on every linear layer (or
`lora.targets`) of a frozen base; scalar heads (`score`) stay fully trainable. The model keeps its
Hugging Face class, so the stages and losses do not change. The PPO reference model is the policy
with its adapter disabled (`Reference`): the frozen base is exactly the SFT model, at no extra
memory. Checkpoints hold the merged model (a plain HF folder every later stage and `serve` loads)
plus `adapter/` (peft format: `PeftModel.from_pretrained(base, ckpt/"adapter")`), which resume reads.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cherrytop.config import Config

ADAPTER = "adapter"
"""Sub-folder of a checkpoint with the LoRA adapter in peft's format."""


def enabled(cfg: Config, stage: str) -> bool:
    return cfg.lora.r > 0 and stage in cfg.lora.stages


def is_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def attach(model, cfg: Config, heads: tuple[str, ...] = ()) -> torch.nn.Module:
    """Inject rank-r LoRA adapters (in place); only the adapters and `heads` stay trainable."""
    from peft import LoraConfig
    lc = cfg.lora
    targets = "all-linear" if tuple(lc.targets) == ("all-linear",) else list(lc.targets)
    with torch.random.fork_rng():  # the adapters' init: reproducible and the same in every process (FSDP)
        torch.manual_seed(cfg.run.seed)
        model.add_adapter(LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                                     exclude_modules=list(heads) or None))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.split(".")[0] in heads)
    return model


def prepare(model, cfg: Config, stage: str, heads: tuple[str, ...] = ()) -> torch.nn.Module:
    """The stage's model with LoRA (if enabled for it) and gradient checkpointing (if asked)."""
    if enabled(cfg, stage):
        attach(model, cfg, heads)
    if cfg.dist.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


@contextlib.contextmanager
def adapter_disabled(model):
    """Run the frozen base: every LoRA branch off (bit-exact base outputs)."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class Reference:
    """The PPO reference model: the policy with its adapter disabled (the SFT model, no copy)."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kw):
        with adapter_disabled(self.policy):
            return self.policy(*args, **kw)

    def eval(self) -> "Reference":
        return self

    def requires_grad_(self, _: bool = False) -> "Reference":
        return self


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on GPU; nothing on CPU (fp32 there, bit-for-bit as without it)."""
    if bf16 and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Merging and saving.

def _adapter_meta(model) -> dict:
    """What merging needs to know per adapted module: scaling and weight layout."""
    from peft.tuners.lora import LoraLayer
    meta = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            meta[name] = {"scaling": float(mod.scaling["default"]), "fan_in_fan_out": bool(getattr(mod, "fan_in_fan_out", False))}
    return meta


def merge_state_dict(sd: dict[str, torch.Tensor], meta: dict | Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted one: W + scaling · B A per adapted module
    (transposed for GPT-2's Conv1D), adapter tensors dropped. `meta` is `_adapter_meta(model)` or
    an adapter folder written by `save_merged`."""
    if isinstance(meta, Path):
        meta = json.loads((meta / "cherrytop_merge.json").read_text())
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            mod, leaf = k.split(".base_layer.")
            k = f"{mod}.{leaf}"
            if leaf == "weight" and mod in meta:
                a = sd[f"{mod}.lora_A.default.weight"].float()  # (r, in)
                b = sd[f"{mod}.lora_B.default.weight"].float()  # (out, r)
                delta = (b @ a) * meta[mod]["scaling"]  # (out, in)
                # merged on the weights' device, kept on the CPU: saving a GPU model does not hold a second copy there
                v = (v + (delta.T if meta[mod]["fan_in_fan_out"] else delta).to(v.dtype)).cpu()
        out[k] = v
    return out


def save_merged(model, out: Path, sd: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained(out)` for any model: an adapted one is written merged (plain HF
    folder) with its adapter in `out/adapter/`. `sd` = the full state dict if already gathered."""
    out = Path(out)
    if not is_lora(model):
        model.save_pretrained(out, state_dict=sd)
        return
    sd = sd if sd is not None else model.state_dict()
    meta = _adapter_meta(model)
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = model.generation_config
    skeleton.save_pretrained(out, state_dict=merge_state_dict(sd, meta))
    write_adapter_config(model, out)
    lora = {f"base_model.model.{k.replace('.default.', '.')}": v.detach().contiguous().cpu() for k, v in sd.items() if ".lora_" in k}
    save_file(lora, str(out / ADAPTER / "adapter_model.safetensors"))


def write_adapter_config(model, out: Path) -> None:
    """`out/adapter/`: peft's adapter_config.json and what merging needs (scaling, layout per module)."""
    (Path(out) / ADAPTER).mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(Path(out) / ADAPTER)
    (Path(out) / ADAPTER / "cherrytop_merge.json").write_text(json.dumps(_adapter_meta(model)))


class Saveable:
    """Hands `save_merged` to code that calls `save_pretrained` (the loop, PPO checkpoints)."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, out) -> None:
        save_merged(self.model, Path(out))


def saveable(model):
    """The model itself, or (adapted) an object whose save_pretrained writes it merged + adapter."""
    return Saveable(model) if is_lora(model) else model


def load_adapter(model, ckpt: Path) -> None:
    """Resume an adapted model from a checkpoint written by `save_merged`: the adapter from
    `adapter/`, the other trainable parameters (heads) from the merged weights."""
    ckpt = Path(ckpt)
    f = ckpt / ADAPTER / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{ckpt}: no LoRA adapter to resume (expected {f}); pass --fresh or drop --lora.r")
    saved = load_file(str(f))
    own = model.state_dict()
    new = {}
    for k, v in saved.items():
        name = k[len("base_model.model."):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if name not in own:
            raise ValueError(f"{f}: adapter tensor {name} does not fit this model (other lora.targets?)")
        new[name] = v
    heads = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if heads:
        weights = {}
        for w in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(str(w)))
        new.update({n: weights[n] for n in heads if n in weights})
    missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(new)
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks trainable tensors {sorted(missing)[:3]}")
    model.load_state_dict(new, strict=False)
