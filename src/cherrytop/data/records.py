"""The records of the recipe and their files: messages, demonstrations, prompts, K-way rankings.

Three record types, frozen dataclasses that validate themselves on construction:
- `Conversation`: a demonstration for SFT  `{"messages": [{"role": ..., "content": ...}, ...]}`
- `Prompt`: a prompt for sampling / PPO, ending with a user message  `{"messages": [...]}` or `{"prompt": "text"}`
- `Comparison`: K responses to one prompt ranked best to worst  [IG §3.5: labelers rank K = 4..9 outputs]
  `{"prompt": {"messages": [...]}, "responses": [...], "ranking": [best, ..., worst], "ties": [[i, j]], ...}`
  or pairwise `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL / Anthropic-HH style), read as K = 2.
Keys a format does not name are kept in `meta` and written back unchanged.
Pretraining documents (`read_documents`) are plain text or `{"text": ...}` / `{"messages": [...]}` records.

A source is a JSONL file, a folder saved by `datasets` (`save_to_disk`; a `DatasetDict` gives its
"train" split), or a folder of data files that `datasets.load_dataset` reads (its "train" split).
Bad input raises `DataError` with one line `<where>: <what is wrong>; expected <what>`, where
`<where>` is `file:line` (1-based physical lines) or `folder: row i` (0-based, as in `dataset[i]`).
Messages are counted from 1; response indices from 0, as the ranking uses them.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROLES = ("system", "user", "assistant")
MIN_K, MAX_K = 2, 9
"""Responses per comparison: at least a pair; at most 9 as in InstructGPT (K = 4..9)."""

# Roles of other chat formats (ShareGPT, HH, Gemini, OpenAI) -> ours, for "did you mean" hints only.
_ROLE_ALIASES = {"human": "user", "prompter": "user", "gpt": "assistant", "bot": "assistant",
                 "model": "assistant", "ai": "assistant", "developer": "system"}

_ROLES_EXPECTED = "one of " + ", ".join(ROLES)
_MESSAGE_SHAPE = '{"role": ..., "content": ...}'
_CONVERSATION_SHAPE = '{"messages": [{"role": ..., "content": ...}, ...]}'
_PROMPT_SHAPE = '{"messages": [..., {"role": "user", "content": ...}]} or {"prompt": "text"}'
_COMPARISON_SHAPE = ('{"prompt": {"messages": [...]}, "responses": [...], "ranking": [best, ..., worst]} '
                     'or {"prompt": ..., "chosen": ..., "rejected": ...}')


class DataError(ValueError):
    """Bad input data. The message is one line: `<where>: <what is wrong>; expected <what>`.

    `DataError("a whole message")` also works; `.at(where)` returns a copy located at `where`.
    """

    def __init__(self, problem: str, expected: str | None = None, where: str | None = None):
        self.problem, self.expected, self.where = problem, expected, where
        msg = problem if expected is None else f"{problem}; expected {expected}"
        super().__init__(msg if where is None else f"{where}: {msg}")

    def at(self, where: str) -> DataError:
        return DataError(self.problem, self.expected, where)


# ---------------------------------------------------------------- small helpers for messages


def _kind(v: Any) -> str:
    """The JSON name of a value's type, with an article: 'a list', 'null', ..."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


