"""Log-probs, values and rewards of episodes (a left-padded prompt + a right-padded response, as the
sampler returns them, or (prompt, response) pairs of token ids): the passes PPO, the reward model's
c · log π_ref term and the judge run over answers. Padding-free (rollout.packing) where the model
allows, the padded forward pass otherwise; a row longer than the model's context window is read on
its last window tokens (`model.heads.fit_answer`), with a warning.

The reward is the reward model's score at the response's last token (its EOS) [LHP, N+], plus its
normalising bias (`model.heads.BIAS_KEY`); a value is the value model's score at the position that
predicts each response token. The log-prob / value passes leave out each episode's last token
(`response_pack`), whose output nothing reads.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from cherrytop import losses as L
from cherrytop.model.heads import BIAS_KEY, cut_rows, fit_answer, last_index, token_scores, warn_cut, window_of, within
from cherrytop.rollout.packing import Packed, cut, hidden_at, pack, supports_packing
from cherrytop.rollout.sampler import left_pad


def response_pack(ids: torch.Tensor, attn: torch.Tensor) -> Packed:
    """The packed layout of PPO episodes for passes that read each response position's prediction
    (log-probs, values): an episode's last token predicts nothing that is read, so it is left out."""
    return pack(ids, attn, drop_last=True)


def _pred(pk: Packed, P: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed coordinates (B, N) of the positions P-1+t that predict response token t."""
    cols = torch.arange(P - 1, P - 1 + N, device=pk.row.device).expand(pk.row.shape[0], N)
    return pk.at(cols)


def response_logits(model: torch.nn.Module, pk: Packed, P: int, N: int) -> torch.Tensor:
    """(B, N, V) float32 next-token logits at the positions that predict response tokens P..P+N-1."""
    h = hidden_at(model, pk, *_pred(pk, P, N))  # (B, N, d)
    return model.get_output_embeddings()(h).float()


def response_scores(model: torch.nn.Module, pk: Packed, P: int, N: int) -> torch.Tensor:
    """(B, N) a scalar-head model (`score`) at the positions that predict response tokens P..P+N-1."""
    h = hidden_at(model, pk, *_pred(pk, P, N))  # (B, N, d)
    return model.score(h).squeeze(-1).float()


def response_logp(model, ids, attn, pos, P: int, temperature: float, with_entropy: bool = False,
                  pk: Packed | None = None):
    """(B, N) log-probs of the response tokens (positions P..) of a left-padded prompt + right-padded
    response batch under `model`, and optionally entropy. Padding-free for plain HF models (on `pk`,
    `response_pack(ids, attn)`, when the caller has it already); the padded forward pass otherwise."""
    window, kept = window_of(model), None
    if window and ids.shape[1] > window:  # rows past the window: on their last window tokens (heads.fit_answer)
        cut_attn, n = cut_rows(attn, window)
        if n:
            warn_cut(n, len(ids), "log π_ref", window)
            attn, pos, pk = cut_attn, (cut_attn.cumsum(-1) - 1).clamp(min=0), None
            kept = attn[:, P - 1: -1]  # (B, N) 1 where the token before response token t is kept
    if supports_packing(model):
        logits = response_logits(model, pk or response_pack(ids, attn), P, ids.shape[1] - P)  # (B, N, V)
    else:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, P - 1: -1].float()  # (B, N, V)
    logp = L.token_logprobs(logits, ids[:, P:], temperature)
    if kept is not None:
        return (logp * kept, L.entropy_from_logits(logits / temperature) * kept) if with_entropy else logp * kept
    return (logp, L.entropy_from_logits(logits / temperature)) if with_entropy else logp


def response_values(value_model, ids, attn, pos, P: int, pk: Packed | None = None) -> torch.Tensor:
    """(B, N) V(s_t): the value head at the position that predicts response token t (padding-free on
    `pk` = `response_pack(ids, attn)` when given)."""
    if supports_packing(value_model):
        return response_scores(value_model, pk or response_pack(ids, attn), P, ids.shape[1] - P)
    return token_scores(value_model, ids, attn, pos)[:, P - 1: -1]


def reward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor | None = None, normalised: bool = True, packed: bool = False) -> torch.Tensor:
    """(B,) the score at each row's last attended token (+ the normalising bias); a row longer than
    the model's window is read on its last window tokens (`fit_answer`), with a warning. `packed`:
    padding-free where the model allows (PPO's episodes, a reward-model batch padded enough), else the
    padded pass; the same numbers up to float rounding."""
    window = window_of(model)
    if packed and supports_packing(model):
        pk = pack(input_ids, attention_mask)
        if window and pk.input_ids.shape[1] > window and (n := int((pk.length > window).sum())):
            warn_cut(n, len(pk.length), "reward model", window)
            pk = cut(pk, window)
        h = hidden_at(model, pk, pk.row, pk.offset + (pk.length - 1).clamp(min=0))  # (B, d)
        r = model.score(h).squeeze(-1).float()  # (B,)
    else:
        if window and input_ids.shape[1] > window:
            cut_mask, n = cut_rows(attention_mask, window)
            if n:
                warn_cut(n, len(input_ids), "reward model", window)
                input_ids, attention_mask = within(input_ids, cut_mask, window)
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        scores = token_scores(model, input_ids, attention_mask, position_ids)  # (B, T)
        r = scores.gather(1, last_index(attention_mask)[:, None]).squeeze(1)  # (B,)
    return r + getattr(model.config, BIAS_KEY, 0.0) if normalised else r


@torch.no_grad()
def response_loglik(lm: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    batch_size: int = 64, excess: bool = False, max_len: int | None = None) -> torch.Tensor:
    """(n,) Σ_t log p(response_t | prompt, response_<t) under the causal LM `lm` at temperature 1 (with
    `excess`, Σ_t (log p(response_t | ...) + H_t), H_t the entropy of p at step t), one row per
    (prompt, response) pair of token ids; batched like PPO's episodes (prompts left-padded, responses
    right-padded, padding-free where the model allows), on the model's device; returned on the CPU in fp32.
    Pairs longer than `max_len` or `lm`'s window are cut by `fit_answer` (the sum then runs over the
    response tokens kept), with a warning: callers cut them first and count them."""
    limit = min((x for x in (max_len, window_of(lm)) if x), default=None)
    fitted = [fit_answer(p, r, limit) if limit else (p, r, False) for p, r in zip(prompts, responses, strict=True)]
    if n := sum(c for *_, c in fitted):
        warn_cut(n, len(fitted), "log π_ref", limit)
    prompts, responses = [p for p, _, _ in fitted], [r for _, r, _ in fitted]
    dev = next(lm.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        b = episode_batch(prompts[i: i + batch_size], responses[i: i + batch_size], pad_id)
        b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        f = response_logp(lm, b["input_ids"], b["attention_mask"], b["position_ids"], b["prompt_len"], 1.0,
                          with_entropy=excess)  # (B, N), + entropy
        out.append(((f[0] + f[1] if excess else f) * b["response_mask"]).sum(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def episode_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """(prompt, response) token-id pairs as one batch of episodes, prompts left-padded to P, responses
    right-padded to N: input_ids / attention_mask / position_ids (B, P+N), response_mask (B, N), prompt_len P."""
    ids_p, mask_p = left_pad(prompts, pad_id)  # (B, P)
    N = max(len(r) for r in responses)
    ids_r = torch.full((len(responses), N), pad_id, dtype=torch.long)  # (B, N)
    mask_r = torch.zeros((len(responses), N), dtype=torch.long)  # (B, N)
    for b, r in enumerate(responses):
        ids_r[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask_r[b, : len(r)] = 1
    ids, attn = torch.cat([ids_p, ids_r], 1), torch.cat([mask_p, mask_r], 1)  # (B, P+N)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "response_mask": mask_r, "prompt_len": ids_p.shape[1]}
