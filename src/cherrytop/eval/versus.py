"""Comparing two policies: win rate judged by the noise-free grader (ties count half), the policy's
KL to a reference model on held-out prompts, and the held-out pretraining loss (the "alignment tax")."""

from __future__ import annotations

import torch

from cherrytop import losses as L
from cherrytop.data.tokenizer import encode_prompt
from cherrytop.rollout.sampler import left_pad, sample
from cherrytop.world import grade


def win_rate(tasks, answers_a: list[str], answers_b: list[str]) -> dict:
    """P(A beats B) over tasks by grader quality, ties counted as half; also per kind."""
    by_kind: dict[str, list[float]] = {}
    for t, a, b in zip(tasks, answers_a, answers_b):
        qa, qb = grade(t, a).quality, grade(t, b).quality
        by_kind.setdefault(t.kind, []).append(1.0 if qa > qb else 0.5 if qa == qb else 0.0)
    allv = [v for vs in by_kind.values() for v in vs]
    return {"win_rate": sum(allv) / max(len(allv), 1), "n": len(allv),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


@torch.no_grad()
def kl_to_reference(policy, ref, tok, prompts: list[list[dict]], max_new_tokens: int, temperature: float = 1.0,
                    batch_size: int = 64, seed: int = 0) -> float:
    """Mean over prompts of Σ_t log π(y_t) − log π_ref(y_t), y sampled from π: KL(π ‖ π_ref) per response."""
    policy.eval()
    ref.eval()
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        ids_p, mask_p = left_pad([encode_prompt(tok, p) for p in prompts[i: i + batch_size]], tok.pad_token_id)
        s = sample(policy, ids_p, mask_p, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id, temperature=temperature, generator=gen)
        P = ids_p.shape[1]
        ids = torch.cat([ids_p, s.tokens], 1)
        attn = torch.cat([mask_p, s.mask], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ref_logits = ref(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1: -1]
        ref_logp = L.token_logprobs(ref_logits, s.tokens, temperature)
        total += float(L.per_token_kl(s.logprobs, ref_logp, s.mask).sum())
        n += ids.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def lm_loss_on(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats/token) over pretraining windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i: i + batch_size]
        s, c = L.lm_loss(model(input_ids=x).logits, x)
        total += float(s)
        count += int(c)
    return total / max(count, 1)
