"""The language-modelling step shared by pretraining and SFT: a forward pass and the summed
next-token loss over the labelled tokens (prompt / user tokens carry label -100)."""

from __future__ import annotations

import torch

from cherrytop.losses import lm_loss
from cherrytop.rollout import packing

Batch = dict[str, torch.Tensor]


def lm_step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of predicted tokens) of one micro-batch; padding-free, with the vocabulary
    head only where a label is predicted (rollout.packing), when the batch is padded enough for that
    to pay off and the model allows it: the same sum as the padded pass, up to float rounding."""
    if "attention_mask" in batch and packing.worth_packing(batch["attention_mask"]) and packing.supports_packing(model):
        return packing.lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # logits (B, T, V)
    return lm_loss(out.logits, batch["labels"])


def lm_count(batch: Batch) -> int:
    """Tokens `lm_step` counts: labels after the shift that are not ignored."""
    return int((batch["labels"][:, 1:] != -100).sum())
