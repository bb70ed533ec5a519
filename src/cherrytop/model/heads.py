"""Scalar heads: the reward model and the value model.

Both are Hugging Face `AutoModelForSequenceClassification` models with one label — the causal LM's
trunk with the unembedding replaced by a scalar `score` head — so checkpoints are plain HF folders.
We read the head at every position (`token_scores`): the reward is the score at the response's last
token (its EOS) [LHP, N+]; values are the scores at the positions that predict each response token.
The reward model's normalising bias (demonstrations score mean 0 [IG]) is stored in the model
config as `cherrytop_reward_bias` and added by `reward`. The passes over episodes that read these
heads (`reward`, values, `response_loglik`) are in rollout.episodes, which imports this module.

A reward model trained with `rm.ref_loglik` (stages/reward.py) also stores `cherrytop_reward_loglik_coef`
c, `cherrytop_reward_reference`, the causal LM π_ref it started from, and `cherrytop_reward_loglik_kind`;
its reward is then `reward(...) + c · response_loglik(π_ref, ..., excess=kind == "excess")`, a sum over
the response's tokens up to and including EOS of log π_ref(y_t) (+ the entropy H_t of π_ref there for
`excess`). PPO takes it from its own reference pass when π_ref is its reference model.

An answer is read within the model's context window as reward-model training reads it (`fit_answer`:
the last tokens of prompt + answer, so the EOS stays): both the head and the log π_ref term, in
training, `cherrytop eval --judge` and PPO; every caller says how many answers it cut.
"""

from __future__ import annotations

import math
import warnings
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


def window_of(model) -> int | None:
    """The context window of a model, or of the model a wrapper (DDP, a LoRA reference view) holds."""
    from cherrytop.model.load import context_window
    for m in (model, getattr(model, "module", None), getattr(model, "policy", None)):
        config = getattr(m, "config", None)
        if config is not None:
            return context_window(config)
    return None


def fit_answer(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """(prompt, response, cut) token ids within `max_len`, cut as reward-model training cuts its rows
    (`stages/reward.encode_answer`): the last max_len tokens of prompt + response, so the response's end
    (its EOS, where the head is read) stays. While the response fits with a prompt token, only the
    prompt loses tokens (cut False); past that the row's first token stands as the prompt and the
    response loses its start (cut True)."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    if len(response) < max_len:
        return prompt[len(prompt) + len(response) - max_len:], response, False
    row = (prompt[-1:] + response)[-max_len:]
    return row[:1], row[1:], True


def cut_rows(attention_mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, int]:
    """(B, T) the mask with each row's attended run cut to its last `max_len` tokens, and how many rows
    were cut (`fit_answer` on a padded batch)."""
    n = attention_mask.sum(1, keepdim=True)  # (B, 1)
    keep = attention_mask.bool() & (attention_mask.cumsum(1) > n - max_len)  # (B, T)
    return keep.to(attention_mask.dtype), int((n > max_len).sum())


def within(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids and mask of a batch whose attended runs are at most `width` long, each run moved
    to the row's start (right padding)."""
    T = input_ids.shape[1]
    cols = attention_mask.argmax(1)[:, None] + torch.arange(width, device=input_ids.device)  # (B, W)
    inside = cols < T
    cols = cols.clamp(max=T - 1)
    return input_ids.gather(1, cols), attention_mask.gather(1, cols) * inside


def warn_cut(n: int, total: int, what: str, window: int) -> None:
    """The console line of a shared scoring function that had to cut rows to a model's window."""
    warnings.warn(f"{what}: {n} of {total} answers longer than its context window of {window} tokens were "
                  f"cut to their last {window} tokens", stacklevel=3)


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


def loglik_term(config) -> tuple[float, str | None, bool]:
    """(c, π_ref folder, excess) of a reward model's c · log π_ref(response) term, read from its (HF)
    config; excess: the term adds π_ref's entropy at each step. (0.0, None, False) if it has none."""
    c = float(getattr(config, LOGLIK_KEY, 0.0) or 0.0)
    if not c:
        return 0.0, None, False
    return c, getattr(config, REFERENCE_KEY, None), getattr(config, KIND_KEY, "sum") == "excess"
