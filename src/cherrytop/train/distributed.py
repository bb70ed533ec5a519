"""Data parallelism on torch.distributed: process-group setup from `torchrun`'s environment, DDP and
FSDP2 (`fully_shard`) wrapping, rank-aware batch sharding, rank-0-only logging, and sharded
checkpoints (torch.distributed.checkpoint) that resume on any number of processes and convert to a
plain Hugging Face folder.

How a step stays the single-process step: every rank builds the same global batch (the data order
depends only on the step), takes its share of the micro-batches (`shard`) and back-propagates
`world · loss_sum / global_count`; DDP and FSDP average gradients over the ranks, so the gradient is
that of the global token mean, exactly as one process computes it.

Launch (one node, 8 GPUs):   torchrun --nproc_per_node 8 -m cherrytop.cli sft --dist.strategy=fsdp
Several nodes: the same on each node with --nnodes N --node_rank i --rdzv_endpoint HOST:PORT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cherrytop import losses as L
from cherrytop.config import DistConfig

SHARDS = "shards"
"""Folder of a checkpoint that holds the torch.distributed.checkpoint shards (model + optimizer)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""
    rank: int
    """Global rank (0 .. world-1)."""
    world: int
    """Number of processes."""
    local_rank: int
    """Rank on this node: the GPU index."""
    device: torch.device
    """Where this rank's models live: cuda:local_rank when there is a GPU (one process included), else cpu."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, prints and writes files."""
        return self.rank == 0


SOLO = Dist(0, 1, 0, torch.device("cpu"))
"""One process on the CPU, whatever process group may be running (a single-process reference)."""


def current() -> Dist:
    """The running job as torch.distributed (or its absence) describes it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return Dist(rank, world, local, device)


def setup(cfg: DistConfig) -> Dist:
    """Join the process group `torchrun` describes (WORLD_SIZE, RANK, MASTER_ADDR...); a plain
    single process stays as it is. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if cfg.strategy == "none":
            raise ValueError(f"started with {world} processes but dist.strategy is 'none'; "
                             "pass --dist.strategy=ddp or --dist.strategy=fsdp")
        backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return current()



def teardown(clean: bool = True, wait_s: float = 10.0) -> None:
    """Leave the process group, if one is running, while the interpreter is whole: every rank first
    meets the others, so none closes its gloo / NCCL connections under a rank still using them (a rank
    that does, or that reaches interpreter shutdown holding a group, can abort with "terminate called
    without an active exception"). After a clean run (`clean`) the meeting is a barrier; after an
    error, which the other ranks may not share, it is a count in the job's store that waits at most
    `wait_s` seconds for them."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    else:
        _meet(wait_s)
    dist.destroy_process_group()


def _meet(wait_s: float) -> None:
    """Wait up to `wait_s` seconds until every rank has arrived here (no collective: a rank stuck in
    one, or gone, only costs the wait)."""
    try:
        store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        arrived, end = store.add("cherrytop/teardown", 1), time.monotonic() + wait_s
        while arrived < world and time.monotonic() < end:
            time.sleep(0.05)
            arrived = store.add("cherrytop/teardown", 0)
    except (RuntimeError, OSError):  # the store's host (rank 0) already left: nobody to wait for
        pass


def shard(items: list, d: Dist) -> list:
    """This rank's share of a step's micro-batches (every rank gets as many; rank r takes r, r+W, ...)."""
    if len(items) % d.world:
        raise ValueError(f"{len(items)} micro-batches per step cannot be split over {d.world} processes; "
                         "make batch_size / micro_batch_size a multiple of the number of processes")
    return items[d.rank:: d.world]


def all_sum(x: float, d: Dist) -> float:
    """Sum of a number over the ranks (the number itself in one process)."""
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t)


def all_true(flag: bool, d: Dist) -> bool:
    """Whether `flag` holds on every rank (`flag` itself in one process)."""
    return flag if d.world == 1 else all_sum(float(flag), d) == d.world


def all_max(x: int, d: Dist) -> int:
    """The largest of an integer over the ranks."""
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.long, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_cat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's `x` (the same shape on each) concatenated along dim 0 in rank order."""
    if d.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(stats: dict[str, float], d: Dist) -> dict[str, float]:
    """Per-rank means over equally many items each -> the means over all of them (unchanged in one process)."""
    if d.world == 1:
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return dict(zip(stats, (t / d.world).tolist()))


# ---------------------------------------------------------------------------------------------
# Masked statistics over the union of every rank's batch (losses.masked_* in one process).

def masked_mean(x: torch.Tensor, mask: torch.Tensor, d: Dist) -> torch.Tensor:
    """Σ mask·x / Σ mask over every rank's valid positions: `losses.masked_mean` of the ranks'
    batches concatenated (the sum and the count are all-reduced). 0-d tensor."""
    if d.world == 1:
        return L.masked_mean(x, mask)
    m = mask.bool()
    t = torch.stack([torch.where(m, x, 0.0).sum().double(), m.sum().double()])  # (2,) sum, count
    dist.all_reduce(t)
    return (t[0] / t[1].clamp_min(1)).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, d: Dist) -> torch.Tensor:
    """Population variance over every rank's valid positions (`losses.masked_var`, two passes)."""
    return L.masked_var(x, mask, mean=lambda y, m: masked_mean(y, m, d))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, d: Dist, shift_mean: bool = True) -> torch.Tensor:
    """`losses.masked_whiten` with the mean and variance of every rank's batch: each rank whitens its
    own rows as one process would whiten the concatenated batch."""
    return L.masked_whiten(x, mask, shift_mean, mean=lambda y, m: masked_mean(y, m, d),
                           var=lambda y, m: masked_var(y, m, d))