def _show(v: Any, limit: int = 40) -> str:
    """A short one-line repr of a value for an error message."""
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _suggest(word: str, options: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    options = list(options)
    low = word.lower().strip() if isinstance(word, str) else ""
    close = [low] if low in options else [aliases[low]] if aliases and low in aliases else \
        difflib.get_close_matches(low, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _index(v: Any) -> int | None:
    """v as an int index if it is a whole number (1 and 1.0, not True), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _check_meta(meta: Any, reserved: tuple[str, ...]) -> dict:
    if not isinstance(meta, dict):
        raise DataError(f"meta is {_kind(meta)}", "an object of extra keys")
    clash = [k for k in reserved if k in meta]
    if clash:
        raise DataError(f"meta has key '{clash[0]}', a field of the record itself",
                        f"extra keys other than {', '.join(reserved)}")
    return dict(meta)


def _freeze(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Message:
    role: str
    """One of "system", "user", "assistant"."""
    content: str
    """The text of the message."""

    def __post_init__(self):
        _check_role_content(self.role, self.content, "message")

    def to_json(self) -> dict:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_json(cls, obj: Any, label: str = "message") -> Message:
        """A Message from `{"role": ..., "content": ...}`; errors say `label` (e.g. "message 2")."""
        if not isinstance(obj, dict):
            raise DataError(f"{label} is {_kind(obj)}, not an object", _MESSAGE_SHAPE)
        for key in ("role", "content"):
            if key not in obj:
                hint = " (ShareGPT-style 'from'/'value'?)" if "from" in obj or "value" in obj else ""
                raise DataError(f"{label} has no '{key}'{hint}", _MESSAGE_SHAPE)
        extra = [k for k, v in obj.items() if k not in ("role", "content") and v is not None]
        if extra:
            raise DataError(f"{label} has unknown key '{extra[0]}'", f"only 'role' and 'content' in {_MESSAGE_SHAPE}")
        _check_role_content(obj["role"], obj["content"], label)
        return cls(obj["role"], obj["content"])


def _check_role_content(role: Any, content: Any, label: str) -> None:
    if not isinstance(role, str):
        raise DataError(f"{label} role is {_kind(role)}, not a string", _ROLES_EXPECTED)
    if role not in ROLES:
        raise DataError(f"{label} has unknown role {_show(role)}{_suggest(role, ROLES, _ROLE_ALIASES)}",
                        _ROLES_EXPECTED)
    if not isinstance(content, str):
        raise DataError(f"{label} content is {_kind(content)}, not a string", "the message text as a string")


def _messages_from_json(value: Any, label: str) -> tuple[Message, ...]:
    """A list of message objects -> tuple of Message; `label` names the list ("messages", "prompt", ...)."""
    if not isinstance(value, list):
        raise DataError(f"'{label}' is {_kind(value)}, not a list", f"a list of {_MESSAGE_SHAPE}")
    prefix = "" if label == "messages" else f"{label} "
    return tuple(Message.from_json(m, f"{prefix}message {i}") for i, m in enumerate(value, 1))


def _check_messages(messages: Any, label: str, what: str) -> tuple[Message, ...]:
    """Structure shared by conversations and prompts: a non-empty tuple of Message, system only first."""
    if isinstance(messages, list):
        messages = tuple(messages)
    prefix = "" if label == "messages" else f"{label} "
    if not isinstance(messages, tuple):
        raise DataError(f"'{label}' is {_kind(messages)}", "a tuple of Message")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, Message):
            raise DataError(f"{prefix}message {i} is {_kind(m)}, not a Message", "Message(role, content)")
    if not messages:
        raise DataError(f"'{label}' is empty", what)
    for i, m in enumerate(messages[1:], 2):
        if m.role == "system":
            raise DataError(f"{prefix}message {i} has role 'system' but is not first",
                            "a system message only as message 1")
    return messages


@dataclass(frozen=True)
class Conversation:
    """A demonstration for SFT: at least one assistant message; a system message only first."""

    messages: tuple[Message, ...]
    meta: dict = field(default_factory=dict, hash=False)
    """Extra keys of the record (source, task, ...), written back as top-level keys."""

    def __post_init__(self):
        msgs = _check_messages(self.messages, "messages", "at least one user and one assistant message")
        if not any(m.role == "assistant" for m in msgs):
            raise DataError("no assistant message", "a demonstration with at least one assistant reply")
        _freeze(self, "messages", msgs)
        _freeze(self, "meta", _check_meta(self.meta, ("messages",)))

    def to_json(self) -> dict:
        return {"messages": [m.to_json() for m in self.messages], **self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> Conversation:
        if "messages" not in obj:
            hint = " (found ShareGPT-style 'conversations')" if "conversations" in obj else _suggest_key(obj, "messages")
            raise DataError(f"missing field 'messages'{hint}", _CONVERSATION_SHAPE)
        msgs = _messages_from_json(obj["messages"], "messages")
        return cls(msgs, {k: v for k, v in obj.items() if k != "messages"})


def _check_prompt(messages: Any, label: str) -> tuple[Message, ...]:
    msgs = _check_messages(messages, label, "at least one user message")
    if msgs[-1].role != "user":
        raise DataError(f"'{label}' ends with message {len(msgs)} from '{msgs[-1].role}'",
                        "a prompt that ends with a user message")
    return msgs


_HH_TURN = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_transcript(text: str) -> tuple[Message, ...] | None:
    """An Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...") as messages; None for other text."""
    if not re.match(r"\s*Human:", text) or "\n\nAssistant:" not in text:
        return None
    parts = _HH_TURN.split(text)  # ["", "Human", " hi", "Assistant", " hello", ...]
    return tuple(Message(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2]))


def _prompt_from_json(value: Any, label: str) -> tuple[Message, ...]:
    """A prompt given as "text", an HH transcript, [messages] or {"messages": [...]} -> checked tuple of Message."""
    if isinstance(value, str):
        msgs = _hh_transcript(value)
        if msgs and msgs[-1].role == "assistant" and not msgs[-1].content:  # "...\n\nAssistant:" awaits the answer
            msgs = msgs[:-1]
        return _check_prompt(msgs or (Message("user", value),), label)
    if isinstance(value, dict):
        if "messages" not in value:
            raise DataError(f"'{label}' is an object without 'messages'", '"text", [messages] or {"messages": [...]}')
        value = value["messages"]
    elif not isinstance(value, list):
        raise DataError(f"'{label}' is {_kind(value)}", '"text", [messages] or {"messages": [...]}')
    return _check_prompt(_messages_from_json(value, label), label)


@dataclass(frozen=True)
class Prompt:
    """A prompt for sampling / PPO: ends with a user message; a system message only first."""

    messages: tuple[Message, ...]
    meta: dict = field(default_factory=dict, hash=False)
    """Extra keys of the record (e.g. "task": the hidden task of the built-in world)."""

    def __post_init__(self):
        _freeze(self, "messages", _check_prompt(self.messages, "messages"))
        _freeze(self, "meta", _check_meta(self.meta, ("messages", "prompt")))

    def to_json(self) -> dict:
        return {"messages": [m.to_json() for m in self.messages], **self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> Prompt:
        if "messages" in obj and "prompt" in obj:
            raise DataError("both 'messages' and 'prompt'", _PROMPT_SHAPE)
        if "messages" in obj:
            msgs = _check_prompt(_messages_from_json(obj["messages"], "messages"), "messages")
        elif "prompt" in obj:
            msgs = _prompt_from_json(obj["prompt"], "prompt")
        else:
            raise DataError(f"missing field 'messages'{_suggest_key(obj, 'messages', 'prompt')}", _PROMPT_SHAPE)
        return cls(msgs, {k: v for k, v in obj.items() if k not in ("messages", "prompt")})


_COMPARISON_FIELDS = ("prompt", "responses", "ranking", "ties", "labeler", "ratings")


@dataclass(frozen=True)
class Comparison:
    """K responses to one prompt, ranked by a labeler  [IG §3.5, App. B]."""

    prompt: tuple[Message, ...]
    """The conversation so far; ends with a user message."""
    responses: tuple[str, ...]
    """K = 2..9 candidate assistant replies (non-empty)."""
    ranking: tuple[int, ...]
    """Indices into `responses`, best first: a permutation of range(K)."""
    ties: tuple[tuple[int, int], ...] = ()
    """Pairs of response indices the labeler judged equally good; no preference between them."""
    labeler: str | None = None
    """Who ranked (a person or simulated labeler id)."""
    ratings: dict | None = field(default=None, hash=False)
    """Optional per-response scores (e.g. Likert ratings, flags), free-form JSON."""
    meta: dict = field(default_factory=dict, hash=False)
    """Extra keys of the record, written back as top-level keys."""

    def __post_init__(self):
        _freeze(self, "prompt", _check_prompt(self.prompt, "prompt"))
        responses = tuple(self.responses) if isinstance(self.responses, list) else self.responses
        if not isinstance(responses, tuple):
            raise DataError(f"'responses' is {_kind(responses)}, not a list",
                            f"a list of {MIN_K} to {MAX_K} response strings")
        k = len(responses)
        if k > MAX_K:
            raise DataError(f"{k} responses, more than the limit of {MAX_K}",
                            f"{MIN_K} to {MAX_K} responses per comparison (InstructGPT ranks K = 4..9)")
        if k < MIN_K:
            raise DataError(f"only {k} response{'s' * (k != 1)}, fewer than the minimum of {MIN_K}",
                            f"{MIN_K} to {MAX_K} responses per comparison")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise DataError(f"responses[{i}] is {_kind(r)}, not a string", "each response as a string")
            # an empty string is allowed: a model may answer with EOS at once, and labelers rank that too
        _freeze(self, "responses", responses)
        _freeze(self, "ranking", _check_ranking(self.ranking, k))
        _freeze(self, "ties", _check_ties(self.ties, k))
        if self.labeler is not None and not isinstance(self.labeler, str):
            raise DataError(f"'labeler' is {_kind(self.labeler)}", "a string or null")
        _check_ratings(self.ratings, k)
        _freeze(self, "meta", _check_meta(self.meta, _COMPARISON_FIELDS + ("chosen", "rejected")))

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> tuple[tuple[int, int], ...]:
        """All (better, worse) index pairs the ranking implies, ties left out  [IG eq. 1: all C(K, 2) pairs]."""
        tied = {frozenset(t) for t in self.ties}
        r = self.ranking
        return tuple((r[a], r[b]) for a in range(len(r)) for b in range(a + 1, len(r))
                     if frozenset((r[a], r[b])) not in tied)

    def to_json(self) -> dict:
        return {"prompt": {"messages": [m.to_json() for m in self.prompt]}, "responses": list(self.responses),
                "ranking": list(self.ranking), "ties": [list(t) for t in self.ties], "labeler": self.labeler,
                "ratings": self.ratings, **self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> Comparison:
        if "chosen" in obj or "rejected" in obj:
            return _check_duplicates(_pairwise_from_json(obj), pairwise=True)
        for key in ("prompt", "responses", "ranking"):
            if key not in obj:
                raise DataError(f"missing field '{key}'{_suggest_key(obj, key, *_COMPARISON_FIELDS)}",
                                _COMPARISON_SHAPE)
        return _check_duplicates(cls(
            _prompt_from_json(obj["prompt"], "prompt"), _responses_from_json(obj["responses"]),
            _ranking_from_json(obj["ranking"]), _ties_from_json(obj.get("ties")), obj.get("labeler"),
            obj.get("ratings"), {k: v for k, v in obj.items() if k not in _COMPARISON_FIELDS}))


def _check_duplicates(c: Comparison, pairwise: bool = False) -> Comparison:
    """A file's comparison may hold one answer text twice only if the two are tied: an order between
    identical answers teaches the reward model nothing true."""
    tied = {frozenset(t) for t in c.ties}
    for i, j in itertools.combinations(range(c.k), 2):
        if c.responses[i] == c.responses[j] and frozenset((i, j)) not in tied:
            if pairwise:
                raise DataError("'chosen' and 'rejected' are the same answer",
                                'two different answers (or "ties": [[0, 1]] to say they are equally good)')
            raise DataError(f"responses {i} and {j} are the same text but ranked apart",
                            f'identical answers tied ("ties": [[{i}, {j}]]) or listed once')
    return c


def _responses_from_json(value: Any) -> tuple:
    if not isinstance(value, list):
        raise DataError(f"'responses' is {_kind(value)}, not a list", f"a list of {MIN_K} to {MAX_K} response strings")
    return tuple(value)


def _ranking_from_json(value: Any) -> tuple:
    if not isinstance(value, list):
        raise DataError(f"'ranking' is {_kind(value)}, not a list", "[best, ..., worst] indices into 'responses'")
    return tuple(value)


def _ties_from_json(value: Any) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DataError(f"'ties' is {_kind(value)}, not a list", "a list of [i, j] pairs of response indices")
    return tuple(tuple(t) if isinstance(t, list) else t for t in value)


def _check_ranking(ranking: Any, k: int) -> tuple[int, ...]:
    expected = f"a permutation of 0..{k - 1}, best first (each response index once)"
    if isinstance(ranking, list):
        ranking = tuple(ranking)
    if not isinstance(ranking, tuple):
        raise DataError(f"'ranking' is {_kind(ranking)}, not a list", expected)
    out = []
    for pos, v in enumerate(ranking):
        i = _index(v)
        if i is None:
            raise DataError(f"ranking[{pos}] is {_show(v)}, not a whole number", expected)
        if not 0 <= i < k:
            raise DataError(f"ranking[{pos}] is {i}, out of range for {k} responses", expected)
        if i in out:
            missing = [j for j in range(k) if j not in ranking]
            left = f" and leaves out {', '.join(map(str, missing))}" if missing else ""
            raise DataError(f"ranking lists response {i} twice{left}", expected)
        out.append(i)
    if len(out) != k:
        missing = [j for j in range(k) if j not in out]
        raise DataError(f"ranking has {len(out)} of {k} responses, missing {', '.join(map(str, missing))}", expected)
    return tuple(out)


def _check_ratings(ratings: Any, k: int) -> None:
    """ratings: {axis: [one 1..7 score or null per response]}, as labelers give them [IG App. B]."""
    expected = f'{{"axis": [{k} scores, each a whole number 1..7 or null]}}'
    if ratings is None:
        return
    if not isinstance(ratings, dict):
        raise DataError(f"'ratings' is {_kind(ratings)}, not an object", expected)
    for axis, scores in ratings.items():
        if not isinstance(scores, list) or len(scores) != k:
            got = f"{len(scores)} scores" if isinstance(scores, list) else _kind(scores)
            raise DataError(f"ratings '{axis}' is {got}, for {k} responses", expected)
        for i, v in enumerate(scores):
            if v is not None and not (_index(v) is not None and 1 <= v <= 7):
                raise DataError(f"ratings '{axis}' of response {i} is {_show(v)}", expected)


def _check_ties(ties: Any, k: int) -> tuple[tuple[int, int], ...]:
    expected = f"ties as [i, j] pairs of distinct response indices in 0..{k - 1}"
    if ties is None:
        return ()
    if isinstance(ties, list):
        ties = tuple(ties)
    if not isinstance(ties, tuple):
        raise DataError(f"'ties' is {_kind(ties)}, not a list", expected)
    out = []
    for n, t in enumerate(ties):
        if not isinstance(t, (list, tuple)) or len(t) != 2:
            raise DataError(f"ties[{n}] is {_show(list(t) if isinstance(t, tuple) else t)}, not a pair", expected)
        pair = tuple(_index(v) for v in t)
        if None in pair:
            raise DataError(f"ties[{n}] is {_show(list(t))}, not a pair of whole numbers", expected)
        i, j = pair
        if not (0 <= i < k and 0 <= j < k):
            raise DataError(f"ties[{n}] is [{i}, {j}], out of range for {k} responses", expected)
        if i == j:
            raise DataError(f"ties[{n}] ties response {i} with itself", expected)
        out.append((i, j))
    return tuple(out)


def _response_from_json(value: Any, label: str) -> tuple[tuple[Message, ...] | None, str]:
    """chosen / rejected -> (messages before the response or None, response text); an HH transcript
    string reads like a list of messages."""
    if isinstance(value, str):
        msgs = _hh_transcript(value)
        if msgs is None:
            return None, value
    elif isinstance(value, list):
        msgs = _messages_from_json(value, label)
    else:
        raise DataError(f"'{label}' is {_kind(value)}",
                        "a response string, an HH transcript, or a list of messages ending with the assistant's response")
    if not msgs:
        raise DataError(f"'{label}' is an empty list",
                        "a response string, or a list of messages ending with the assistant's response")
    if msgs[-1].role != "assistant":
        raise DataError(f"'{label}' ends with message {len(msgs)} from '{msgs[-1].role}'",
                        "a list of messages ending with the assistant's response")
    return msgs[:-1], msgs[-1].content


def _first_difference(a: tuple, b: tuple) -> int:
    """1-based number of the first message where a and b differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b), 1) if x != y), min(len(a), len(b)) + 1)


def _pairwise_from_json(obj: dict) -> Comparison:
    """{"prompt": ..., "chosen": ..., "rejected": ...} -> Comparison with K = 2, ranking (0, 1)."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"missing field '{key}'", '{"prompt": ..., "chosen": ..., "rejected": ...}')
    if "responses" in obj or "ranking" in obj:
        raise DataError("both 'chosen'/'rejected' and 'responses'/'ranking'",
                        "one of the two formats: " + _COMPARISON_SHAPE)
    c_ctx, chosen = _response_from_json(obj["chosen"], "chosen")
    r_ctx, rejected = _response_from_json(obj["rejected"], "rejected")
    if "prompt" in obj:
        prompt = _prompt_from_json(obj["prompt"], "prompt")
        if isinstance(obj["prompt"], str) and _hh_transcript(obj["prompt"]):  # HH turns are read stripped
            chosen, rejected = chosen.strip(), rejected.strip()
        for label, ctx in (("chosen", c_ctx), ("rejected", r_ctx)):
            if ctx and ctx != prompt:
                at = _first_difference(ctx, prompt)
                raise DataError(f"'{label}' does not repeat the prompt (differs at message {at})",
                                f"'{label}' as the response alone, or the prompt's messages followed by the response")
    elif c_ctx and r_ctx:  # whole conversations without a separate prompt: the prompt is their shared prefix
        if c_ctx != r_ctx:
            at = _first_difference(c_ctx, r_ctx)
            raise DataError(f"'chosen' and 'rejected' differ before their last message (at message {at})",
                            "the same conversation up to the response when there is no 'prompt'")
        prompt = _check_prompt(c_ctx, "prompt")
    else:
        raise DataError("missing field 'prompt'", '{"prompt": ..., "chosen": ..., "rejected": ...}, '
                        "or chosen/rejected as message lists (or HH transcripts) that share the prompt")
    rest = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "ties", "labeler", "ratings")}
    return Comparison(prompt, (chosen, rejected), (0, 1), _ties_from_json(obj.get("ties")), obj.get("labeler"),
                      obj.get("ratings"), rest)


def _suggest_key(obj: dict, *wanted: str) -> str:
    """' (found 'mesages': did you mean 'messages'?)' when a key of obj is a near miss of a wanted one."""
    for key in obj:
        close = difflib.get_close_matches(str(key), wanted, n=1, cutoff=0.75)
        if close and key not in wanted:
            return f" (found '{key}': did you mean '{close[0]}'?)"
    return ""


# ---------------------------------------------------------------- sources: JSONL files and datasets folders


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _jsonl_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed object) for each non-blank line of a JSONL file."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: file is UTF-16 encoded", "UTF-8 text (JSONL)")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    first = True
    for n, raw in enumerate(data.split(b"\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        where = f"{name}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                            "UTF-8 text") from None
        try:
            obj = json.loads(line, object_pairs_hook=_object_no_duplicates, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            if first and _is_json_array(data):
                raise DataError(f"{where}: the file is one JSON array, not JSON lines",
                                "one JSON object per line (convert with: jq -c '.[]')") from None
            hint = " - two records on one line?" if e.msg == "Extra data" else ""
            if first and path.suffix.lower() not in _JSON_SUFFIXES:
                hint += f" - a {path.suffix or 'suffix-less'} file is read as JSON lines"
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}{hint})",
                            "one JSON object per line") from None
        except _DuplicateKey as e:
            raise DataError(f"{where}: key '{e.args[0]}' appears twice", "each key once per record") from None
        except ValueError as e:  # NaN / Infinity
            raise DataError(f"{where}: not valid JSON ({e})", "one JSON object per line") from None
        if not isinstance(obj, dict):
            hint = " (the file is one JSON array, not JSON lines)" if first and _is_json_array(data) else ""
            raise DataError(f"{where}: {_kind(obj)}, not a JSON object{hint}", "one JSON object per line")
        first = False
        yield where, obj


