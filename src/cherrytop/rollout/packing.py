"""Padding-free forward passes: the real tokens of each sequence of a padded batch (a PPO episode:
prompt without its left padding + response up to EOS; an SFT row without its right padding) are
packed first-fit into a few rows, with a block-diagonal causal mask and per-sequence position ids,
so no compute goes to padding; the vocabulary head runs only at the positions whose prediction is
used (response tokens, labelled tokens), and the scalar heads only where they are read. For a Llama
trunk the last decoder layer, too, runs its queries, attention output and MLP only at those positions,
and the layers before it work on the real tokens as one (K, d) tensor, only their attention on rows
laid out for its own cost (`hidden_at`). The passes over PPO's episodes (log-probs, values, rewards)
are in rollout.episodes.

Same numbers as the padded pass (a sequence attends to exactly its own tokens at the same positions)
up to float rounding; tests/rollout/test_packing.py checks it. Works with any Hugging Face causal LM
whose attention takes a 4D mask (Llama, GPT-2, Qwen, ...); models that post-process logits
(`final_logit_softcapping`) are rejected so callers fall back to the padded pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


@dataclass
class Packed:
    """Sequences (B of them, each a contiguous run of real tokens in a padded (B, T) batch, padded on
    the left or on the right) packed into R rows of L positions."""
    input_ids: torch.Tensor
    """(R, L) tokens; pad positions hold token 0."""
    position_ids: torch.Tensor
    """(R, L) position of each token within its own sequence (0 at its first real token)."""
    mask: torch.Tensor
    """(R, 1, L, L) bool, True where query i may attend key j: same sequence and j <= i (pads see themselves)."""
    row: torch.Tensor
    """(B,) packed row of each sequence."""
    offset: torch.Tensor
    """(B,) packed column of each sequence's first real token."""
    start: torch.Tensor
    """(B,) padded column of each sequence's first real token."""
    length: torch.Tensor
    """(B,) real tokens per sequence."""

    def at(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (rows, cols) of padded columns `cols` (B, K); a column outside its sequence maps to
        the nearest real token of that sequence (callers mask those out)."""
        within = (cols - self.start[:, None]).clamp(max=(self.length[:, None] - 1).clamp(min=0)).clamp(min=0)  # (B, K)
        return self.row[:, None].expand_as(cols), self.offset[:, None] + within


MIN_PADDING = 1 / 3
"""Pack a training batch only when at least this share of its positions is padding: building the
block-diagonal layout and masked attention cost more than they save on lightly padded batches (on
the 2-core CPU, batches of 32 rows: 12-21 % padding ran slower packed, 26-46 % faster; `1dc5ed7`,
2026-11-22)."""


def worth_packing(attention_mask: torch.Tensor) -> bool:
    """Whether a padded batch has enough padding for the packed pass to pay off (MIN_PADDING)."""
    return float(attention_mask.float().mean()) <= 1 - MIN_PADDING


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether `model`'s outputs can be computed from packed rows: a plain Hugging Face model (not a
    wrapper such as DDP, a PEFT model or a LoRA reference view, not FSDP-sharded) whose trunk takes a
    4D mask and whose logits are not post-processed."""
    try:
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):
            return False
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    return (isinstance(model, PreTrainedModel) and hasattr(model, model.base_model_prefix)
            and getattr(model.config, "final_logit_softcapping", None) is None)


def _first_fit(lengths: list[int], L: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit decreasing into rows of L positions: (row, offset) per episode, filled length per row."""
    rows_used: list[int] = []
    place = [(0, 0)] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, used in enumerate(rows_used):
            if used + lengths[b] <= L:
                place[b] = (r, used)
                rows_used[r] += lengths[b]
                break
        else:
            place[b] = (len(rows_used), 0)
            rows_used.append(lengths[b])
    return place, rows_used


def _layout(lengths: list[int], keys_per_position: int = 1024) -> tuple[list[tuple[int, int]], list[int], int]:
    """The row length (1x..4x the longest episode) whose packing costs least: positions R·L, plus the
    attention's share that grows with L (one position per `keys_per_position` keys: 1024 when every
    position pays for the whole layer, as at d_model ~128; 46 when only the attention sees the rows,
    as `hidden_at`'s layers on the real tokens do — the CPU flash kernel's time, forward + backward,
    fits R·L·(L + 46) within 5 % from 1x to 8x the longest of 32 PPO episodes; `9d636ff`, 2026-11-23)."""
    longest = max(max(lengths), 1)
    best = None
    for L in sorted({longest, longest * 3 // 2, longest * 2, longest * 3, longest * 4}):
        place, rows_used = _first_fit(lengths, L)
        cost = len(rows_used) * L * (1 + L / keys_per_position)
        if best is None or cost < best[0]:
            best = (cost, place, rows_used, L)
    return best[1], best[2], best[3]


def token_index(length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences of `length` (B,) tokens: the sequence (K,) of each of their K tokens, in order, and
    the token's position within its sequence (K,)."""
    seq = torch.repeat_interleave(torch.arange(length.shape[0], device=length.device), length)  # (K,)
    first = (length.cumsum(0) - length)[seq]  # (K,) index of its sequence's first token
    return seq, torch.arange(seq.shape[0], device=length.device) - first


