"""Scalar heads: the reward model and the value model.

Both are Hugging Face `AutoModelForSequenceClassification` models with one label — the causal LM's
trunk with the unembedding replaced by a scalar `score` head — so checkpoints are plain HF folders.
We read the head at every position (`token_scores`): the reward is the score at the response's last
token (its EOS) [LHP, N+]; values are the scores at the positions that predict each response token.
The reward model's normalising bias (demonstrations score mean 0 [IG]) is stored in the model
config as `cherrytop_reward_bias` and added by `reward`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

BIAS_KEY = "cherrytop_reward_bias"


def scalar_model_from(path: str | Path, pad_id: int) -> PreTrainedModel:
    """A one-output sequence-classification model whose trunk comes from `path`; a new head is
    initialised N(0, 1/sqrt(d+1)) [LHP] (an existing head, e.g. a reward model's, is kept)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    model.config.pad_token_id = pad_id
    if not hasattr(model.config, BIAS_KEY):
        d = model.score.weight.shape[1]
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
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