_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _is_json_array(data: bytes) -> bool:
    if not data.lstrip().startswith(b"["):
        return False
    try:
        return isinstance(json.loads(data), list)
    except ValueError:
        return False


def _dataset_rows(ds: Any, name: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a datasets.Dataset; null columns count as absent keys."""
    for i, row in enumerate(ds.with_format(None)):
        yield f"{name}: row {i}", {k: v for k, v in row.items() if v is not None}


_FOLDER_EXPECTED = "a folder saved by datasets (save_to_disk) or holding .jsonl / .parquet data files"


def _folder_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{name}: datasets cannot load this folder ({type(e).__name__}: {_first_line(e)})",
                            _FOLDER_EXPECTED) from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{name}: DatasetDict has splits {', '.join(ds)} but no 'train'", "a 'train' split")
            ds, name = ds["train"], f"{name} (train split)"
        yield from _dataset_rows(ds, name)
        return
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # EmptyDatasetError and friends: nothing datasets could read
        raise DataError(f"{name}: folder holds no data files", _FOLDER_EXPECTED) from None
    if "train" not in files:
        raise DataError(f"{name}: folder has data files only for split(s) {', '.join(map(str, files))}",
                        "a 'train' split (files named train*.jsonl, or any names without a split)")
    train = sorted(str(f) for f in files["train"])
    if all(f.endswith(".jsonl") for f in train):  # read them ourselves: errors name file and line
        for f in train:
            yield from _jsonl_records(Path(f), os.path.join(name, os.path.relpath(f, path)))
        return
    try:
        ds = datasets.load_dataset(str(path), split="train")
    except Exception as e:
        raise DataError(f"{name}: datasets cannot load this folder ({type(e).__name__}: {_first_line(e)})",
                        _FOLDER_EXPECTED) from e
    yield from _dataset_rows(ds, name)


def _parquet_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # ArrowInvalid and friends: not a Parquet file datasets can read
        raise DataError(f"{name}: datasets cannot read this file ({type(e).__name__}: {_first_line(e)})",
                        "a Parquet file") from e
    yield from _dataset_rows(ds, name)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _no_such_path(path: Path, name: str) -> DataError:
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.7)
        hint = f" (did you mean '{os.path.join(os.path.dirname(name), close[0])}'?)" if close else ""
    return DataError(f"{name}: no such file or folder{hint}")


def _records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, object) for every record of a source; file-level problems raise DataError."""
    name, p = os.fspath(path), Path(path)
    if not p.exists():
        raise _no_such_path(p, name)
    if p.is_dir():
        rows = _folder_records(p, name)
    elif p.suffix == ".parquet":
        rows = _parquet_records(p, name)
    else:
        rows = _jsonl_records(p, name)
    empty = True
    for where, obj in rows:
        empty = False
        yield where, obj
    if empty:
        if p.suffix == ".parquet" or p.is_dir():
            raise DataError(f"{name}: dataset has no rows", "at least one record")
        raise DataError(f"{name}: file is empty", "JSONL records")


def _read(path: str | os.PathLike, from_json: Callable[[dict], Any]) -> list:
    out = []
    for where, obj in _records(path):
        try:
            out.append(from_json(obj))
        except DataError as e:
            raise e.at(where) from None
    return out


def locate(path: str | os.PathLike, i: int) -> str:
    """Where the i-th record (0-based) of a source is, `file:line` or `folder: row i`, for a problem
    found after reading it (e.g. a chat template that refuses the conversation)."""
    return next((where for n, (where, _) in enumerate(_records(path)) if n == i), os.fspath(path))


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Demonstrations for SFT from a JSONL file or a datasets folder; raises DataError naming file and line."""
    return _read(path, Conversation.from_json)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts for sampling / PPO from a JSONL file or a datasets folder; raises DataError naming file and
    line, also for a prompt whose last user message is blank."""
    def prompt(obj: dict) -> Prompt:
        p = Prompt.from_json(obj)
        _check_not_blank(p.messages, "messages" if "messages" in obj else "prompt")
        return p
    return _read(path, prompt)


def read_comparisons(path: str | os.PathLike) -> list[Comparison]:
    """K-way (or pairwise chosen/rejected) comparisons; raises DataError naming file and line, also for a
    prompt whose last user message is blank."""
    def comparison(obj: dict) -> Comparison:
        c = Comparison.from_json(obj)
        _check_not_blank(c.prompt, "prompt")
        return c
    return _read(path, comparison)


def _check_not_blank(msgs: tuple[Message, ...], label: str) -> None:
    """A prompt read from a file must give the model something to answer: its last message has text."""
    if not msgs[-1].content.strip():
        what = f"'{label}' is blank" if len(msgs) == 1 else f"'{label}' ends with a blank user message (message {len(msgs)})"
        raise DataError(what, "a prompt whose last user message has text")


Document = str | list[dict]
"""A pretraining document: plain text, or a conversation's messages (rendered with the chat template)."""

_DOCUMENT_SHAPE = '{"text": "..."} or {"messages": [...]}'


def read_documents(path: str | os.PathLike) -> list[Document]:
    """Pretraining documents: a .txt file, documents separated by blank lines (a line of only spaces is
    blank too), or records {"text": ...} / {"messages": [...]} from any source `read_conversations`
    reads; raises DataError naming file and line."""
    name, p = os.fspath(path), Path(path)
    if p.suffix.lower() == ".txt" and p.is_file():
        docs = _text_documents(p, name)
        if not docs:
            raise DataError(f"{name}: file is empty", "documents separated by blank lines")
        return docs
    return _read(path, _document_from_json)


def _text_documents(path: Path, name: str) -> list[str]:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: file is UTF-16 encoded", "UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})",
                        "UTF-8 text") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [d.strip() for d in re.split(r"\n[^\S\n]*\n", text) if d.strip()]


