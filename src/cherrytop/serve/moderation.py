"""Moderation without retraining: a policy file checked on every request's input and on its answer
as it is generated, re-read whenever it changes (its mtime is checked on each request), so an
operator fixes bad behaviour by editing a file while the server runs.

A policy (TOML, or JSON with the same keys):

```toml
safe_message = "Sorry, I can't help with that."   # what a blocked answer says

[[categories]]
name = "violence"                                   # logged with every block
patterns = ['\\bkill\\b', 'weapons?']               # Python regexes, case-insensitive
check = ["input", "output"]                         # where to look (default: both)

[classifier]                                        # optional: a reward / safety model
checkpoint = "runs/tiny/rm"                         # a scalar-head checkpoint (cherrytop.model.heads)
threshold = -1.0                                    # an answer it scores below this is blocked
category = "low_score"
```

Patterns are checked on every message the client sends, earlier assistant turns included (the
client writes those too: input patterns, and output patterns for assistant turns), and on the answer
before each piece of it is released, so a blocked span never reaches the client: the end of an
unfinished answer that an output pattern could still match as the answer grows (`kil` for
`\\bkill\\b`) is held back until the answer moves past it (patterns are run by the `regex` package,
whose partial matching finds that end; its syntax is Python's `re`'s). The classifier
scores the whole conversation with the finished answer. A blocked answer ends with finish_reason
`content_filter` and the safe message; each block is logged (logger `cherrytop.serve.moderation`)
and appended to a JSONL file with its category.

Text is matched as written and as `normalize` sees it: each character NFKC-normalised (fullwidth
and mathematical letters, ligatures), format characters such as zero-width spaces and joiners and
combining marks dropped, and Cyrillic / Greek look-alikes of Latin letters mapped to those letters,
so `k\u200bill`, `ｋｉｌｌ` and `kіll` (Cyrillic і) all match `\bkill\b`; a pattern matching either
text blocks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import tomllib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import regex

from cherrytop.eval.judge import Judge

log = logging.getLogger("cherrytop.serve.moderation")

WHERE = ("input", "output")
DEFAULT_SAFE_MESSAGE = "Sorry, I can't help with that."


HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁԛԝһӏкмтвнАВЕКМНОРСТХУІЈЅ"  # Cyrillic
    "αοικνρτυχεΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",  # Greek
    "aeopcyxijsdqwhlkmtbhABEKMHOPCTXYIJS"
    "aoikvptuxeABEZHIKMNOPTYX")
"""Cyrillic and Greek letters that look like Latin ones -> those Latin letters."""


def normalize(text: str) -> tuple[str, list[int]]:
    """(the text as moderation matches it, for each of its characters the index of the character of
    `text` it came from). Per character: NFKC, then format characters (Cf: zero-width space, joiners,
    soft hyphen, BOM, ...) and combining marks (Mn) dropped, then homoglyphs mapped to Latin."""
    out, origin = [], []
    for i, ch in enumerate(text):
        if ch.isascii():
            out.append(ch)
            origin.append(i)
            continue
        for c in unicodedata.normalize("NFKC", ch):
            if unicodedata.category(c) not in ("Cf", "Mn"):
                out.append(c.translate(HOMOGLYPHS))
                origin.append(i)
    return "".join(out), origin


class PolicyError(ValueError):
    """A policy file that does not fit the format; the message names the file and the key."""


@dataclass(frozen=True)
class Category:
    name: str
    """Logged with each block."""
    patterns: tuple[regex.Pattern, ...]
    """Case-insensitive regexes; any match blocks."""
    check: tuple[str, ...] = WHERE
    """Where the patterns apply: input, output or both."""


@dataclass(frozen=True)
class Classifier:
    checkpoint: str
    """A scalar-head (reward / safety) model folder."""
    threshold: float
    """Answers scored below this are blocked."""
    category: str = "low_score"
    """Logged with each block."""


@dataclass(frozen=True)
class Policy:
    categories: tuple[Category, ...] = ()
    safe_message: str = DEFAULT_SAFE_MESSAGE
    classifier: Classifier | None = None

    def match(self, text: str, where: str | tuple[str, ...]) -> str | None:
        """The first category checked at `where` (input / output, or any of several) whose patterns
        match `text` as written or normalized (`normalize`)."""
        wheres = (where,) if isinstance(where, str) else where
        cats = [c for c in self.categories if set(wheres) & set(c.check)]
        if not cats:
            return None
        norm = normalize(text)[0]
        for c in cats:
            if any(p.search(text) or p.search(norm) for p in c.patterns):
                return c.name
        return None

    def match_turns(self, messages: Sequence[dict]) -> tuple[str, str] | None:
        """(category, turn's text) of the first turn an input pattern matches (or an output pattern, in
        an assistant turn: text the client says the model wrote); None if no turn matches."""
        for m in messages:
            hit = self.match(m["content"], ("input", "output") if m["role"] == "assistant" else "input")
            if hit:
                return hit, m["content"]
        return None

    def unsettled(self, text: str) -> int:
        """Characters at the end of an unfinished answer that an output pattern could still match once
        more text follows (0 if none), in the text as written or normalized: they must not be released yet."""
        norm, origin = normalize(text)
        start = len(text)
        for c in self.categories:
            if "output" in c.check:
                for p in c.patterns:
                    m = p.search(text, partial=True)
                    if m is not None and m.partial:
                        start = min(start, m.start())
                    m = p.search(norm, partial=True)
                    if m is not None and m.partial:
                        start = min(start, origin[m.start()] if m.start() < len(norm) else len(text))
        return len(text) - start


def parse_policy(path: Path) -> Policy:
    """Read and validate a policy file; errors name the file and the key."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a table with categories, safe_message and classifier")
    unknown = set(data) - {"categories", "safe_message", "classifier"}
    if unknown:
        raise PolicyError(f"{path}: unknown key '{sorted(unknown)[0]}'; expected categories, safe_message, classifier")
    cats = []
    for i, c in enumerate(data.get("categories", [])):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("patterns"), list):
            raise PolicyError(f"{where}: expected a table with name = \"...\" and patterns = [\"regex\", ...]")
        check = tuple(c.get("check", WHERE))
        if not set(check) <= set(WHERE):
            raise PolicyError(f"{where}: check must list 'input' and/or 'output', got {list(check)}")
        pats = []
        for p in c["patterns"]:
            try:
                pats.append(regex.compile(p, regex.IGNORECASE | regex.VERSION0))
            except (regex.error, TypeError) as e:
                raise PolicyError(f"{where} ({c['name']}): bad pattern {p!r}: {e}") from None
        cats.append(Category(c["name"], tuple(pats), check))
    clf = None
    if "classifier" in data:
        c = data["classifier"]
        if not isinstance(c, dict) or not isinstance(c.get("checkpoint"), str) or \
                not isinstance(c.get("threshold"), (int, float)):
            raise PolicyError(f"{path}: classifier: expected checkpoint = \"DIR\" and threshold = NUMBER")
        clf = Classifier(c["checkpoint"], float(c["threshold"]), str(c.get("category", "low_score")))
    safe = data.get("safe_message", DEFAULT_SAFE_MESSAGE)
    if not isinstance(safe, str) or not safe:
        raise PolicyError(f"{path}: safe_message must be a non-empty string")
    return Policy(tuple(cats), safe, clf)


