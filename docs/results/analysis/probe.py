"""Probe in-context copying of a pretrained checkpoint on held-out corpus-format items."""
import random, sys, torch
from cherrytop.config import load_config
from cherrytop.model.load import load_model
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.rollout.sampler import sample, left_pad
from cherrytop.world.language import language_for, ATTRS, QUESTION, fact, WORD_GAME_WORDS
from cherrytop.world.tasks import join_words

ckpt, tokdir = sys.argv[1], sys.argv[2]
cfg = load_config("tiny", [], sys.argv[3:])
lang = language_for(cfg.world)
tok = load_tokenizer(tokdir)
model = load_model(ckpt).eval()
rng = random.Random(123)
items = {"reverse": [], "join": [], "factqa": []}
for _ in range(150):
    ws = rng.sample(WORD_GAME_WORDS, rng.randint(2, 4)); w = " ".join(ws)
    items["reverse"].append((f"the reverse of {w} is", " " + " ".join(reversed(ws)) + " ."))
    items["join"].append((f"{w} joined with commas is", " " + join_words(ws, "commas")))
    sents, stated = [], []
    for e in lang.sample_entities("heldout", rng.randint(1, 3), rng):
        for a in rng.sample(ATTRS, rng.randint(2, 4)):
            sents.append(fact(e.name, a, e.value(a))); stated.append((e, a))
    e, a = rng.choice(stated)
    items["factqa"].append((" ".join(sents) + " " + QUESTION[a].format(e=e.name), " " + fact(e.name, a, e.value(a))))
res = {}
for k, its in items.items():
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in its]
    x, m = left_pad(ids, tok.pad_token_id)
    with torch.inference_mode():
        s = sample(model, x, m, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0)
    ok = 0
    for (p, want), row in zip(its, s.tokens.tolist()):
        got = tok.decode(row, skip_special_tokens=True)
        ok += got.strip().startswith(want.strip())
    res[k] = ok / len(its)
print(ckpt, {k: round(v, 3) for k, v in res.items()})