def _document_from_json(obj: dict) -> Document:
    if "text" in obj and "messages" in obj:
        raise DataError("both 'text' and 'messages'", "one of " + _DOCUMENT_SHAPE)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"'text' is {_kind(obj['text'])}, not a string", "the document as a string")
        return obj["text"]
    if "messages" in obj:
        msgs = _check_messages(_messages_from_json(obj["messages"], "messages"), "messages", "at least one message")
        return [m.to_json() for m in msgs]
    raise DataError(f"missing field 'text'{_suggest_key(obj, 'text', 'messages')}", _DOCUMENT_SHAPE)


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) into `path` through a temporary file in its folder and a rename: a reader never sees half
    of it, and a failed write leaves the old file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records (anything with `to_json()`, or dicts) as JSONL, atomically; returns how many.

    Writes a temporary file in the same folder, fsyncs it and `os.replace`s it over `path`: an
    interrupted or failed write leaves the old file as it was and no temporary file behind.
    """
    name, p = os.fspath(path), Path(path)
    if p.is_dir():
        raise DataError(f"{name}: is a folder", "a file path to write JSONL to")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    except OSError as e:  # a read-only or full folder: name the file asked for, not the temporary one
        raise type(e)(e.errno, e.strerror, name) from None
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for n, rec in enumerate(records, 1):
                if not isinstance(rec, dict) and not hasattr(rec, "to_json"):
                    raise DataError(f"{name}:{n}: record is {_kind(rec)}", "a Conversation, Prompt, Comparison or dict")
                try:
                    line = json.dumps(rec if isinstance(rec, dict) else rec.to_json(), ensure_ascii=False,
                                      allow_nan=False, default=_to_json)
                except (TypeError, ValueError) as e:
                    raise DataError(f"{name}:{n}: cannot be written as JSON ({e})",
                                    "only JSON values (str, number, bool, None, list, dict) in records") from e
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
