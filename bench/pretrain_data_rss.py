"""Peak memory of pretraining's data preparation on one long document (tests nothing; prints numbers).

    .venv/bin/python bench/pretrain_data_rss.py --mb 50

Writes a one-line `.txt` corpus of `--mb` MB of random words and numbers, then in a fresh process runs
what `cherrytop pretrain --pretrain.data=FILE` does before training: read and split the corpus
(`pretrain.corpus`), train the tokenizer on the training part's pieces, tokenize both parts and pack
them into windows. Prints the peak RSS (`ru_maxrss`) after each step.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from cherrytop.config import load_config
from cherrytop.data.collate import pack_windows
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.stages import pretrain
t0 = time.time()
def show(step):
    print(f"{step:<28} peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:6.2f} GiB  {time.time() - t0:6.1f} s", flush=True)
show("imports")
cfg = load_config("test", [], [f"--pretrain.data={sys.argv[1]}"])
train, held = pretrain.corpus(cfg)
show("read + split")
tok = train_tokenizer(pretrain.text_pieces(train), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
show("tokenizer trained")
ids, held_ids = pretrain.tokenize_documents(tok, train), pretrain.tokenize_documents(tok, held)
show("tokenized")
w, h = pack_windows(ids, 64, tok.eos_token_id), pack_windows(held_ids, 64, tok.eos_token_id)
show("packed")
n = sum(map(len, ids)) + sum(map(len, held_ids))
print(f"{n:,} tokens; held out {sum(map(len, held_ids)) / n:.2%} of them; {len(w):,} training / {len(h):,} held-out windows")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50.0, help="size of the one-line document in MB")
    args = ap.parse_args()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "one_line.txt"
        n, out = int(args.mb * 1e6), []
        size = 0
        while size < n:
            w = rng.choice(words) if rng.random() > 0.05 else str(rng.randint(0, 999))
            out.append(w)
            size += len(w) + 1
        path.write_text(" ".join(out) + "\n", encoding="utf-8")
        del out
        print(f"{path.stat().st_size / 1e6:.1f} MB on one line")
        subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True)


if __name__ == "__main__":
    main()
