"""Batched sampling with a KV cache: left-padded prompts, temperature / top-p / greedy, stop at
EOS, early exit when every row has stopped. Returns tokens and their log-probabilities so PPO can
use the same path. The prompt pass runs padding-free (rollout.packing) and the cache is preallocated
(written in place, not grown by concatenation) where the model allows. On a GPU the host never waits
for the device inside the loop (`StopCheck`), and the one-token decoding step can run compiled
(`compiled=True`: transformers' own `torch.compile`d call, CUDA graphs with its default
"reduce-overhead" mode) on the preallocated cache."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from cherrytop.data.tokenizer import encode_prompt
from cherrytop.rollout import packing


@dataclass
class Samples:
    """One batch of sampled continuations."""
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """(B, P) 1 on real prompt tokens."""
    tokens: torch.Tensor
    """(B, N) sampled tokens, pad after EOS."""
    logprobs: torch.Tensor
    """(B, N) log π(token) under the sampling distribution's temperature (0 after EOS)."""
    mask: torch.Tensor
    """(B, N) 1 on generated tokens up to and including EOS."""
    has_eos: torch.Tensor
    """(B,) whether the row stopped at EOS within the budget."""
    entropy: torch.Tensor | None = None
    """(B, N) entropy of the next-token distribution at temperature T (before top-p), 0 after EOS."""


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)  # (B, P)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, P - len(s):] = torch.tensor(list(s))
            mask[b, P - len(s):] = 1
    return ids, mask


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) one token per row from unnormalised `probs` (B, V), by inverting the CDF at one uniform
    number per row: the same distribution as torch.multinomial, which draws V exponentials per row."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)  # first cdf > u


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask out tokens outside the smallest set whose probability reaches top_p."""
    sorted_logits, idx = torch.sort(logits, descending=True)  # (B, V)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


class _OneDtypeLayer(StaticLayer):
    """A preallocated cache layer (HF StaticLayer) that stores keys and values in one dtype, cast on the
    way in. Under bf16 autocast the rotated keys arrive as float32 and the values as bf16, and
    StaticLayer keeps the first one's dtype for both; attention rounds both to bf16 anyway, so storing
    them in bf16 gives the same numbers as keeping the float32 keys (in a DynamicCache), in half the memory."""

    def __init__(self, max_cache_len: int, dtype: torch.dtype):
        super().__init__(max_cache_len)
        self.store = dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.to(self.store), value_states.to(self.store), *args, **kwargs)


def _cache(model: torch.nn.Module, max_len: int, device: torch.device, reuse_for: int | None = None):
    """A KV cache preallocated for `max_len` positions and written in place (HF StaticCache), where the
    model's layers are all full attention, storing keys and values in the autocast dtype under autocast;
    a cache that grows by concatenation otherwise. `reuse_for` (a batch size; for the compiled step):
    the model's last preallocated cache of the same size, zeroed, as transformers' generate keeps its
    own: CUDA graphs are recorded on the cache's memory, which a new cache would make them record again."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
    if getattr(model.config, "sliding_window", None) is not None or set(layer_types) != {"full_attention"}:
        return DynamicCache()
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (reuse_for, max_len, dtype, device)
    kept = getattr(model, "_decode_cache", None)
    if reuse_for is not None and kept is not None and kept[0] == key:
        kept[1].reset()
        return kept[1]
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if dtype is not None:
        cache.layers = [_OneDtypeLayer(max_len, dtype) for _ in cache.layers]
    if reuse_for is not None:
        model._decode_cache = (key, cache)
    return cache


class StopCheck:
    """Whether every row has stopped. On CPU it is read at once. On a GPU reading it would stall the host
    until the device catches up, every token, so the flag is copied to pinned host memory without
    waiting and read one step later (as transformers' DeferredStopCheck does on MPS): the loop runs at
    most one decoding step more, whose all-padding column the caller drops."""

    def __init__(self, device: torch.device, deferred: bool | None = None):
        self.cuda = device.type == "cuda"
        self.deferred = self.cuda if deferred is None else deferred
        """Read one step late (the default on a GPU; on CPU only to test it)."""
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None  # the last step's flag, in flight

    def __call__(self, alive: torch.Tensor) -> bool:
        """Whether every row had stopped, by this step (on CPU) or by the step before (deferred)."""
        if not self.deferred:
            return not bool(alive.any())
        flag = torch.empty((), dtype=torch.bool, pin_memory=self.cuda)
        flag.copy_(~alive.any(), non_blocking=True)
        done = torch.cuda.Event() if self.cuda else None
        if done is not None:
            done.record()
        last, self.pending = self.pending, (flag, done)
        if last is None:
            return False
        if last[1] is not None:
            last[1].synchronize()  # recorded a step ago: the device is a step ahead, the host does not stall
        return bool(last[0])


