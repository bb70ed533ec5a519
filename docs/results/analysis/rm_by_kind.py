"""RM accuracy vs the noise-free grader, by task kind and by the flaw that separates a pair."""
import sys, collections, torch
from cherrytop.data.records import read_comparisons
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.stages.reward import encode_group, collate_groups, group_rewards, loglik_features
from cherrytop.model.heads import loglik_term
from cherrytop.model.load import load_model
from cherrytop.world import Task, grade
from transformers import AutoModelForSequenceClassification
run = sys.argv[1]
tok = load_tokenizer(f"{run}/rm")
model = AutoModelForSequenceClassification.from_pretrained(f"{run}/rm").eval()
comps = read_comparisons(f"{run}/data/comparisons_heldout.jsonl")
coef, ref, excess = loglik_term(model.config)  # the reward model's c · log π_ref term, if it has one
lm = load_model(ref).eval() if coef else None
acc = collections.defaultdict(lambda: [0, 0]); fl = collections.defaultdict(lambda: [0, 0])
with torch.no_grad():
    for i in range(0, len(comps), 16):
        chunk = comps[i:i+16]
        ll = [loglik_features(lm, tok, [([{"role": m.role, "content": m.content} for m in c.prompt], x) for x in c.responses], 160, excess)
              for c in chunk] if lm is not None else None
        b = collate_groups([(encode_group(tok, c, 160), c) for c in chunk], tok.pad_token_id, 1.0, ll)
        r = group_rewards(model, b)
        for m, c in enumerate(chunk):
            task = Task.from_record(c.meta["task"]); g = [grade(task, x) for x in c.responses]
            for x in range(c.k):
                for y in range(c.k):
                    if g[x].quality > g[y].quality:
                        ok = int(r[m, x] > r[m, y]); acc[task.kind][0] += ok; acc[task.kind][1] += 1
                        key = ",".join(sorted(set(g[y].flaws) - set(g[x].flaws))) or "-"
                        fl[key][0] += ok; fl[key][1] += 1
tot = [sum(v[0] for v in acc.values()), sum(v[1] for v in acc.values())]
print("all", round(tot[0]/tot[1], 3), tot[1])
for k, (a, n) in sorted(acc.items()): print(f"{k:14s} {a/n:.2f} {n}")
for k, (a, n) in sorted(fl.items(), key=lambda kv: -kv[1][1])[:14]: print(f"  {k:40s} {a/n:.2f} {n}")
