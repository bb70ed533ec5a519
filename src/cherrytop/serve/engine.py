"""Dynamic batching: one background thread runs a single generation loop for every request.

Each step, requests waiting in the bounded queue join the running batch: their prompts are
prefilled together (left-padded, `rollout.sampler.left_pad`) and their KV cache is merged into the
batch's cache (left-padded to a common length, so every row keeps its own positions and attention
mask). Then every running sequence advances by one token in one forward pass. Rows that finish
(EOS, a stop string, their token budget, a moderation block) or whose client went away leave the
batch at once, and their slot goes to the next waiting request.

Sampling per row follows `rollout.sampler.sample` (temperature 0 = greedy, top-p via its
`_filter_top_p`), but each choice draws from its own `torch.Generator`, so a request with a `seed`
gets the same answer whatever else is in the batch.

The engine speaks to the web layer through `Job.sink`, called from the engine thread with
`Delta`, `Finish` and `Done` events; `Engine.submit` raises `QueueFull` when the server is at
capacity instead of letting a request wait without bound, or when the job's client (`Job.client`)
already holds its share of the slots (`max_per_client`), so one client cannot take every slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from cherrytop.rollout.sampler import _filter_top_p, left_pad

log = logging.getLogger("cherrytop.serve")


class QueueFull(Exception):
    """The server already holds max_batch + max_queue requests (`mine` False), or the job's client
    already holds max_per_client of them (`mine` True)."""

    def __init__(self, mine: bool = False):
        super().__init__("client share full" if mine else "queue full")
        self.mine = mine


@dataclass(frozen=True)
class Params:
    """How one request samples."""
    max_tokens: int
    """Most tokens per choice (already cut to the context window)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    n: int = 1
    """Choices (independent samples) for this prompt."""
    stop: tuple[str, ...] = ()
    """Strings that end a choice; the answer is cut before the first one."""
    seed: int | None = None
    """Seed of the choices' generators; None = fresh randomness."""


@dataclass
class Delta:
    index: int
    """Choice index."""
    text: str
    """New text of that choice."""


@dataclass
class Finish:
    index: int
    """Choice index."""
    reason: str
    """stop | length | content_filter | cancelled."""
    category: str | None = None
    """The moderation category when reason is content_filter."""


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    """Set when generation failed (the engine logged the traceback)."""


Event = Delta | Finish | Done


@dataclass
class Job:
    """One chat-completion request as the engine sees it."""
    prompt_ids: list[int]
    params: Params
    sink: Callable[[Event], None]
    """Receives the job's events, called from the engine thread."""
    moderate: Callable[[str, bool], str | None] | None = None
    """(answer so far, final) -> blocked category or None; called before text is released."""
    withhold: Callable[[str], int] | None = None
    """(unfinished answer so far) -> characters at its end that moderation must see more of before
    they are released."""
    client: str | None = None
    """Who asked (API key or address), for the per-client share of the slots; None = not counted."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away; the engine drops the job's rows at its next step."""
    done: bool = False
    """True once `Done` was sent."""
    completion_tokens: int = 0
    """Tokens sampled for all choices so far (EOS included)."""
    unfinished: int = 0
    """Choices still generating."""


@dataclass
class _Row:
    """One choice being generated."""
    job: Job
    index: int
    gen: torch.Generator | None
    budget: int
    pos: int
    """Position id of the token the row feeds next."""
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    """Characters of the answer already sent."""
    finished: str | None = None


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may still become a stop string (or a split character)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    while keep < len(text) and text[len(text) - keep - 1] == "\ufffd":  # an incomplete UTF-8 sequence
        keep += 1
    return keep


