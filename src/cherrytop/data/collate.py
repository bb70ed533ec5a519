"""Turning token sequences into training batches: packed pretraining windows, SFT rows (one
conversation per row, or packed), padding, and a deterministic data order that resume relies on."""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def pack_windows(docs, seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents (token id lists or arrays, each followed by EOS) and cut into (N, seq_len)
    windows; the tail that does not fill a window is dropped."""
    eos = np.array([eos_id], dtype=np.int64)
    flat = np.concatenate([x for d in docs for x in (np.asarray(d, dtype=np.int64).reshape(-1), eos)] or [eos[:0]])
    n = len(flat) // seq_len
    return torch.from_numpy(flat[: n * seq_len].reshape(n, seq_len).copy())  # (N, T)


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedy first-fit packing of (ids, labels) examples into rows of at most seq_len tokens."""
    rows: list[tuple[list[int], list[int]]] = []
    for ids, labels in sorted(examples, key=lambda e: -len(e[0])):
        for row in rows:
            if len(row[0]) + len(ids) <= seq_len:
                row[0].extend(ids)
                row[1].extend(labels)
                break
        else:
            rows.append((list(ids), list(labels)))
    return rows


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) rows to the longest one."""
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention_mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def step_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of optimizer step `step` (0-based): epochs walk through fresh permutations
    seeded by (seed, epoch), so the order depends only on the step number and resuming replays it."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return np.asarray(out)
