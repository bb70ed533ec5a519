"""The benchmark's shared inputs, written once to `bench/out/` and read by both sides:

    model/          the tiny preset's Llama (4 layers, d128, 4 heads, ff512), random weights, with a
                    byte-level BPE tokenizer (vocab 1536) trained on the built-in world's corpus and
                    cherrytop's chat template: a plain Hugging Face folder both cherrytop and TRL load
    sft.jsonl       demonstrations `{"messages": [...]}` of the built-in world
    rankings.jsonl  K = 4 rankings (4 simulated trainers answer, a simulated labeler ranks)
    pairs.jsonl     the same rankings as TRL-style pairwise rows `{"prompt", "chosen", "rejected"}`
                    (the C(4,2) = 6 pairs of each ranking, ties left out)
    prompts.jsonl   PPO prompts `{"messages": [...]}` ending with a user turn

Run with cherrytop's venv: `.venv/bin/python bench/make_data.py` (idempotent; `--fresh` rebuilds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

from cherrytop.config import load_config
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.model.load import build_model
from cherrytop.world import SimulatedLabeler, SimulatedTrainer, World

OUT = Path(__file__).resolve().parent / "out"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="rebuild everything")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    out: Path = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
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