def to_device(batch: dict, d: Dist) -> dict:
    """A micro-batch on this rank's device (unchanged on CPU)."""
    if d.device.type == "cpu":
        return batch
    return {k: v.to(d.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class NoLog:
    """The metrics log of ranks other than 0: they log nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


class Forward(torch.nn.Module):
    """The module DDP / FSDP wrap: `forward(fn, batch) = fn(model, batch)`, so a stage's loss (which
    may read a submodule such as the reward model's trunk) runs inside the wrapper's forward, where
    DDP arms its gradient hooks and FSDP gathers the root parameters."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, batch):
        return fn(self.model, batch)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the classes HF names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # unknown architecture: every ModuleList's children
        blocks = [c for m in model.modules() if isinstance(m, torch.nn.ModuleList) for c in m]
    return blocks


def wrap(model: torch.nn.Module, cfg: DistConfig, d: Dist) -> torch.nn.Module:
    """`Forward(model)` wrapped for the strategy: DDP, FSDP2 (each block, then the root), or nothing
    in a single process. The model is changed in place (FSDP shards its parameters), so optimizers
    are made after this."""
    if d.device.type != "cpu":
        model.to(d.device)
    fwd = Forward(model)
    if d.world == 1 or cfg.strategy == "none":
        return fwd
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(fwd, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.bf16 and d.device.type == "cuda" else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
    for block in _blocks(model):
        fully_shard(block, **kw)
    fully_shard(fwd, **kw)
    return fwd


@contextlib.contextmanager
def no_grad_sync(wrapped: torch.nn.Module, skip: bool):
    """Accumulate gradients locally (no communication) while `skip`; sync on the last micro-batch."""
    if not skip:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(wrapped: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(wrapped, FSDPModule)


def full_norm(gnorm: torch.Tensor) -> float:
    """A gradient norm as a number (FSDP's is a DTensor)."""
    from torch.distributed.tensor import DTensor
    return float(gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints.

def has_shards(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDS / ".metadata").is_file()


def save_sharded(final: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, tokenizer: Any, cfg,
                 state: dict | None, full: bool, d: Dist, tensors: dict[str, dict] | None = None,
                 extra: Callable[[Path], None] | None = None) -> None:
    """Every rank writes its shards of model + optimizer (+ `tensors`, more named state dicts whose
    tensors may be sharded, such as PPO's live policy weights); rank 0 adds the HF config, tokenizer,
    cherrytop.toml and trainer state, and (when `full`) the gathered weights as a plain HF folder,
    then runs `extra(folder)` (e.g. moving a second model in). The folder is swapped in atomically
    like every checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from cherrytop.model import lora
    from cherrytop.train.checkpoint import save_checkpoint
    final = Path(final)
    staging = final.with_name(f".{final.name}.shards-tmp")
    if d.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(d)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, **(tensors or {})}, checkpoint_id=str(staging / SHARDS))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) if full else None
    if weights is not None and getattr(model.config, "tie_word_embeddings", False):  # gathered as two copies
        out_emb = model.get_output_embeddings()
        weights.pop(next((f"{n}.weight" for n, m in model.named_modules() if m is out_emb), ""), None)
    if d.main:
        class Writer:  # what save_checkpoint calls save_pretrained on
            def save_pretrained(self, out: Path) -> None:
                if weights is not None:
                    lora.save_merged(model, out, weights)
                else:  # shards only: the config (and the adapter's, for `convert_to_hf` to merge)
                    model.config.save_pretrained(out)
                    if lora.is_lora(model):
                        lora.write_adapter_config(model, out)
                os.replace(staging / SHARDS, Path(out) / SHARDS)
        save_checkpoint(final, Writer(), tokenizer, cfg, state, extra)
        shutil.rmtree(staging, ignore_errors=True)
    barrier(d)


def load_sharded(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                 tensors: dict[str, dict] | None = None) -> None:
    """Load shards written by `save_sharded` into `model` (sharded or not, on any number of
    processes: torch.distributed.checkpoint reshards), if given the optimizer, and the `tensors`
    saved with them (loaded in place into the given tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt if opt is not None else [])
    state = {"model": msd, "optim": osd} if opt is not None else {"model": msd}
    dcp.load({**state, **(tensors or {})}, checkpoint_id=str(Path(ckpt) / SHARDS))
    set_state_dict(model, opt if opt is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def convert_to_hf(ckpt: Path, out: Path) -> Path:
    """A plain Hugging Face folder (config, weights, tokenizer, cherrytop.toml) from a sharded
    checkpoint, in one process without a process group: the model shards are read whole, the
    optimizer shards are not read. LoRA adapters in the shards are merged."""
    import transformers
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from cherrytop.model import lora
    ckpt, out = Path(ckpt), Path(out)
    if not has_shards(ckpt):
        raise FileNotFoundError(f"{ckpt}: no sharded checkpoint (expected {ckpt / SHARDS}/.metadata)")
    hf_cfg = transformers.AutoConfig.from_pretrained(str(ckpt))
    meta = FileSystemReader(str(ckpt / SHARDS)).read_metadata().state_dict_metadata
    sd = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith("model.") and hasattr(m, "size")}
    with warnings.catch_warnings():  # one process without a process group is the intent here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp_load({"model": sd}, checkpoint_id=str(ckpt / SHARDS))
    arch = (hf_cfg.architectures or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch)
    with torch.device("meta"):
        skeleton = cls(hf_cfg)
    sd = lora.merge_state_dict(sd, ckpt / lora.ADAPTER) if any(".lora_A." in k for k in sd) else sd
    skeleton.save_pretrained(out, state_dict=sd)
    for f in ckpt.iterdir():  # tokenizer files, generation config, cherrytop.toml
        if f.is_file() and f.name not in ("config.json", "trainer_state.pt") and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out