def pack(ids: torch.Tensor, attn: torch.Tensor, drop_last: bool = False) -> Packed:
    """Pack a padded batch (B, T) whose attended tokens (attn = 1) form one contiguous run per row.
    drop_last: leave out each sequence's last token, for passes that read no output at it (its key
    and value only serve its own query, so no other output changes)."""
    B, T = ids.shape
    dev = ids.device
    length = attn.sum(1)  # (B,)
    if drop_last:
        length = (length - 1).clamp(min=0)
    starts = torch.where(attn.bool().any(1), attn.long().argmax(1), 0)  # (B,) first attended column
    row, offset, seq, j, dst, mask = _rows(length)
    R, L = mask.shape[0], mask.shape[-1]
    input_ids = torch.zeros((R, L), dtype=ids.dtype, device=dev)
    input_ids[dst] = ids[seq, starts[seq] + j]
    position_ids = torch.zeros((R, L), dtype=torch.long, device=dev)
    position_ids[dst] = j
    return Packed(input_ids, position_ids, mask, row, offset, starts, length)


def _rows(length: torch.Tensor, keys_per_position: int = 1024):
    """The packed layout (`_layout`) of sequences of `length` (B,) tokens: each sequence's row and offset
    (B,), each real token's sequence and index within it (K,), its packed coordinates `dst` (rows, cols),
    and the (R, 1, L, L) block-diagonal causal mask."""
    place, rows_used, L = _layout(length.tolist(), keys_per_position)
    row = torch.tensor([r for r, _ in place], device=length.device)  # (B,)
    offset = torch.tensor([o for _, o in place], device=length.device)  # (B,)
    seq, j = token_index(length)
    dst = (row[seq], offset[seq] + j)  # packed coordinates of each real token
    return row, offset, seq, j, dst, _block_mask(dst, offset[seq], len(rows_used), L)


def _block_mask(dst: tuple[torch.Tensor, torch.Tensor], first: torch.Tensor, R: int, L: int) -> torch.Tensor:
    """(R, 1, L, L) bool: a query sees the keys from its sequence's first token (`first`, the packed
    column of the first token of each real token's sequence, at packed coordinates `dst`) up to
    itself; a pad only itself."""
    cols = torch.arange(L, device=first.device)
    lo = cols.expand(R, L).clone()  # (R, L) first visible key per query
    lo[dst] = first
    return ((cols[None, None, :] >= lo[:, :, None]) & (cols[None, None, :] <= cols[None, :, None]))[:, None]


def hidden_states(model: torch.nn.Module, pk: Packed) -> torch.Tensor:
    """(R, L, d) last hidden states of the trunk (no vocabulary / scalar head)."""
    trunk = getattr(model, model.base_model_prefix)
    return trunk(input_ids=pk.input_ids, attention_mask=pk.mask, position_ids=pk.position_ids,
                 use_cache=False).last_hidden_state


def _lean(trunk: torch.nn.Module) -> bool:
    """Whether hidden_at can run `trunk` layer by layer itself: a Hugging Face Llama trunk whose last
    layer is not FSDP-sharded (hidden_at calls that layer's parts directly, which would bypass the
    hooks FSDP gathers its weights and reduces its gradients in)."""
    from transformers.models.llama.modeling_llama import LlamaModel
    if not (type(trunk) is LlamaModel and len(trunk.layers) == trunk.config.num_hidden_layers > 0):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return True
    return not isinstance(trunk.layers[-1], FSDPModule)