COMPILED_PROMPT_MULTIPLE = 64
"""With a compiled decoding step, prompts are left-padded to a multiple of this many tokens: the cache
and mask sizes (P + max_new_tokens) then repeat across batches, and so does the compiled graph (every
new size compiles again, ~10 s)."""


def wants_compile(setting: str, device: torch.device) -> bool:
    """`ppo.compile_decode` ("auto" | "on" | "off") on `device`: auto compiles on a GPU only."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def decoder(model: torch.nn.Module, compiled: bool, static: bool) -> Callable:
    """The callable the one-token decoding steps go through: with `compiled` and a preallocated cache,
    transformers' compiled call of the model (`get_compiled_call`: torch.compile, mode "reduce-overhead",
    which captures CUDA graphs on a GPU; compiled once per model and shape), else the model itself."""
    if compiled and static and hasattr(model, "get_compiled_call"):
        step = model.get_compiled_call(None)

        def call(**kw):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten now
            return step(**kw)
        return call
    return model


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (Hugging Face causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _prefill(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, attn: torch.Tensor,
             pos: torch.Tensor, cache) -> torch.Tensor:
    """(B, V) float32 next-token logits after each left-padded prompt, with the prompts' keys and values
    written to `cache` at their padded columns (zeros at the padding, which the mask hides). Padding-free
    (rollout.packing) where the model allows: the packed pass's keys and values are scattered to the
    padded layout; the padded pass otherwise, with the vocabulary head at the last position only."""
    B, P = prompt_ids.shape
    if not (packing.supports_packing(model) and bool(prompt_mask.any(1).all())):
        keep = {"logits_to_keep": 1} if _keeps_logits(model) else {}
        out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True, **keep)
        return out.logits[:, -1, :].float()
    pk = packing.pack(prompt_ids, prompt_mask)
    packed = DynamicCache()
    trunk = getattr(model, model.base_model_prefix)
    h = trunk(input_ids=pk.input_ids, attention_mask=pk.mask, position_ids=pk.position_ids, past_key_values=packed,
              use_cache=True).last_hidden_state  # (R, L, d)
    logits = model.get_output_embeddings()(h[pk.row, pk.offset + pk.length - 1]).float()  # (B, V)
    seq, j = packing.token_index(pk.length)  # every real prompt token
    src = pk.row[seq], pk.offset[seq] + j  # its packed (row, column)
    dst = seq, P - pk.length[seq] + j  # its left-padded (row, column)
    for i, layer in enumerate(packed.layers):
        kv = []
        for x in (layer.keys, layer.values):  # (R, H, L, hd)
            y = x.new_zeros((B, x.shape[1], P, x.shape[3]))  # (B, H, P, hd)
            y[dst[0], :, dst[1]] = x[src[0], :, src[1]]
            kv.append(y)
        cache.update(*kv, i)
    return logits


@torch.no_grad()
def sample(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, all_stopped: Callable[[bool], bool] | None = None,
           compiled: bool = False) -> Samples:
    """Sample up to `max_new_tokens` per row; temperature 0 is greedy. `all_stopped(this process's rows
    have stopped)` -> whether every process's have: with a sharded model (FSDP) all processes must
    run as many forward passes, so a process whose rows have stopped decodes padding until then.
    `compiled`: the decoding steps run through `decoder` (same tokens and log-probs up to rounding),
    on prompts left-padded to a multiple of COMPILED_PROMPT_MULTIPLE (the returned prompts are not)."""
    given = prompt_ids, prompt_mask
    if compiled and (extra := -prompt_ids.shape[1] % COMPILED_PROMPT_MULTIPLE):
        prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0))
    B, P = prompt_ids.shape
    device = prompt_ids.device
    cache = _cache(model, P + max_new_tokens, device, reuse_for=B if compiled else None)
    static = isinstance(cache, StaticCache)
    step = decoder(model, compiled, static)
    stop = StopCheck(device, deferred=None if all_stopped is None else False)
    attn = torch.zeros((B, P + max_new_tokens), dtype=prompt_mask.dtype, device=device)  # (B, P+N) grows by a column a step
    attn[:, :P] = prompt_mask
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P) positions ignore left padding
    logits = _prefill(model, prompt_ids, prompt_mask, attn if static else attn[:, :P], pos, cache)  # (B, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    has_eos = torch.zeros(B, dtype=torch.bool, device=device)
    entropy = torch.zeros((B, max_new_tokens), device=device)
    for t in range(max_new_tokens):
        if temperature > 0:
            scaled = logits / temperature
            logp_all = scaled.log_softmax(-1)
            filtered = _filter_top_p(scaled, top_p) if top_p < 1.0 else scaled
            tok = _draw(filtered.softmax(-1), generator)  # (B,)
        else:
            logp_all = logits.log_softmax(-1)
            tok = logits.argmax(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        tokens[:, t] = tok
        logprobs[:, t] = torch.where(alive, logp_all.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        entropy[:, t] = torch.where(alive, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        mask[:, t] = alive.long()
        stopped = alive & (tok == eos_id)
        has_eos |= stopped
        alive &= ~stopped
        if (stop(alive) if all_stopped is None else all_stopped(not alive.any())) or t == max_new_tokens - 1:
            n = int(mask.any(0).sum()) if stop.deferred else t + 1  # deferred: not the all-padding step after
            tokens, logprobs, mask, entropy = tokens[:, :n], logprobs[:, :n], mask[:, :n], entropy[:, :n]
            break
        attn[:, P + t] = 1  # finished rows keep decoding pad, ignored
        out = step(input_ids=tok[:, None], attention_mask=attn if static else attn[:, : P + t + 1], position_ids=next_pos,
                   past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)  # (B, V), not a view of a CUDA graph's output
        del out
        next_pos = next_pos + 1
    return Samples(*given, tokens, logprobs, mask, has_eos, entropy)


def fit_history(tokenizer, messages: Sequence[dict], window: int | None, room: int = 1) -> list[dict]:
    """A chat's messages (ending with the user's turn) cut to fit the model's context `window` with
    `room` tokens left to answer in: the oldest turns are dropped (a leading system message is kept)
    until the rendered prompt fits. A last user message that cannot fit even alone is a ValueError
    saying how long it is, so a chat can refuse that one message and go on."""
    messages = list(messages)
    if window is None:
        return messages
    limit = window - max(room, 1)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        n = len(encode_prompt(tokenizer, system + turns))
        if n <= limit:
            return system + turns
        if len(turns) <= 1:
            raise ValueError(f"this message is {n} tokens with the chat template"
                             + (" and the system message" if system else "")
                             + f"; the model's context window of {window} tokens takes at most {limit}")
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # start at a user turn
            turns = turns[1:]


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[dict]], *, max_new_tokens: int = 48,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
             progress: bool = False) -> list[str]:
    """Answers (decoded, without EOS) to chat prompts, in order. Prompts are batched by length."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    iterator = batches
    if progress:
        from rich.progress import track
        iterator = track(batches, description="generating", transient=True)
    for idx in iterator:
        seqs = [encoded[i] for i in idx]
        new = max_new_tokens
        if limit is not None:
            longest = max(len(s) for s in seqs)
            if longest >= limit:
                first = min(i for i in idx if len(encoded[i]) >= limit)
                raise ValueError(f"prompt {first + 1} (of {len(encoded)}) is {len(encoded[first])} tokens with the chat "
                                 f"template and does not fit the model's context window of {limit} tokens")
            new = min(new, limit - longest)
        ids, mask = left_pad(seqs, tokenizer.pad_token_id)
        s = sample(model, ids, mask, max_new_tokens=new, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                   temperature=temperature, top_p=top_p, generator=gen)
        for row, i in enumerate(idx):
            n = int(s.mask[row].sum()) - int(s.has_eos[row])
            answers[i] = tokenizer.decode(s.tokens[row, :n].tolist(), skip_special_tokens=True).strip()
    return answers
