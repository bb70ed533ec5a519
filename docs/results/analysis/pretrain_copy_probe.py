"""The pretraining experiment of a74094b / 03b21e2 (2026-11-23): train the tiny model on the world corpus with a plain loop and
probe greedy in-context copying (held-out names, reversing, joining, a fact question) every EVERY steps.

    STEPS=600 EVERY=100 THREADS=1 python pretrain_copy_probe.py [--world.seed=1 ...]
    VARIANT=again  (half of the word-game lines become `say <names and words> again : <same>`)
    INIT=0.088     (re-initialise every linear / embedding weight with this std instead of HF's 0.02)
    SAVE=DIR       (save the model and tokenizer at the end)
"""
import math, os, random, sys, time, json
import torch
from cherrytop.config import load_config
from cherrytop.data.collate import pack_windows, step_indices
from cherrytop.data.tokenizer import load_tokenizer, train_tokenizer
from cherrytop.model.load import build_model, count_params
from cherrytop.stages.pretrain import tokenize_documents
from cherrytop.world import World
from cherrytop.world.language import language_for, WORD_GAME_WORDS
from cherrytop.losses import lm_loss
from probe import copy_items, copy_rates  # this folder's probe.py

steps = int(os.environ.get("STEPS", 600)); every = int(os.environ.get("EVERY", 100))
lr = float(os.environ.get("LR", 3e-3)); tag = os.environ.get("TAG", "x")
cfg = load_config("tiny", [], sys.argv[1:])
torch.set_num_threads(int(os.environ.get("THREADS", 1)))
import cherrytop.world.corpus as C
V = os.environ.get("VARIANT", "")
if "again" in V:
    _orig = C.word_games
    def word_games(lang, rng, split):
        lines = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.5:
                pool = [e.name for e in lang.sample_entities(split, 4, rng)] + rng.sample(WORD_GAME_WORDS, 4)
                ws = rng.sample(pool, rng.randint(2, 6))
                lines.append(f"say {' '.join(ws)} again : {' '.join(ws)} .")
            else:
                lines.append(_orig(lang, random.Random(rng.random()), split).split(" . ")[0] + " .")
        return " ".join(lines)
    C.word_games = word_games; C._MAKERS["word_games"] = word_games
world = World(cfg.world)
t0 = time.time()
docs = world.corpus("train"); held = world.corpus("heldout")
tokdir = f"/tmp/cherrytop_probe_tok_w{cfg.world.seed}_{cfg.world.n_entities}_{cfg.tokenizer.vocab_size}_{os.environ.get('TOKTAG','')}"
if os.path.exists(tokdir + "/tokenizer.json"):
    tok = load_tokenizer(tokdir)
else:
    texts = (d if isinstance(d, str) else "\n".join(m["content"] for m in d) for d in docs)
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency); tok.save_pretrained(tokdir)
T = cfg.pretrain.seq_len
W = pack_windows(tokenize_documents(tok, docs), T, tok.eos_token_id)
H = pack_windows(tokenize_documents(tok, held), T, tok.eos_token_id)[:128]
print(f"data {time.time()-t0:.0f}s windows {len(W)}", flush=True)
model = build_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, cfg.run.seed)
print("params", count_params(model)/1e6, flush=True)
if os.environ.get("INIT"):
    std = float(os.environ["INIT"])
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, 0.0, std)
items = copy_items(language_for(cfg.world), 120)
def probe():
    model.eval(); res = copy_rates(model, tok, items); model.train(); return res
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
nod = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": nod, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
warm = 30
def lr_at(s):
    if s < warm: return lr * (s + 1) / warm
    p = (s - warm) / max(1, steps - warm); return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
t1 = time.time(); B = cfg.pretrain.batch_size
for s in range(steps):
    for g in opt.param_groups: g["lr"] = lr_at(s)
    x = W[torch.as_tensor(step_indices(len(W), B, s, cfg.run.seed))]
    out = model(input_ids=x); tot, n = lm_loss(out.logits, x); loss = tot / n
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if (s + 1) % every == 0 or s + 1 == steps:
        with torch.no_grad():
            sums = [lm_loss(model(input_ids=H[i:i+32]).logits, H[i:i+32]) for i in range(0, len(H), 32)]
            hl = sum(t.item() for t, _ in sums) / sum(c.item() for _, c in sums)
        print(json.dumps({"tag": tag, "step": s + 1, "loss": round(loss.item(), 3), "held": round(hl, 3), **probe(), "t": round(time.time() - t1)}), flush=True)
if os.environ.get("SAVE"):
    model.save_pretrained(os.environ["SAVE"]); tok.save_pretrained(os.environ["SAVE"])