def hidden_at(model: torch.nn.Module, pk: Packed, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(*rows.shape, d) last hidden states of the trunk at packed positions (rows, cols) of real
    tokens. For a Llama trunk the last layer computes its queries, attention output and MLP only at
    these positions (every layer before it needs all real tokens: their keys and values feed the next
    layer), and the layers before it run their norms, projections and MLP on the real tokens alone
    (the padding of the packed rows enters only the attention, as zeros it never attends to); the
    numbers are those of `hidden_states(model, pk)[rows, cols]` up to float rounding."""
    trunk = getattr(model, model.base_model_prefix)
    if not _lean(trunk):
        return hidden_states(model, pk)[rows, cols]
    R, L = pk.input_ids.shape
    if _flat(trunk):  # every layer but the last on the real tokens alone
        real = real_index(pk)  # (K,)
        x = trunk.embed_tokens(pk.input_ids.reshape(-1)[real])  # (K, d)
        cos, sin = trunk.rotary_emb(x[None], position_ids=pk.position_ids.reshape(-1)[real][None])  # (1, K, hd) each
        *_, dst, mask = _rows(pk.length, keys_per_position=46)  # rows laid out for the attention alone
        at = dst[0] * mask.shape[-1] + dst[1]  # (K,) flat index of each real token in those rows
        for layer in trunk.layers[:-1]:
            x = _flat_layer(layer, x, cos[0], sin[0], at, mask)
        h = x.new_zeros(R * L, x.shape[-1]).index_copy(0, real, x).view(R, L, -1)  # (R, L, d), pads 0
        cos, sin = trunk.rotary_emb(h, position_ids=pk.position_ids)  # (R, L, hd) each
    else:
        h = trunk.embed_tokens(pk.input_ids)  # (R, L, d)
        cos, sin = trunk.rotary_emb(h, position_ids=pk.position_ids)  # (R, L, hd) each
        for layer in trunk.layers[:-1]:
            h = layer(h, attention_mask=pk.mask, position_ids=pk.position_ids, position_embeddings=(cos, sin))
    uniq, inv = torch.unique(rows * L + cols, return_inverse=True)  # distinct positions, sorted by row
    qr, qc = uniq // L, uniq % L  # (Q,)
    count = torch.bincount(qr, minlength=R)  # (R,) queries per packed row
    slot = torch.arange(qr.shape[0], device=qr.device) - (count.cumsum(0) - count)[qr]  # (Q,) index within its row
    grid = torch.zeros((R, int(count.max())), dtype=torch.long, device=qr.device)  # (R, M) query columns per row;
    grid[qr, slot] = qc  # unused slots query column 0, which is always valid, and are dropped
    out = trunk.norm(_last_layer_at(trunk.layers[-1], h, cos, sin, pk.mask, grid))  # (R, M, d)
    return out[qr, slot][inv]


def real_index(pk: Packed) -> torch.Tensor:
    """(K,) flat indices into the (R·L) grid of the packed real tokens, sequence by sequence."""
    seq, j = token_index(pk.length)
    return pk.row[seq] * pk.input_ids.shape[1] + pk.offset[seq] + j


def _flat(trunk: torch.nn.Module) -> bool:
    """Whether hidden_at may call the parts of every layer itself (no layer is FSDP-sharded, which
    gathers weights in the layer's hooks, and no gradient checkpointing, which lives in its call)."""
    if trunk.training and getattr(trunk, "gradient_checkpointing", False):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return True
    return not any(isinstance(layer, FSDPModule) for layer in trunk.layers)


def _flat_layer(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                at: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K, d) a Llama decoder layer's output on the real tokens x (K, d): LlamaDecoderLayer.forward
    with the norms, projections, rotary and MLP on the K real tokens only (no work on padding), and the
    attention on packed rows (R, L) whose block-diagonal causal `mask` is (R, 1, L, L), token i at flat
    index at[i] of the (R·L) grid. cos, sin: (K, hd)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
    attn = layer.self_attn
    R, L = mask.shape[0], mask.shape[-1]
    K, hd = x.shape[0], attn.head_dim
    H, Hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    y = layer.input_layernorm(x)  # (K, d)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)  # one matmul for the three, one rotary for q and k together
    if all(type(m) is torch.nn.Linear for m in projs):  # (a LoRA layer adds its adapters in its own call)
        bias = None if attn.q_proj.bias is None else torch.cat([m.bias for m in projs])
        qkv = F.linear(y, torch.cat([m.weight for m in projs]), bias).view(K, H + 2 * Hkv, hd)  # (K, H+2Hkv, hd)
    else:
        qkv = torch.cat([m(y) for m in projs], 1).view(K, H + 2 * Hkv, hd)
    qk = qkv[:, :H + Hkv]
    qkv = torch.cat([qk * cos[:, None] + rotate_half(qk) * sin[:, None], qkv[:, H + Hkv:]], 1)  # apply_rotary_pos_emb
    grid = qkv.new_zeros(R * L, H + 2 * Hkv, hd).index_copy(0, at, qkv).view(R, L, -1, hd).transpose(1, 2)  # (R, H+2Hkv, L, hd), pads 0
    q, k, v = grid.split([H, Hkv, Hkv], dim=1)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    o, _ = interface(attn, q, k, v, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                     scaling=attn.scaling)  # (R, L, H, hd)
    x = x + attn.o_proj(o.reshape(R * L, -1).index_select(0, at))  # (K, d)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _last_layer_at(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(R, M, d) a Llama decoder layer's output at the query columns `grid` (R, M) of each packed row,
    with keys and values at every position of h (R, L, d): LlamaDecoderLayer.forward, restricted."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
    attn = layer.self_attn
    R, L, _ = h.shape
    M = grid.shape[1]
    at = torch.arange(R, device=h.device)[:, None], grid  # (R, M) index pair
    x = layer.input_layernorm(h)  # (R, L, d)
    q = attn.q_proj(x[at]).view(R, M, -1, attn.head_dim).transpose(1, 2)  # (R, H, M, hd)
    k = attn.k_proj(x).view(R, L, -1, attn.head_dim).transpose(1, 2)  # (R, Hkv, L, hd)
    v = attn.v_proj(x).view(R, L, -1, attn.head_dim).transpose(1, 2)  # (R, Hkv, L, hd)
    q = q * cos[at][:, None] + rotate_half(q) * sin[at][:, None]  # apply_rotary_pos_emb, queries at `grid`
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    o, _ = interface(attn, q, k, v, mask[:, 0][at][:, None],  # mask (R, 1, M, L)
                     dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling)  # (R, M, H, hd)
    h = h[at] + attn.o_proj(o.reshape(R, M, -1))  # (R, M, d)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def cut(pk: Packed, max_len: int) -> Packed:
    """`pk` with each sequence cut to its last `max_len` tokens (`model.heads.fit_answer`), packed anew."""
    seq, j = token_index(pk.length)
    drop = (pk.length - max_len).clamp(min=0)  # (B,)
    keep = j >= drop[seq]  # (K,)
    src = pk.input_ids[pk.row[seq][keep], (pk.offset[seq] + j)[keep]]  # (K',) kept tokens, sequence by sequence
    length = pk.length - drop
    row, offset, _, j, dst, mask = _rows(length)
    input_ids = torch.zeros(mask.shape[0], mask.shape[-1], dtype=pk.input_ids.dtype, device=src.device)
    input_ids[dst] = src
    position_ids = torch.zeros_like(input_ids)
    position_ids[dst] = j
    return Packed(input_ids, position_ids, mask, row, offset, pk.start + drop, length)


def lm_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, counted tokens) as `losses.lm_loss` gives on the padded batch's logits, computed
    padding-free, with the vocabulary head run only where a label is predicted."""
    pk = pack(input_ids, attention_mask)
    R, L = pk.input_ids.shape
    packed_labels = torch.full((R, L), ignore_index, dtype=labels.dtype, device=labels.device)
    for b in range(input_ids.shape[0]):
        n, s0, r, o = int(pk.length[b]), int(pk.start[b]), int(pk.row[b]), int(pk.offset[b])
        packed_labels[r, o + 1: o + n] = labels[b, s0 + 1: s0 + n]  # a sequence's first token is never predicted
    target = packed_labels[:, 1:]  # (R, L-1) label predicted by position i
    keep = target != ignore_index
    h = hidden_at(model, pk, *keep.nonzero(as_tuple=True))  # (K, d), in the row-major order of keep
    logits = model.get_output_embeddings()(h).float()  # (K, V)
    nll = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return nll, keep.sum()