def _pad_cache(cache: DynamicCache, left: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values), (B, H, T, D), with `left` zero columns in front."""
    out = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if left:
            k = torch.nn.functional.pad(k, (0, 0, left, 0))
            v = torch.nn.functional.pad(v, (0, 0, left, 0))
        out.append((k, v))
    return out


class Engine:
    """The generation loop over one model; thread-safe `submit` / `cancel`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 16,
                 max_queue: int = 64, max_per_client: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"serve.max_batch must be >= 1 and serve.max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_per_client = max_per_client or max_batch + max_queue
        self._per_client: dict[str, int] = {}  # client -> its jobs queued or running
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        cfg = model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.device = next(model.parameters()).device
        self._queue: deque[Job] = deque()
        self._jobs_running = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        # the running batch
        self._rows: list[_Row] = []
        self._joining: list[Job] = []  # admitted, rows not made yet (a failed prefill must fail them too)
        self._cache: DynamicCache | None = None
        self._attn: torch.Tensor | None = None  # (B, T) 1 on real tokens
        self._next: torch.Tensor | None = None  # (B,) the token each row feeds next
        self.stats = {"steps": 0, "tokens": 0, "completed": 0, "cancelled": 0, "max_rows": 0, "rejected": 0}

    # ---- public, any thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cherrytop-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_batch + max_queue requests are already in."""
        job.unfinished = job.params.n
        with self._cond:
            if len(self._queue) + self._jobs_running >= self.max_batch + self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull()
            if job.client is not None:
                if self._per_client.get(job.client, 0) >= self.max_per_client:
                    self.stats["rejected"] += 1
                    raise QueueFull(mine=True)
                self._per_client[job.client] = self._per_client.get(job.client, 0) + 1
            self._queue.append(job)
            self._cond.notify()

    def _release(self, job: Job) -> None:
        """The job is over: mark it done and give its client's slot back (caller holds no lock)."""
        job.done = True
        if job.client is not None:
            with self._cond:
                left = self._per_client.pop(job.client, 1) - 1
                if left > 0:
                    self._per_client[job.client] = left

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); its rows leave the batch at the next step."""
        if not job.done:
            job.cancelled.set()
            with self._cond:
                self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "running": self._jobs_running, "rows": len(self._rows), **self.stats}

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._rows:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the server
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {e}")

    def _admit(self) -> list[Job]:
        jobs: list[Job] = []
        with self._cond:
            rows = len(self._rows)
            while self._queue:
                job = self._queue[0]
                if job.cancelled.is_set():
                    self._queue.popleft()
                    self._finish_job(job, cancelled=True)
                    continue
                if rows and rows + job.params.n > self.max_batch:
                    break
                self._queue.popleft()
                self._jobs_running += 1
                jobs.append(job)
                rows += job.params.n
        return jobs

    def _step(self) -> None:
        self._drop_cancelled()
        jobs = self._joining = self._admit()
        logits = []
        if self._rows:  # advance the running batch by one token
            attn = torch.cat([self._attn, torch.ones_like(self._attn[:, :1])], 1)
            pos = torch.tensor([[r.pos] for r in self._rows], device=self.device)
            out = self.model(input_ids=self._next[:, None], attention_mask=attn, position_ids=pos,
                             past_key_values=self._cache, use_cache=True)
            self._cache, self._attn = out.past_key_values, attn
            for r in self._rows:
                r.pos += 1
            logits.append(out.logits[:, -1, :].float())
        if jobs:  # prefill the newcomers together and merge their cache into the batch's
            ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=DynamicCache(),
                             use_cache=True)
            repeat = torch.tensor([i for i, j in enumerate(jobs) for _ in range(j.params.n)], device=self.device)
            new_cache = out.past_key_values
            new_cache.batch_select_indices(repeat)
            self._merge(new_cache, mask[repeat])
            logits.append(out.logits[:, -1, :].float()[repeat])
            for j in jobs:
                for i in range(j.params.n):
                    gen = None
                    if j.params.temperature > 0:
                        gen = torch.Generator(device=self.device)
                        if j.params.seed is None:
                            gen.seed()
                        else:
                            gen.manual_seed((j.params.seed * 1_000_003 + i) % 2**63)
                    self._rows.append(_Row(j, i, gen, j.params.max_tokens, len(j.prompt_ids)))
        self._joining = []
        if not logits:
            return
        logits = torch.cat(logits, 0)  # (B, V)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        toks = self._sample(logits)
        self._next = torch.tensor(toks, device=self.device)
        for r, t in zip(self._rows, toks):
            self._advance(r, t)
        self._drop([i for i, r in enumerate(self._rows) if r.finished])

    def _sample(self, logits: torch.Tensor) -> list[int]:
        """One token per row with the row's temperature, top-p and generator (as sampler.sample)."""
        toks = []
        for b, r in enumerate(self._rows):
            p = r.job.params
            if p.temperature > 0:
                # (shifted so the largest is 0: a tiny temperature gives -inf, never inf - inf = nan)
                scaled = (logits[b: b + 1] - logits[b].max()) / p.temperature  # (1, V)
                filtered = _filter_top_p(scaled, p.top_p) if p.top_p < 1.0 else scaled
                toks.append(int(torch.multinomial(filtered.softmax(-1), 1, generator=r.gen)))
            else:
                toks.append(int(logits[b].argmax()))
        return toks

    def _advance(self, r: _Row, tok: int) -> None:
        """Take one sampled token: stop strings, moderation, budget; release the text that is safe."""
        job = r.job
        job.completion_tokens += 1
        self.stats["tokens"] += 1
        if tok == self.eos_id:
            reason = "stop"
        else:
            r.ids.append(tok)
            reason = "length" if len(r.ids) >= r.budget else None
        text = self.tok.decode(r.ids, skip_special_tokens=True).lstrip()
        stops = job.params.stop
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if job.moderate is not None:
            category = job.moderate(text, reason is not None)
            if category is not None:
                self._finish_row(r, "content_filter", category)
                return
        release = len(text) if reason else len(text) - max(_holdback(text, stops),
                                                           job.withhold(text) if job.withhold else 0)
        if release > r.emitted:
            job.sink(Delta(r.index, text[r.emitted: release]))
            r.emitted = release
        if reason:
            self._finish_row(r, reason)

    def _finish_row(self, r: _Row, reason: str, category: str | None = None) -> None:
        r.finished = reason
        r.job.sink(Finish(r.index, reason, category))
        r.job.unfinished -= 1
        if r.job.unfinished == 0:
            with self._cond:
                self._jobs_running -= 1
            self._finish_job(r.job, cancelled=reason == "cancelled")

    def _finish_job(self, job: Job, cancelled: bool = False, error: str | None = None) -> None:
        self._release(job)
        self.stats["cancelled" if cancelled else "completed"] += 1
        job.sink(Done(len(job.prompt_ids), job.completion_tokens, error))

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.job.cancelled.is_set()]
        for i in gone:
            self._finish_row(self._rows[i], "cancelled")
        self._drop(gone)

    # ---- the batch's KV cache ---------------------------------------------------------------------

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows (their cache and (B', T') mask) to the batch, left-padding to a common length."""
        if not self._rows:
            self._cache, self._attn = cache, mask
            return
        T, T2 = self._attn.shape[1], mask.shape[1]
        L = max(T, T2)
        old, new = _pad_cache(self._cache, L - T), _pad_cache(cache, L - T2)
        self._cache = DynamicCache(ddp_cache_data=[(torch.cat([k1, k2]), torch.cat([v1, v2]))
                                                   for (k1, v1), (k2, v2) in zip(old, new)])
        pad = torch.nn.functional.pad
        self._attn = torch.cat([pad(self._attn, (L - T, 0)), pad(mask, (L - T2, 0))])

    def _drop(self, idx: list[int]) -> None:
        """Remove rows from the batch, then the leading columns no remaining row attends to."""
        if not idx:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(idx)]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._attn = self._next = None
            return
        sel = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(sel)
        self._attn, self._next = self._attn[sel], self._next[sel]
        first = int(self._attn.any(0).long().argmax())
        if first > 0:
            self._attn = self._attn[:, first:]
            self._cache = DynamicCache(ddp_cache_data=[(k[:, :, first:], v[:, :, first:])
                                                       for k, v in _pad_cache(self._cache, 0)])

    def _fail_all(self, message: str) -> None:
        rows, self._rows = self._rows, []
        self._cache = self._attn = self._next = None
        failed = {id(j): j for j in [*(r.job for r in rows), *self._joining] if not j.done}
        self._joining = []
        for job in failed.values():
            with self._cond:
                self._jobs_running -= 1
            self._release(job)
            job.sink(Done(len(job.prompt_ids), job.completion_tokens, message))


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing is queued or running (for tests and benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.load()
        if not s["queued"] and not s["running"]:
            return True
        time.sleep(0.01)
    return False
