"""Chat feedback bound to what the server served: the record of served answers, the per-client rate
limit on ratings, and the feedback store the ratings go to.

A rating (`POST /v1/feedback`) names an answer by its completion id and choice index; the prompt,
the answer, the model, the sampling settings and the user it stores come from `ServedAnswers`,
the server's own record of what it returned, never from the client.

Why an in-memory record and not a signature (an HMAC over the answer, sent back with the rating):
the client sends only an id, not the whole conversation again; there is no key to keep secret or
rotate; and the record also knows what no client could prove (that a choice was the moderation
policy's safe message). The cost: an answer can be rated only while the server remembers it (the
last `max_records` answers, for `max_age_s` seconds, and not across a restart); its memory is
bounded by `max_chars` characters of text (serve.served_max_chars), whatever the requests' sizes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from cherrytop.serve import protocol as P


@dataclass(frozen=True)
class Served:
    """One completion as the server returned it."""
    messages: tuple[dict, ...]
    """The conversation the model answered ({"role", "content"} dicts)."""
    answers: tuple[str, ...]
    """Each choice's text as returned (the safe message for a blocked one)."""
    blocked: tuple[bool, ...]
    """Per choice: True when moderation replaced the answer with the safe message."""
    settings: dict
    """The sampling parameters actually used (known fields only)."""
    user: str | None
    """The `user` the chat request named (OpenAI's end-user id)."""
    client: str
    """Who asked (API key or address): with API keys on, only the same key may rate it."""


class ServedAnswers:
    """The last `max_records` completions served, each for `max_age_s` seconds (thread-safe)."""

    def __init__(self, max_records: int, max_age_s: float, max_chars: int = 64 * 2**20):
        self.max_records, self.max_age_s, self.max_chars = max_records, max_age_s, max_chars
        self._records: OrderedDict[str, tuple[float, Served]] = OrderedDict()  # (time.monotonic(), record), oldest first
        self._chars = 0  # text held by the records: a flood of large requests pushes the oldest out
        self._lock = threading.Lock()

    @staticmethod
    def _size(served: Served) -> int:
        return sum(len(m["content"]) for m in served.messages) + sum(len(a) for a in served.answers)

    def add(self, cid: str, served: Served) -> None:
        with self._lock:
            if cid in self._records:
                self._chars -= self._size(self._records.pop(cid)[1])
            self._records[cid] = (time.monotonic(), served)
            self._chars += self._size(served)
            self._expire()

    def get(self, cid: str) -> Served | None:
        with self._lock:
            self._expire()
            rec = self._records.get(cid)
            return rec[1] if rec else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _expire(self) -> None:
        limit = time.monotonic() - self.max_age_s
        while self._records and (len(self._records) > self.max_records or self._chars > self.max_chars
                                 or next(iter(self._records.values()))[0] < limit):
            self._chars -= self._size(self._records.popitem(last=False)[1][1])


class RateLimit:
    """At most `per_minute` events per client in any 60 s window (thread-safe); clients idle for a
    minute are forgotten, so the table holds only the last minute's clients."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, client: str) -> float | None:
        """Count one event; None if allowed, else the seconds until the client may try again."""
        now = time.monotonic()
        with self._lock:
            if len(self._hits) > 10_000:  # many clients: drop those with nothing in the window
                self._hits = {c: h for c, h in self._hits.items() if h and h[-1] > now - 60}
            hits = self._hits.setdefault(client, deque())
            while hits and hits[0] <= now - 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return hits[0] + 60 - now
            hits.append(now)
            return None


class FeedbackSink:
    """The feedback app's store (cherrytop.feedback.store), opened on first use."""

    def __init__(self, url: str | None, labels_needed: int = 2):
        self.url, self.labels_needed = url, labels_needed
        self._store = None
        self._lock = threading.Lock()

    def add(self, **kwargs) -> int:
        with self._lock:
            if self._store is None:
                if not self.url:
                    raise P.APIError(503, "Feedback is not enabled on this server.", type="server_error")
                try:
                    from cherrytop.feedback.store import open_store
                    self._store = open_store(self.url, self.labels_needed)
                except (ImportError, ValueError) as e:  # no driver, server down, not a database URL, ...
                    raise P.APIError(503, f"The feedback store is not available: {e}", type="server_error") from None
        try:
            return self._store.add_chat_feedback(**kwargs)
        except ValueError as e:  # the store's checks: the conversation must end with a user message, ...
            text = str(e).lstrip("'")
            param = next((k for k in ("conversation_id", "comment") if text.startswith(k)), None)
            raise P.APIError(400, f"This answer cannot be rated: {e}", param=param) from None
