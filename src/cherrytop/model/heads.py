"""Scalar heads: the reward model and the value model.

Both are Hugging Face `AutoModelForSequenceClassification` models with one label — the causal LM's
trunk with the unembedding replaced by a scalar `score` head — so checkpoints are plain HF folders.
We read the head at every position (`token_scores`): the reward is the score at the response's last
token (its EOS) [LHP, N+]; values are the scores at the positions that predict each response token.
The reward model's normalising bias (demonstrations score mean 0 [IG]) is stored in the model
config as `cherrytop_reward_bias` and added by `reward`.

A reward model trained with `rm.ref_loglik` (stages/reward.py) also stores `cherrytop_reward_loglik_coef`
c, `cherrytop_reward_reference`, the causal LM π_ref it started from, and `cherrytop_reward_loglik_kind`;
its reward is then `reward(...) + c · response_loglik(π_ref, ..., excess=kind == "excess")`, a sum over
the response's tokens up to and including EOS of log π_ref(y_t) (+ the entropy H_t of π_ref there for
`excess`). PPO takes it from its own reference pass when π_ref is its reference model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from cherrytop.model.load import CheckpointError

BIAS_KEY = "cherrytop_reward_bias"
LOGLIK_KEY = "cherrytop_reward_loglik_coef"
REFERENCE_KEY = "cherrytop_reward_reference"
KIND_KEY = "cherrytop_reward_loglik_kind"


def scalar_model_from(path: str | Path, pad_id: int, dtype: torch.dtype = torch.float32,
                      require_head: bool = False) -> PreTrainedModel:
    """A one-output sequence-classification model whose trunk comes from `path`, with weights in
    `dtype`. A checkpoint without a scalar head (a causal LM) gets a new one, N(0, 1/sqrt(d+1)) [LHP];
    one with a head (a reward model: ours, or another tool's with one output) keeps it. With
    `require_head` (a reward model is expected) a checkpoint without a head is an error."""
    model, info = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype,
                                                                     output_loading_info=True)
    model.config.pad_token_id = pad_id
    if any(k.startswith("score.") for k in info["missing_keys"]):
        if require_head:
            raise CheckpointError(f"{path}: not a reward model: it has no scalar head (`score`); expected the folder "
                                  "`cherrytop rm` writes or a sequence-classification model with one output")
        d = model.score.weight.shape[1]
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
    if not hasattr(model.config, BIAS_KEY):
        setattr(model.config, BIAS_KEY, 0.0)
    return model


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) the scalar head applied at every position."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state  # (B, T, d)
    return model.score(hidden).squeeze(-1).float()  # (B, T)


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position of each row (works for left and right padding)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (pos * attention_mask.long()).argmax(-1)


def reward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor | None = None, normalised: bool = True) -> torch.Tensor:
    """(B,) the score at each row's last attended token (+ the normalising bias)."""
    scores = token_scores(model, input_ids, attention_mask, position_ids)  # (B, T)
    r = scores.gather(1, last_index(attention_mask)[:, None]).squeeze(1)  # (B,)
    return r + getattr(model.config, BIAS_KEY, 0.0) if normalised else r


def loglik_term(config) -> tuple[float, str | None, bool]:
    """(c, π_ref folder, excess) of a reward model's c · log π_ref(response) term, read from its (HF)
    config; excess: the term adds π_ref's entropy at each step. (0.0, None, False) if it has none."""
    c = float(getattr(config, LOGLIK_KEY, 0.0) or 0.0)
    if not c:
        return 0.0, None, False
    return c, getattr(config, REFERENCE_KEY, None), getattr(config, KIND_KEY, "sum") == "excess"


@torch.no_grad()
def response_loglik(lm: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    batch_size: int = 64, excess: bool = False) -> torch.Tensor:
    """(n,) Σ_t log p(response_t | prompt, response_<t) under the causal LM `lm` at temperature 1 (with
    `excess`, Σ_t (log p(response_t | ...) + H_t), H_t the entropy of p at step t), one row per
    (prompt, response) pair of token ids; batched like PPO's episodes (prompts left-padded, responses
    right-padded, padding-free where the model allows), on the model's device; returned on the CPU in fp32."""
    from cherrytop.rollout.packing import response_logp
    from cherrytop.rollout.sampler import left_pad
    dev = next(lm.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids_p, mask_p = left_pad(prompts[i: i + batch_size], pad_id)  # (B, P)
        rs = responses[i: i + batch_size]
        N = max(len(r) for r in rs)
        ids_r = torch.full((len(rs), N), pad_id, dtype=torch.long)  # (B, N)
        mask_r = torch.zeros((len(rs), N), dtype=torch.long)  # (B, N)
        for b, r in enumerate(rs):
            ids_r[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask_r[b, : len(r)] = 1
        ids, attn = torch.cat([ids_p, ids_r], 1).to(dev), torch.cat([mask_p, mask_r], 1).to(dev)  # (B, P+N)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        f = response_logp(lm, ids, attn, pos, ids_p.shape[1], 1.0, with_entropy=excess)  # (B, N), + entropy
        out.append(((f[0] + f[1] if excess else f) * mask_r.to(dev)).sum(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
