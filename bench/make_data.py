"""The benchmark's shared inputs, written once to `bench/out/` and read by both sides:

    model/          the tiny preset's Llama (4 layers, d128, 4 heads, ff512), random weights, with a
                    byte-level BPE tokenizer (vocab 1536) trained on the built-in world's corpus and
                    cherrytop's chat template: a plain Hugging Face folder both cherrytop and TRL load
    sft.jsonl       demonstrations `{"messages": [...]}` of the built-in world
    rankings.jsonl  K = 4 rankings (4 simulated trainers answer, a simulated labeler ranks)
    pairs.jsonl     the same rankings as TRL-style pairwise rows `{"prompt", "chosen", "rejected"}`
                    (the C(4,2) = 6 pairs of each ranking, ties left out)
    prompts.jsonl   PPO prompts `{"messages": [...]}` ending with a user turn
    rankings-k8.jsonl  256 K = 8 rankings for the DPO rows: 8 different answers per prompt (4 simulated
                    trainers' answers, filled up with one-edit variants of them, `stages.compare.edit`), in a
                    simulated labeler's order taken as strict (its ties broken by that order), so every
                    prompt gives exactly C(8,2) = 28 pairs
    pairs-k8.jsonl  the same rankings as their 28 TRL-style pairwise rows each (7,168 rows)
    <scale>/model   with `--scale 125m|1b`: a random-weight Llama of issue 7's GPU table (SCALES),
                    vocabulary 32,000, the same tokenizer (its 1,536 ids are a subset; nothing the
                    benchmark samples is decoded)
    prompts-<n>.jsonl  with `--prompt-len n`: the prompts, each exactly n tokens once chat-encoded
                    (the user's text cut or filled with words of the world)

Run with cherrytop's venv: `.venv/bin/python bench/make_data.py [--scale 125m] [--prompt-len 64]`
(idempotent; `--fresh` rebuilds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
from pathlib import Path

from cherrytop.config import load_config
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.model.load import build_model
from cherrytop.world import SimulatedLabeler, SimulatedTrainer, World

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Spec  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
DPO_RANKINGS = 256
"""K-way rankings written for the DPO rows (cherrytop holds out 10 % of them; TRL trains on all their pairs)."""
GPU_VOCAB = 32000
"""The vocabulary of the GPU-scale models (issue 7: vocab 32k)."""
SCALES = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),  # 134M parameters with the untied 32k embeddings
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama's shape: 1.10B parameters
}
"""Random-weight Llama shapes for the GPU benchmark (issue 7's ~125M and ~1.1B)."""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def scaled_model(out: Path, scale: str) -> Path:
    """bench/out/<scale>/model: a random-weight Llama of SCALES[scale] with the benchmark's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cherrytop.data.tokenizer import load_tokenizer
    folder = out / scale / "model"
    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer(out / "model")
    cfg = LlamaConfig(vocab_size=GPU_VOCAB, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, **SCALES[scale])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return folder


def fixed_length_prompts(out: Path, n: int) -> Path:
    """prompts-<n>.jsonl: each prompt of prompts.jsonl with its (last) user text cut, word by word, or
    filled with words of earlier prompts until the chat-encoded prompt is exactly n tokens, as both
    cherrytop's `encode_prompt` and the tokenizer's own chat template (TRL's) encode it."""
    from cherrytop.data.tokenizer import encode_prompt, load_tokenizer
    path = out / f"prompts-{n}.jsonl"
    if path.is_file():
        return path
    tok = load_tokenizer(out / "model")
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    filler = " ".join(r["messages"][-1]["content"] for r in rows).split()

    def length(msgs: list[dict]) -> int:
        a = len(encode_prompt(tok, msgs))
        b = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        if a != b:
            raise SystemExit(f"error: encode_prompt and the chat template disagree ({a} vs {b} tokens)")
        return a
    result = []
    for i, r in enumerate(rows):
        msgs = [dict(m) for m in r["messages"]]
        words = msgs[-1]["content"].split()
        for k in range(len(words), 0, -1):  # cut to fit
            msgs[-1]["content"] = " ".join(words[:k])
            if length(msgs) <= n:
                break
        j = i * 7
        while length(msgs) < n:  # fill word by word; a word that overshoots is skipped
            word = filler[j % len(filler)]
            j += 1
            trial = [*msgs[:-1], {**msgs[-1], "content": msgs[-1]["content"] + " " + word}]
            if length(trial) <= n:
                msgs = trial
            elif j > i * 7 + 5000:
                break
        if length(msgs) == n:
            result.append({"messages": msgs})
    write_jsonl(path, result)
    print(f"{path}: {len(result)} prompts of {n} tokens")
    return path


def reward_folder(model: Path) -> Path:
    """<model>-reward: the model with a one-output `score` head (seed 0), the reward model of both sides'
    PPO. cherrytop takes a reward model only with a head (a causal LM given as one is refused), and a
    head made once gives both sides the same reward function."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = model.parent / f"{model.name}-reward"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    rm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


def dpo_rankings(out: Path, k: int) -> Path:
    """rankings-k<k>.jsonl and pairs-k<k>.jsonl: DPO_RANKINGS prompts, each with k different answers ranked
    strictly, and the same rankings as their C(k,2) chosen/rejected rows. The answers: the 4 simulated
    trainers' (build's), then one small edit of one of them (`stages.compare.edit`: repeat / drop a word, a number
    ±1, a typo, as `cherrytop compare` makes its edited answers) until k differ. The labeler's order
    is kept and its ties dropped (broken by that order): no tied pairs on either side, and every prompt
    has exactly C(k,2) strict pairs, so a batch of P prompts is P · C(k,2) pairs on both sides."""
    from cherrytop.stages.compare import edit
    path = out / f"rankings-k{k}.jsonl"
    if path.is_file():
        return path
    cfg = load_config("tiny")
    world = World(cfg.world)
    trainers = [SimulatedTrainer(cfg.world, seed=s) for s in range(4)]
    labeler = SimulatedLabeler(cfg.world, "bench", seed=0)
    rankings, pairs = [], []
    for n, task in enumerate(world.prompts(1024)[:DPO_RANKINGS]):
        answers = list(dict.fromkeys(t.reply(task) for t in trainers))  # distinct, in trainer order
        base, rng = list(answers), random.Random(f"bench-dpo|{n}")
        for _ in range(1000):
            if len(answers) == k:
                break
            new = edit(rng.choice(base), rng.choice(("repeat", "drop", "number", "typo")), [], "", rng)
            if new and new not in answers:
                answers.append(new)
        else:
            raise SystemExit(f"error: could not make {k} different answers for prompt {n}")
        order = labeler.rank(task, answers).ranking
        prompt = [dict(m) for m in task.messages]
        rankings.append({"prompt": {"messages": prompt}, "responses": answers, "ranking": order, "ties": []})
        for a, b in itertools.combinations(order, 2):  # a ranked above b
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[a]}],
                          "rejected": [{"role": "assistant", "content": answers[b]}]})
    write_jsonl(out / f"pairs-k{k}.jsonl", pairs)
    write_jsonl(path, rankings)  # last: its presence means both files are complete
    print(f"{path}: {len(rankings)} K={k} rankings, {len(pairs)} pairs")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="rebuild everything")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--scale", choices=["tiny", *SCALES], default="tiny", help="also build this GPU-scale model")
    ap.add_argument("--prompt-len", type=int, default=0, help="also write prompts of exactly this many tokens")
    args = ap.parse_args(argv)
    out: Path = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    build(out)
    reward_folder(out / "model")
    dpo_rankings(out, Spec().dpo_k)
    if args.scale != "tiny":
        reward_folder(scaled_model(out, args.scale))
    if args.prompt_len:
        fixed_length_prompts(out, args.prompt_len)


def build(out: Path) -> None:
    """The tiny model, the tokenizer and the data files."""
    if (out / "prompts.jsonl").is_file():
        print(f"{out}: already built")
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny")
    world = World(cfg.world)

    docs = world.corpus("train")
    texts = [d if isinstance(d, str) else "\n".join(m["content"] for m in d) for d in docs]
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    model = build_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, seed=cfg.run.seed)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")

    write_jsonl(out / "sft.jsonl", [{"messages": m} for m in world.demonstrations(2048)])

    tasks = world.prompts(1024)
    trainers = [SimulatedTrainer(cfg.world, seed=s) for s in range(4)]
    labeler = SimulatedLabeler(cfg.world, "bench", seed=0)
    rankings, pairs = [], []
    for task in tasks[:512]:
        responses = [t.reply(task) for t in trainers]
        r = labeler.rank(task, responses)
        prompt = [dict(m) for m in task.messages]
        rankings.append({"prompt": {"messages": prompt}, "responses": responses, "ranking": r.ranking,
                         "ties": [list(t) for t in r.ties]})
        tied = {tuple(sorted(t)) for t in r.ties}
        for a, b in itertools.combinations(r.ranking, 2):  # a ranked above b
            if tuple(sorted((a, b))) not in tied:
                pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": responses[a]}],
                              "rejected": [{"role": "assistant", "content": responses[b]}]})
    write_jsonl(out / "rankings.jsonl", rankings)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "prompts.jsonl", [{"messages": [dict(m) for m in t.messages]} for t in tasks])
    print(f"{out}: model ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tok)}), "
          f"{len(rankings)} rankings, {len(pairs)} pairs, {len(tasks)} prompts")


if __name__ == "__main__":
    main()
