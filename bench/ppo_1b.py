"""A 1B-parameter LoRA PPO step through `cherrytop ppo`'s real entry point, with the memory of each
model measured and set beside the planner's numbers (`cherrytop plan`) for the same workload.

The model is a random-weight Llama of TinyLlama's shape (hidden 2048, MLP 5632, 32 query / 4 key-value
heads) with 24 layers and the benchmark tokenizer's vocabulary (1536), 1.06B parameters, written to
`bench/out/llama-1b/` with a reward model made from it (the trunk and a scalar head). One PPO
iteration: policy and value model with rank-16 LoRA adapters, the reference = the policy with its
adapter off, the reward model frozen in `dist.frozen_dtype`.

    .venv/bin/python bench/ppo_1b.py                       # CPU: fp32 everywhere (frozen_dtype auto)
    .venv/bin/python bench/ppo_1b.py --batch 16 --new 64   # on a GPU: bf16 frozen models, CUDA memory

Prints one `RESULT {json}` line: seconds of the rollout, the update and the save; per model the
bytes of its weights (trainable and frozen), gradients and optimizer state as measured on the live
objects after the step (gradients are freed by then: the planner counts them during the step); the
process's memory right after the update, its peak before the final save and its peak overall (the
save merges the adapters into a copy of the policy) — CUDA memory allocated on a GPU, resident set
size on CPU; and the planner's per-model breakdown for the same micro-batch, sequence length (64
prompt tokens + the sampled ones), rollout batch and LoRA rank.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def make_model(folder: Path) -> tuple[Path, Path]:
    """The 1B policy (with the benchmark tokenizer and chat template) and its reward model, written once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.heads import scalar_model_from
    policy, rm = folder / "policy", folder / "rm"
    if (rm / "config.json").is_file():
        return policy, rm
    ensure_data()
    tok = load_tokenizer(OUT / "model")
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    del model
    scalar_model_from(policy, tok.pad_token_id).save_pretrained(rm)
    tok.save_pretrained(rm)
    return policy, rm


def ensure_data() -> None:
    """The benchmark's shared inputs (tokenizer, prompts), built by make_data.py as compare.py does."""
    if not (OUT / "prompts.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "make_data.py")], check=True)


def rss() -> int:
    """Memory the process holds now: CUDA memory allocated on a GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024


def peak() -> int:
    """The most memory the process has held so far (CUDA peak allocated on a GPU, peak RSS on CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_of(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """Bytes of a model's trainable and frozen weights, its gradients and its optimizer state."""
    params = list(model.parameters())
    out = {"params": sum(q.numel() for q in params),
           "weights_trainable": nbytes(q for q in params if q.requires_grad),
           "weights_frozen": nbytes(q for q in params if not q.requires_grad) + nbytes(model.buffers()),
           "grads": nbytes(q.grad for q in params if q.grad is not None),
           "optimizer": nbytes(v for st in (opt.state.values() if opt else []) for v in st.values() if torch.is_tensor(v))}
    out["dtypes"] = sorted({str(q.dtype).removeprefix("torch.") for q in params})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="episodes in the iteration")
    ap.add_argument("--micro", type=int, default=2, help="episodes per forward/backward")
    ap.add_argument("--new", type=int, default=16, help="sampled tokens per episode")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    args = ap.parse_args(argv)

    from cherrytop.config import load_config
    from cherrytop.plan import Options, Workload, plan, read_config, shape
    from cherrytop.stages import ppo
    policy_dir, rm_dir = make_model(OUT / "llama-1b")
    run_dir = tempfile.mkdtemp(prefix="ppo1b-")
    cfg = load_config("tiny", overrides=[
        f"--run.out_dir={run_dir}", "--run.name=ppo1b", f"--run.threads={args.threads}",
        f"--ppo.init={policy_dir}", f"--ppo.reward_model={rm_dir}", f"--ppo.prompts={OUT / 'prompts.jsonl'}",
        f"--ppo.episodes={args.batch}", f"--ppo.batch_size={args.batch}", f"--ppo.minibatch_size={args.batch}",
        f"--ppo.micro_batch_size={args.micro}", "--ppo.ppo_epochs=1", f"--ppo.max_new_tokens={args.new}",
        f"--lora.r={args.lora_r}", f"--lora.alpha={2 * args.lora_r}", "--ppo.save_every=1000000"])
    cuda = torch.cuda.is_available()
    seen, clock = {}, {}
    inner_frozen, inner_rollout, inner_update = ppo.frozen_models, ppo.rollout, ppo.update

    def frozen_models(*a, **k):
        ref, rm, loglik = inner_frozen(*a, **k)
        seen["reward"] = rm
        return ref, rm, loglik

    def rollout(policy, ref, score_fn, value, *a, **k):
        t = time.perf_counter()
        out = inner_rollout(policy, ref, score_fn, value, *a, **k)
        clock["rollout_s"] = time.perf_counter() - t
        return out

    def update(policy, value, opt_pi, opt_v, *a, **k):
        t = time.perf_counter()
        out = inner_update(policy, value, opt_pi, opt_v, *a, **k)
        clock["update_s"] = time.perf_counter() - t
        seen.update(policy=(policy, opt_pi), value=(value, opt_v))
        clock["rss_after_update"], clock["peak_before_save"] = rss(), peak()
        clock["save_from"] = time.perf_counter()
        return out
    ppo.frozen_models, ppo.rollout, ppo.update = frozen_models, rollout, update
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = ppo.run(cfg, fresh=True)
    end = time.perf_counter()
    models = {"policy": memory_of(*seen["policy"]), "value": memory_of(*seen["value"]),
              "reward": memory_of(seen["reward"], None)}
    s = shape(read_config(policy_dir))
    frozen_bytes = 2 if seen["reward"].dtype == torch.bfloat16 else 4
    p = plan(s, "ppo", 1, 80.0, Options(lora=True), Workload(args.micro, 64 + args.new, args.batch, args.lora_r),
             frozen_bytes=frozen_bytes)
    planned = {m.role: {"weights": m.weights, "grads": m.grads, "optimizer": m.optimizer,
                        "activations": m.activations, "kv_cache": m.kv_cache} for m in p.models}
    result = {"device": "cuda" if cuda else f"cpu ({torch.get_num_threads()} threads)", "params": s.params,
              "episodes": args.batch, "new_tokens": args.new, "lora_r": args.lora_r,
              "rollout_s": round(clock["rollout_s"], 2), "update_s": round(clock["update_s"], 2),
              "save_s": round(end - clock["save_from"], 2), "total_s": round(end - t0, 2),
              "memory_after_update": clock["rss_after_update"], "peak_before_save": clock["peak_before_save"],
              "peak": peak(), "models": models, "planned": planned,
              "kl": metrics.get("objective/kl"), "score": metrics.get("objective/score")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