class Moderator:
    """The current policy of a file (re-read when its mtime or size changes) and the block log."""

    def __init__(self, path: str | Path | None, log_path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.log_path = Path(log_path) if log_path else None
        self._stamp: tuple[int, int] | None = None
        self._policy = Policy()
        self._scorers: dict[str, Judge] = {}
        self._lock = threading.Lock()
        self._score_lock = threading.Lock()
        self.blocks: dict[str, int] = {}
        if self.path is not None:
            if not self.path.is_file():
                raise PolicyError(f"{self.path}: moderation policy file not found")
            self.current(strict=True)

    def current(self, strict: bool = False) -> Policy:
        """The policy, re-read if the file changed; a broken edit keeps the last good policy."""
        if self.path is None:
            return self._policy
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            if strict:
                raise PolicyError(f"{self.path}: moderation policy file not found") from None
            return self._policy
        with self._lock:
            if stamp != self._stamp:
                try:
                    policy = parse_policy(self.path)
                    if policy.classifier is not None:
                        self.scorer(policy.classifier.checkpoint)
                except (PolicyError, OSError, ValueError) as e:
                    if strict:
                        raise PolicyError(str(e)) from None
                    log.error("moderation policy not reloaded, keeping the previous one: %s", e)
                else:
                    self._policy = policy
                    log.info("moderation policy loaded from %s: %d categories%s", self.path, len(policy.categories),
                             ", classifier" if policy.classifier else "")
                self._stamp = stamp
            return self._policy

    def scorer(self, checkpoint: str) -> Judge:
        """The classifier: a reward model scoring as PPO and `cherrytop eval --judge` do (eval/judge.py)."""
        if checkpoint not in self._scorers:
            if not (Path(checkpoint) / "config.json").is_file():
                raise PolicyError(f"{self.path}: classifier checkpoint {checkpoint} is not a model folder")
            self._scorers[checkpoint] = Judge(checkpoint, batch_size=1)
        return self._scorers[checkpoint]

    def check_output(self, policy: Policy, messages: Sequence[dict], text: str, final: bool) -> str | None:
        """The blocked category of an answer so far (patterns), or of the finished answer (classifier)."""
        hit = policy.match(text, "output")
        if hit is None and final and policy.classifier is not None:
            try:
                with self._score_lock:
                    score = self.scorer(policy.classifier.checkpoint).scores([messages], [text])[0]
            except Exception:  # noqa: BLE001 - a failing classifier must not fail the batch
                log.exception("moderation classifier failed; the answer is let through")
                return None
            if score < policy.classifier.threshold:
                hit = policy.classifier.category
        return hit

    def record(self, where: str, category: str, text: str, **context) -> None:
        """Log one block with its category (and append it to the JSONL log)."""
        log.warning("blocked %s: category=%s %s", where, category,
                    " ".join(f"{k}={v}" for k, v in context.items() if v is not None))
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "where": where, "category": category,
               "text": text[:500], **context}
        with self._lock:
            self.blocks[category] = self.blocks.get(category, 0) + 1
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with self.log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
