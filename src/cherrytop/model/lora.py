"""LoRA adapters (peft, through transformers' adapter integration), gradient checkpointing and bf16
autocast for the training stages.

With `--lora.r=R` the SFT, RM and PPO models get rank-R adapters on every linear layer (or
`lora.targets`) of a frozen base; scalar heads (`score`) stay fully trainable. The model keeps its
Hugging Face class, so the stages and losses do not change. The PPO reference model is the policy
with its adapter disabled (`Reference`): the frozen base is exactly the SFT model, at no extra
memory. Checkpoints hold the merged model (a plain HF folder every later stage and `serve` loads)
plus `adapter/` (peft format: `PeftModel.from_pretrained(base, ckpt/"adapter")`, heads as
`modules_to_save`), which resume reads. A MoE model's stacked experts (peft's ParamWrapper) merge too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
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
    _check_mergeable(model)
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

def _check_mergeable(model) -> None:
    """Checkpoints hold the merged model, which `merge_state_dict` computes for adapted linear layers
    (GPT-2's Conv1D included) and adapted parameters (peft's ParamWrapper: a MoE model's stacked
    experts and router, which peft targets for `all-linear`); refuse any other adapted layer before
    training rather than fail when saving."""
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and not isinstance(mod, (Linear, ParamWrapper)):
            raise ValueError(f"lora.targets: {name} ({type(mod.get_base_layer()).__name__}) cannot be merged into the "
                             "checkpoint; LoRA adapts linear layers (and a MoE model's experts) only")


def _adapter_meta(model) -> dict:
    """What merging needs to know per adapted module: scaling, the parameter adapted and its layout."""
    from peft.tuners.lora import LoraLayer, ParamWrapper
    meta = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            m = {"scaling": float(mod.scaling["default"]), "fan_in_fan_out": bool(getattr(mod, "fan_in_fan_out", False))}
            if isinstance(mod, ParamWrapper):  # a parameter of its base module, (out, in) or stacked (experts, ., .)
                m |= {"param": mod.parameter_name, "experts": mod.num_experts, "out_first": mod._did_swap_in_out_features}
            meta[name] = m
    return meta


def _delta(a: torch.Tensor, b: torch.Tensor, m: dict) -> torch.Tensor:
    """B A of one adapted module in its weight's layout (peft's get_delta_weight), before scaling."""
    e = m.get("experts", 1)
    if e == 1:
        d = b @ a  # (out, r) @ (r, in) -> (out, in)
        return d.T if m["fan_in_fan_out"] else d  # GPT-2's Conv1D stores (in, out)
    a = a.reshape(e, -1, a.shape[-1])  # (E·r, in) -> (E, r, in)
    b = b.reshape(b.shape[0], -1, e)  # (out, E·r) -> (out, r, E)
    return torch.einsum("ore,eri->eoi" if m["out_first"] else "ore,eri->eio", b, a)  # (E, out, in) or (E, in, out)


def _unwrapped(key: str) -> str:
    """The plain model's name of an adapted model's tensor: every peft `.base_layer` level dropped
    (`experts.base_layer.base_layer.down_proj` -> `experts.down_proj`)."""
    return re.sub(r"\.base_layer(?=\.)", "", key)


def merge_state_dict(sd: dict[str, torch.Tensor], meta: dict | Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted one: W + scaling · B A per adapted module (per
    expert for stacked experts), adapter tensors dropped. `meta` is `_adapter_meta(model)` or an
    adapter folder written by `save_merged`."""
    if isinstance(meta, Path):
        meta = json.loads((meta / "cherrytop_merge.json").read_text())
    out = {_unwrapped(k): v for k, v in sd.items() if ".lora_" not in k}
    for mod, m in meta.items():
        key = _unwrapped(f"{mod}.{m.get('param', 'weight')}")
        a = sd[f"{mod}.lora_A.default.weight"].float()  # (r, in)
        b = sd[f"{mod}.lora_B.default.weight"].float()  # (out, r)
        w = out[key]
        # merged on the weights' device, kept on the CPU: saving a GPU model does not hold a second copy there
        out[key] = (w + (_delta(a, b, m) * m["scaling"]).to(w.dtype)).cpu()
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
    heads = set(_heads(model))  # saved whole, as peft saves `modules_to_save`
    lora = {f"base_model.model.{k.replace('.default.', '.')}": v.detach().contiguous().cpu() for k, v in sd.items()
            if ".lora_" in k or k in heads}
    save_file(lora, str(out / ADAPTER / "adapter_model.safetensors"))


def _heads(model) -> list[str]:
    """The trainable parameters outside the adapters: a reward or value model's `score` head."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]


def write_adapter_config(model, out: Path) -> None:
    """`out/adapter/`: peft's adapter_config.json (the heads as `modules_to_save`, so that peft's
    loader gives the trained head too) and what merging needs (scaling, layout per module)."""
    (Path(out) / ADAPTER).mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config["default"])
    config.modules_to_save = sorted({n.rsplit(".", 1)[0] for n in _heads(model)}) or None
    config.save_pretrained(Path(out) / ADAPTER)
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
    heads = _heads(model)
    if heads:
        weights = {}
        for w in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(str(w)))
        new.update({n: weights[n] for n in heads if n in weights})
    missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(new)
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks trainable tensors {sorted(missing)[:3]}")
    model.load_state_dict(new, strict=False)
