"""Probe in-context copying of a pretrained checkpoint on held-out corpus-format items (greedy).

    python probe.py CKPT TOKENIZER [--world.… overrides]

`copy_items` and `copy_rates` are shared with pretrain_copy_probe.py, which probes during training.
"""
import random, sys, torch
from cherrytop.rollout.sampler import sample, left_pad
from cherrytop.world.language import ATTRS, QUESTION, fact, WORD_GAME_WORDS
from cherrytop.world.tasks import join_words


def copy_items(lang, n: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, wanted continuation) per probe: reverse, join, fact question, repeating held-out names."""
    rng = random.Random(123)
    items = {"reverse": [], "join": [], "factqa": [], "again": []}
    for _ in range(n):
        ws = rng.sample(WORD_GAME_WORDS, rng.randint(2, 4)); w = " ".join(ws)
        items["reverse"].append((f"the reverse of {w} is", " " + " ".join(reversed(ws)) + " ."))
        items["join"].append((f"{w} joined with commas is", " " + join_words(ws, "commas")))
        names = [e.name for e in lang.sample_entities("heldout", 3, rng)]
        items["again"].append((f"say {' '.join(names)} again :", " " + " ".join(names) + " ."))
        sents, stated = [], []
        for e in lang.sample_entities("heldout", rng.randint(1, 3), rng):
            for a in rng.sample(ATTRS, rng.randint(2, 4)):
                sents.append(fact(e.name, a, e.value(a))); stated.append((e, a))
        e, a = rng.choice(stated)
        items["factqa"].append((" ".join(sents) + " " + QUESTION[a].format(e=e.name), " " + fact(e.name, a, e.value(a))))
    return items


@torch.inference_mode()
def copy_rates(model, tok, items) -> dict[str, float]:
    """Share of each probe's items whose greedy continuation starts with the wanted text."""
    res = {}
    for k, its in items.items():
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in its]
        x, m = left_pad(ids, tok.pad_token_id)
        s = sample(model, x, m, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0)
        ok = sum(tok.decode(row, skip_special_tokens=True).strip().startswith(want.strip())
                 for (_, want), row in zip(its, s.tokens.tolist()))
        res[k] = round(ok / len(its), 3)
    return res


if __name__ == "__main__":
    from cherrytop.config import load_config
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.load import load_model
    from cherrytop.world.language import language_for
    ckpt, tokdir = sys.argv[1], sys.argv[2]
    cfg = load_config("tiny", [], sys.argv[3:])
    print(ckpt, copy_rates(load_model(ckpt).eval(), load_tokenizer(tokdir), copy_items(language_for(cfg.world), 150)))
