"""The feedback database: tables, migrations on open, and every write as one transaction.

`open_store(url)` opens (or creates) a SQLite file (`sqlite:///path.db`) or a PostgreSQL database
(`postgresql+psycopg://user@host/db`) and applies the Alembic migrations shipped in `migrations/`.

Nothing is lost or doubled: every submission is one transaction; each form carries a one-time
`token` (unique in its table), so submitting the same form twice returns the first submission;
a labeler ranks an item at most once and reviews a demonstration at most once (unique constraints),
so concurrent labelers and double clicks never overwrite or duplicate each other. An item shown
to a labeler to rank is claimed for them for half an hour (`claims`), so labelers at work at the
same time are given different items instead of all ranking the oldest one. A demonstration shown
to review is claimed the same way (`review_claims`). The web app accepts a ranking or a review
only for work so claimed by the labeler submitting it (`offered=True`), and an item never gets
more rankings than its `labels_needed` (gold items excepted).
Arena battles (two models' answers to one prompt, shown to labelers without the model names) take
votes the same way: claimed (`battle_claims`), accepted only while held, at most `votes_needed` each.

Items are prompts (`prompt`: messages ending with a user turn) with 0..K candidate `responses`; an
item with >= 2 responses is rankable, one with a prompt can be answered by a demonstration.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, delete, event, func, or_, select)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker, validates

from cherrytop.data.records import MAX_K, Conversation, DataError, Prompt

ROLES = ("admin", "labeler")
CHAT_RATINGS = ("up", "down", "report")
MODERATION = "moderation"
"""The `model` of a chat rating whose rated text is the moderation policy's safe message (`cherrytop serve`
blocked the model's answer): no model wrote it, so it is no ranking candidate and no chat comparison."""
FLAGS = ("harmful", "private", "spam")
"""What a labeler can report about an item: harmful content, private data, spam."""
AXES = ("helpful", "truthful", "harmless")
"""Per-answer 1-7 ratings [IG App. B]."""


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    """A disabled account cannot log in and its sessions stop working (an admin's choice, reversible)."""


class LoginSession(Base):
    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the cookie value: a leaked database does not give working cookies."""
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LoginAttempt(Base):
    __tablename__ = "login_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), index=True)
    """`user:<name>@<address>` or `ip:<address>`."""
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_key: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the prompt's messages: importing the same prompt twice gives one item."""
    prompt: Mapped[list] = mapped_column(JSON)
    responses: Mapped[list] = mapped_column(JSON, default=list)
    n_responses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """len(responses), kept by `_count_responses`: the queues filter on it in SQL (>= 2: rankable)."""
    provenance: Mapped[list] = mapped_column(JSON, default=list)
    """One entry per response: {"model": ..., "settings": {...}, "source": ...}."""
    source: Mapped[str] = mapped_column(String(32))
    gold: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """Known best-to-worst ranking of the responses (gold item), or null."""
    labels_needed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)

    @validates("responses")
    def _count_responses(self, key, value):
        self.n_responses = len(value)
        return value


class Demonstration(Base):
    __tablename__ = "demonstrations"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"), nullable=True, index=True)
    """The prompt answered; null for a whole conversation written from scratch."""
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    messages: Mapped[list] = mapped_column(JSON)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("demonstration_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    demonstration_id: Mapped[int] = mapped_column(ForeignKey("demonstrations.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    accept: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text, default="")
    token: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Ranking(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    ranking: Mapped[list] = mapped_column(JSON)
    """Response indices best first."""
    ties: Mapped[list] = mapped_column(JSON)
    """[i, j] pairs judged equally good."""
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[list] = mapped_column(JSON, default=list)
    """Subset of FLAGS the labeler reported."""
    ratings: Mapped[dict] = mapped_column(JSON, default=dict)
    """{axis: [1..7 or null per response]}."""
    token: Mapped[str] = mapped_column(String(64), unique=True)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Claim(Base):
    """An item shown to a labeler to rank: until it expires (or they rank it) it counts towards the
    item's labels, so labelers working at the same time are given different items."""
    __tablename__ = "claims"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReviewClaim(Base):
    """A demonstration shown to a labeler to review: only they may review it until the claim expires."""
    __tablename__ = "review_claims"
    __table_args__ = (UniqueConstraint("demonstration_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    demonstration_id: Mapped[int] = mapped_column(ForeignKey("demonstrations.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NotOffered(ValueError):
    """A submission for work the server did not offer to this labeler, or no longer holds for them."""


class ChatFeedback(Base):
    __tablename__ = "chat_feedback"
    MAX_TEXT = 1_000_000
    """Most characters of the conversation (all turns together) and of the rated answer."""
    MAX_COMMENT = 2000
    """Most characters of a rating's comment."""
    MAX_ID = 128
    """Most characters of conversation_id, user and served_id."""
    SETTINGS = {"temperature": float, "top_p": float, "max_tokens": int, "n": int, "seed": int, "stop": list}
    """The sampling settings a rating may record, with their types (`stop`: up to 4 strings of <= 256 characters)."""

    @staticmethod
    def setting_ok(key: str, value: Any) -> bool:
        """Whether `key` is a known setting and `value` a bounded value of its type (seed may be None)."""
        kind = ChatFeedback.SETTINGS.get(key)
        if kind is None or isinstance(value, bool):
            return False
        if kind is float:
            return isinstance(value, (int, float))
        if kind is int:
            return (key == "seed" and value is None) or (isinstance(value, int) and abs(value) < 2**63)
        return isinstance(value, list) and len(value) <= 4 and all(isinstance(x, str) and len(x) <= 256 for x in value)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    messages: Mapped[list] = mapped_column(JSON)
    response: Mapped[str] = mapped_column(Text)
    rating: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(512))
    settings: Mapped[dict] = mapped_column(JSON)
    conversation_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    user: Mapped[str | None] = mapped_column(String(128), nullable=True)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"), nullable=True)
    """The ranking item a down / report rating put into the queue."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    served_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    """`chatcmpl-...:INDEX`: the answer `cherrytop serve` served and rated here (its record gave the
    conversation, answer, model, settings and user); None for ratings stored by other callers."""


VOTES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
"""An arena vote and the battle's outcome for `cherrytop.eval.arena.ratings` (the share model a won)."""


class Battle(Base):
    """Two models' answers to one prompt, shown side by side as "A" and "B" (the caller decides, at
    random, which model is a); labelers vote without seeing the model names."""
    __tablename__ = "battles"
    MAX_TEXT = 1_000_000
    """Most characters of the prompt (all turns together) and of each answer."""
    MAX_MODEL = 512
    """Most characters of a model name."""
    MAX_TAG = 128
    """Most characters of a tag."""
    MAX_VOTES = 1000
    """Most votes one battle may ask for."""
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), index=True)
    """The set of battles this one belongs to (`battle_outcomes(tag)` reads one set back)."""
    prompt: Mapped[list] = mapped_column(JSON)
    model_a: Mapped[str] = mapped_column(String(512))
    answer_a: Mapped[str] = mapped_column(Text)
    model_b: Mapped[str] = mapped_column(String(512))
    answer_b: Mapped[str] = mapped_column(Text)
    votes_needed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("battle_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    battle_id: Mapped[int] = mapped_column(ForeignKey("battles.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))
    """One of VOTES: a, b, tie, both_bad."""
    token: Mapped[str] = mapped_column(String(64), unique=True)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class BattleClaim(Base):
    """A battle shown to a labeler: until it expires (or they vote) it counts towards the battle's votes."""
    __tablename__ = "battle_claims"
    __table_args__ = (UniqueConstraint("battle_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    battle_id: Mapped[int] = mapped_column(ForeignKey("battles.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# ---------------------------------------------------------------- opening and migrating

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x63686572
"""PostgreSQL advisory lock key held while migrating (SQLite's BEGIN IMMEDIATE serializes already)."""


def _alembic_config(connection) -> Any:
    from alembic.config import Config as AlembicConfig
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine) -> None:
    """Apply every migration not yet applied (a no-op on an up-to-date database)."""
    from alembic import command
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # processes starting at once: one migrates, the others wait
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        command.upgrade(_alembic_config(conn), "head")


_migrate_lock = threading.Lock()


def open_store(url: str, labels_needed: int = 2) -> Store:
    """Open (or create) the database at `url` and bring its schema up to date.

    `labels_needed`: how many labelers rank each new item (>= 2 so agreement can be measured).
    """
    if "://" not in url:
        raise ValueError(f"{url}: not a database URL; expected e.g. sqlite:///feedback.db or "
                         "postgresql+psycopg://user@host/db")
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _):  # WAL: readers never wait for the writer; FKs on
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # writers take the lock at BEGIN: no lock upgrade, no "database is locked" mid-way
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("cherrytop_read") else "BEGIN IMMEDIATE")
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        except (ArgumentError, ImportError) as e:  # e.g. postgres:// (SQLAlchemy's name is postgresql) or no driver
            raise ValueError(f"{_shown(url)}: cannot open this kind of database ({e}); expected sqlite:///FILE or "
                             "postgresql+psycopg://user@host/db") from e
    with _migrate_lock:
        try:
            migrate(engine)
        except DBAPIError as e:  # server down, wrong password, not a database file, ...
            engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__
            raise ValueError(f"{_shown(url)}: cannot open the database: {reason}") from e
    return Store(engine, labels_needed)


def _shown(url: str) -> str:
    """The URL for an error message, its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def prompt_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _messages(msgs: Any, what: str) -> list[dict]:
    """Validated OpenAI-style messages ending with a user turn, as plain dicts."""
    if not isinstance(msgs, list):
        raise DataError(f"{what} is not a list", "a list of {\"role\": ..., \"content\": ...} messages")
    p = Prompt.from_json({"messages": msgs})
    return [m.to_json() for m in p.messages]


def _text(value: Any, what: str, limit: int | None = None) -> str:
    """A string both databases store alike: no NUL character (PostgreSQL refuses one in a text
    column) and, for a limited column, at most `limit` characters (PostgreSQL refuses longer)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character (\\x00)")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{what} has {len(value)} characters; at most {limit} allowed")
    return value


@dataclass
class Submitted:
    """The result of a submission: its row id and whether this call created it (False: a repeat)."""
    id: int
    created: bool
    message: str = ""


@dataclass
class Imported:
    """What `Store.import_prompts` did with a file's records."""
    added: int = 0
    """New items."""
    kept: int = 0
    """Records whose prompt was already queued with the same answers (or none): nothing to do."""
    extended: int = 0
    """Prompts already queued with fewer than 2 answers that got the record's answers."""
    differing: int = 0
    """Records whose prompt was already queued with other answers: their answers were not added."""
    differing_at: list[str] = field(default_factory=list)
    """`file:line` of the first few of those."""


@dataclass
class Store:
    """The feedback database. Methods open their own short transactions (`with store.tx() as s:`)."""

    engine: Any
    labels_needed: int = 2
    """Labelers per new item."""
    claim_s: float = 1800.0
    """How long an item shown to a labeler to rank stays theirs (counts towards its labels)."""
    _sessions: Any = field(init=False, repr=False)

    def __post_init__(self):
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.engine.execution_options(cherrytop_read=True), expire_on_commit=False)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (on SQLite it does not wait for writers)."""
        with self._readers() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ items

    def add_item(self, messages: list[dict], *, responses: list[str] | None = None, provenance: list[dict] | None = None,
                 source: str = "import", gold: list[int] | None = None, labels_needed: int | None = None) -> Submitted:
        """Add a prompt (with optional candidate responses) to the queue; an existing prompt is kept as it is."""
        msgs = _messages(messages, "prompt")
        responses = [] if responses is None else responses
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"responses are {responses!r:.60}", "a list of answer strings")
        if len(responses) > MAX_K:  # a labeler could never submit a ranking of more
            raise DataError(f"{len(responses)} responses", f"at most {MAX_K} answers to rank")
        provenance = list(provenance or [{"model": None, "settings": {}, "source": source}] * len(responses))
        if gold is not None:
            if (len(responses) < 2 or not isinstance(gold, list) or not all(type(g) is int for g in gold)
                    or sorted(gold) != list(range(len(responses)))):
                raise DataError(f"gold ranking {gold!r:.60} is not a permutation of the {len(responses)} responses",
                                "indices best first, each response once, of 2 or more responses")
        key = prompt_key(msgs)
        try:
            with self.tx() as s:
                item = Item(prompt_key=key, prompt=msgs, responses=responses, provenance=provenance, source=source,
                            gold=gold, labels_needed=labels_needed or self.labels_needed)
                s.add(item)
                s.flush()
                return Submitted(item.id, True)
        except IntegrityError:
            with self.tx() as s:
                return Submitted(s.scalars(select(Item.id).where(Item.prompt_key == key)).one(), False)

    def import_prompts(self, path: str | Path) -> Imported:
        """Prompts from a JSONL file / datasets folder (records.py's prompt format); optional keys
        `responses` (candidate answers), `gold` (their known ranking), `model` (who wrote them) or
        `models` (who wrote each: `cherrytop eval --pairs` writes these).
        A prompt already in the queue stays one item: it gets the record's answers when it has fewer
        than 2 (a chat rating's prompt, or one imported without answers) and no gold ranking comes
        with them; otherwise it is kept as it is, and a record whose answers differ from the item's
        is counted in `differing` (an item's answers never change once labelers can rank it).
        A bad record stops the import with its file and line; the records before it are kept
        (importing the file again adds only the rest)."""
        from cherrytop.data.records import locate, read_prompts
        out = Imported()
        for n, p in enumerate(read_prompts(path)):
            meta = p.meta
            responses = meta.get("responses")
            k = len(responses) if isinstance(responses, list) else 0
            models = meta.get("models", [meta.get("model")] * k)
            try:
                if "models" in meta and (not isinstance(models, list) or len(models) != k
                                         or not all(isinstance(m, str) for m in models)):
                    raise DataError(f"models are {models!r:.60}", f"a list of {k} model names, one per response")
                prov = [{"model": m, "settings": {}, "source": str(path)} for m in models]
                r = self.add_item([m.to_json() for m in p.messages], responses=responses, provenance=prov,
                                  gold=meta.get("gold"), source="import")
            except DataError as e:
                raise e.at(locate(path, n)) from None
            if r.created:
                out.added += 1
                continue
            have = self.item(r.id).responses
            new = [(a, pv) for a, pv in zip(responses or [], prov) if a not in have]
            if not new or list(responses) == list(have):
                out.kept += 1
            elif len(have) < 2 and meta.get("gold") is None and len(have) + len(new) <= MAX_K:
                self.add_responses(r.id, [a for a, _ in new], [pv for _, pv in new])
                out.extended += 1
            else:
                out.differing += 1
                if len(out.differing_at) < 3:
                    out.differing_at.append(locate(path, n))
        return out

    def add_responses(self, item_id: int, responses: list[str], provenance: list[dict], up_to: int | None = None) -> int:
        """Append candidate answers to an item that is not yet rankable (fewer than 2 responses):
        once labelers rank an item its responses never change. With `up_to`, only as many as bring
        the item to `up_to` responses (a chat rating may have added one meanwhile). Returns how many."""
        with self.tx() as s:
            item = s.get(Item, item_id, with_for_update=True)
            if item is None:
                raise ValueError(f"item {item_id} does not exist")
            if len(item.responses) >= 2:
                raise ValueError(f"item {item_id} already has {len(item.responses)} responses (rankable); not changed")
            keep = len(responses) if up_to is None else max(0, up_to - len(item.responses))
            item.responses = list(item.responses) + list(responses[:keep])
            item.provenance = list(item.provenance) + list(provenance[:keep])
            return min(keep, len(responses))

    # ------------------------------------------------------------ chat feedback (called by cherrytop serve)

    def add_chat_feedback(self, *, messages: list[dict], response: str, rating: str, model: str, settings: dict,
                          conversation_id: str | None = None, comment: str | None = None,
                          user: str | None = None, served_id: str | None = None) -> int:
        """Record a chat user's rating of one answer; returns the feedback id.

        `messages` is the conversation before the answer (ending with a user turn), `response` the
        rated answer, `rating` one of up / down / report. A down or report rating also puts the
        prompt into the ranking queue with this answer as its first candidate (`cherrytop label
        generate` adds the others). With `model` = MODERATION the rated text is the moderation
        policy's safe message, not a model's answer: the prompt is queued without it as a candidate.
        The same rating sent again (a double click, a client's retry: same served answer, or same
        conversation, user, prompt, answer and rating) is stored once and returns the first one's id.
        `served_id` names the served answer (`chatcmpl-...:INDEX`). Every field is bounded
        (ChatFeedback.MAX_*), and `settings` holds only the known sampling fields (ChatFeedback.SETTINGS).
        """
        if rating not in CHAT_RATINGS:
            raise ValueError(f"rating {rating!r} is not one of {', '.join(CHAT_RATINGS)}")
        _text(response, "response", ChatFeedback.MAX_TEXT)
        model = _text(str(model), "model", 512)
        for value, what in ((conversation_id, "conversation_id"), (user, "user"), (served_id, "served_id")):
            if value is not None:
                _text(value, what, ChatFeedback.MAX_ID)
        if comment is not None:
            _text(comment, "comment", ChatFeedback.MAX_COMMENT)
        msgs = _messages(messages, "messages")
        chars = sum(len(m["content"]) for m in msgs)
        if chars > ChatFeedback.MAX_TEXT:
            raise ValueError(f"messages have {chars} characters; at most {ChatFeedback.MAX_TEXT} allowed")
        if not isinstance(settings, dict):
            raise ValueError("settings must be a dict")
        json.dumps(settings, allow_nan=False)  # must be JSON: NaN would stop every later export
        for k, v in settings.items():
            if not ChatFeedback.setting_ok(k, v):
                raise ValueError(f"settings: {k!r} is not a known sampling setting of the right type "
                                 f"({', '.join(ChatFeedback.SETTINGS)})")
        with self.tx() as s:  # one transaction: the rating, and for down / report the queue item
            if served_id is not None:  # a repeat of this served answer's latest rating is not a second rating
                prev = s.scalars(select(ChatFeedback).where(ChatFeedback.served_id == served_id)
                                 .order_by(ChatFeedback.id.desc()).limit(1)).first()
                if prev is not None and (prev.rating, prev.comment) == (rating, comment):
                    return prev.id
            elif conversation_id is not None:  # a repeat of this answer's latest rating is not a second rating
                prev = [f for f in s.scalars(select(ChatFeedback).where(
                    ChatFeedback.conversation_id == conversation_id, ChatFeedback.response == response)
                    .order_by(ChatFeedback.id)) if f.messages == msgs and f.user == user]
                if prev and (prev[-1].rating, prev[-1].model, prev[-1].settings) == (rating, model, settings):
                    return prev[-1].id
            item_id = None
            if rating != "up":
                key = prompt_key(msgs)
                try:
                    with s.begin_nested():  # a savepoint: a concurrent insert of the same prompt is fine
                        s.add(Item(prompt_key=key, prompt=msgs, responses=[], provenance=[], source="chat",
                                   labels_needed=self.labels_needed))
                except IntegrityError:
                    pass
                item = s.scalars(select(Item).where(Item.prompt_key == key).with_for_update()).one()
                if model != MODERATION and len(item.responses) < 2 and response not in item.responses:  # rankable items never change
                    item.responses = list(item.responses) + [response]
                    item.provenance = list(item.provenance) + [{"model": model, "settings": settings, "source": "chat"}]
                item_id = item.id
            fb = ChatFeedback(messages=msgs, response=response, rating=rating, model=model, settings=settings,
                              conversation_id=conversation_id, comment=comment, user=user, item_id=item_id,
                              served_id=served_id)
            s.add(fb)
            s.flush()
            return fb.id

    # ------------------------------------------------------------ submissions

    def _once(self, make, table, token: str, user_id: int, conflict) -> Submitted:
        """Insert a row made by `make(s)` in one transaction; a repeated token or an existing
        (item, user) row returns the first submission instead of a second one (looked up before
        `make`, whose checks, such as a claim the first submission used up, concern new rows only)."""
        def previous(s):
            prev = s.scalars(select(table).where(table.token == token)).first()
            if prev is None and conflict is not None:
                prev = s.scalars(select(table).where(conflict, table.user_id == user_id)).first()
            return prev

        try:
            with self.tx() as s:
                if previous(s) is None:
                    row = make(s)
                    s.add(row)
                    s.flush()
                    return Submitted(row.id, True)
        except IntegrityError:
            pass
        with self.tx() as s:
            prev = previous(s)
            if prev is None or prev.user_id != user_id:
                raise ValueError("this form was already used by someone else; reload the page")
            return Submitted(prev.id, False, "already submitted")

    def submit_demonstration(self, user_id: int, messages: list[dict], token: str, seconds: float,
                             item_id: int | None = None) -> Submitted:
        """A demonstration: the whole conversation (user and assistant turns), or the assistant's
        reply appended to item `item_id`'s prompt. Must end with an assistant turn."""
        conv = Conversation.from_json({"messages": messages})
        msgs = [m.to_json() for m in conv.messages]
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise DataError("the demonstration does not end with an assistant reply", "a last assistant message")
        if not any(m["role"] == "user" for m in msgs):
            raise DataError("the demonstration has no user message", "at least one user turn")

        def make(s):
            if item_id is not None:
                item = s.get(Item, item_id)
                if item is None:
                    raise ValueError(f"item {item_id} does not exist")
                if msgs[: len(item.prompt)] != item.prompt:
                    raise DataError("the demonstration does not start with the item's prompt", "the prompt, then the reply")
            return Demonstration(item_id=item_id, user_id=user_id, messages=msgs, token=token, seconds=seconds)
        conflict = (Demonstration.item_id == item_id) if item_id is not None else None
        return self._once(make, Demonstration, token, user_id, conflict)

    def submit_ranking(self, user_id: int, item_id: int, ranking: list[int], ties: list[list[int]], token: str,
                       seconds: float, all_bad: bool = False, flags: list[str] | None = None,
                       ratings: dict | None = None, offered: bool = False) -> Submitted:
        """A labeler's ranking of an item's responses (best first), ties, flags and 1-7 ratings.

        An item never gets more than its `labels_needed` rankings (gold items excepted: every
        labeler ranks those). `offered=True` (the web app) accepts only an item that
        `next_ranking_item` gave this labeler and whose claim they still hold; else NotOffered."""
        flags = sorted(set(flags or []))
        bad = [f for f in flags if f not in FLAGS]
        if bad:
            raise DataError(f"unknown report reason {bad[0]!r}", "one of " + ", ".join(FLAGS))
        ratings = ratings or {}

        def make(s):
            item = s.get(Item, item_id, with_for_update=True)  # PostgreSQL: one ranking of an item at a time
            if item is None:
                raise ValueError(f"item {item_id} does not exist")
            if offered and s.scalar(select(Claim.id).where(Claim.item_id == item_id, Claim.user_id == user_id,
                                                           Claim.expires_at > now())) is None:
                raise NotOffered(f"item {item_id} is not yours to rank (it was not given to you, or your claim on it "
                                 f"expired after {self.claim_s / 60:.0f} minutes); open Rank again for your next item")
            done = s.scalar(select(func.count(Ranking.id)).where(Ranking.item_id == item_id))
            if item.gold is None and done >= item.labels_needed:
                raise NotOffered(f"item {item_id} already has the {item.labels_needed} rankings it needs")
            k = len(item.responses)
            from cherrytop.data.records import Comparison
            if k < 2:
                raise DataError(f"item {item_id} has {k} responses", "an item with at least 2 responses to rank")
            c = Comparison(tuple(Prompt.from_json({"messages": item.prompt}).messages), tuple(item.responses),
                           tuple(ranking), tuple(tuple(t) for t in ties))  # validates ranking and ties
            for axis, vals in ratings.items():
                if axis not in AXES:
                    raise DataError(f"unknown rating axis {axis!r}", "one of " + ", ".join(AXES))
                if not isinstance(vals, list) or len(vals) != k or any(
                        v is not None and (not isinstance(v, int) or not 1 <= v <= 7) for v in vals):
                    raise DataError(f"ratings for {axis} are {vals!r}", f"{k} values, each 1..7 or empty")
            s.execute(delete(Claim).where(Claim.item_id == item_id, Claim.user_id == user_id))
            return Ranking(item_id=item_id, user_id=user_id, ranking=list(c.ranking), ties=[list(t) for t in c.ties],
                           all_bad=bool(all_bad), flags=flags, ratings=ratings, token=token, seconds=seconds)
        return self._once(make, Ranking, token, user_id, Ranking.item_id == item_id)

    def submit_review(self, user_id: int, demonstration_id: int, accept: bool, reason: str, token: str,
                      offered: bool = False) -> Submitted:
        """Accept or reject someone else's demonstration; a rejection needs a reason.

        `offered=True` (the web app) accepts only the demonstration `next_review` gave this labeler,
        while they hold its claim and nobody has reviewed it; else NotOffered."""
        reason = _text(reason or "", "the reason").strip()
        if not accept and not reason:
            raise DataError("a rejection needs a reason", "a short reason why the demonstration is rejected")

        def make(s):
            d = s.get(Demonstration, demonstration_id, with_for_update=True)
            if d is None:
                raise ValueError(f"demonstration {demonstration_id} does not exist")
            if d.user_id == user_id:
                raise ValueError("you cannot review your own demonstration")
            if offered:
                held = s.scalar(select(ReviewClaim.id).where(ReviewClaim.demonstration_id == demonstration_id,
                                                             ReviewClaim.user_id == user_id,
                                                             ReviewClaim.expires_at > now()))
                seen = s.scalar(select(Review.id).where(Review.demonstration_id == demonstration_id).limit(1))
                if held is None or seen is not None:
                    raise NotOffered(f"demonstration {demonstration_id} is not yours to review (it was not given to "
                                     "you, someone reviewed it, or your claim on it expired); open Review again")
                s.execute(delete(ReviewClaim).where(ReviewClaim.demonstration_id == demonstration_id))
            return Review(demonstration_id=demonstration_id, user_id=user_id, accept=accept, reason=reason, token=token)
        return self._once(make, Review, token, user_id, Review.demonstration_id == demonstration_id)

    # ------------------------------------------------------------ queues: what a labeler does next

    @staticmethod
    def _to_rank(user_id: int, at: datetime) -> tuple:
        """Items this labeler should rank: rankable, not ranked by them, and either claimed by them,
        gold (every labeler ranks the gold items: their gold score measures each labeler), or short
        of labels counting rankings and other labelers' live claims."""
        done = select(Ranking.item_id).where(Ranking.user_id == user_id)
        mine = select(Claim.item_id).where(Claim.user_id == user_id, Claim.expires_at > at)
        ranked = select(func.count(Ranking.id)).where(Ranking.item_id == Item.id).scalar_subquery()
        claimed = select(func.count(Claim.id)).where(Claim.item_id == Item.id, Claim.user_id != user_id,
                                                     Claim.expires_at > at).scalar_subquery()
        return (Item.n_responses >= 2, Item.id.not_in(done),
                or_(Item.id.in_(mine), Item.gold.is_not(None), ranked + claimed < Item.labels_needed))

    @staticmethod
    def _to_answer(user_id: int) -> Any:
        """Prompts this labeler should answer: nobody's demonstration of them stands (none yet, or
        each one rejected) and this labeler has not answered them (one demonstration per prompt each)."""
        rejected = select(Review.demonstration_id).where(Review.accept.is_(False))
        answered = select(Demonstration.item_id).where(Demonstration.item_id.is_not(None), or_(
            Demonstration.id.not_in(rejected), Demonstration.user_id == user_id))
        return Item.id.not_in(answered)

    def next_ranking_item(self, user_id: int) -> Item | None:
        """The item this labeler should rank next, claimed for them for `claim_s` seconds: the one
        they already hold, else the oldest (gold items first)."""
        return self._claim_next(user_id, Item, Claim, "item_id", self._to_rank, (Item.gold.is_(None),))

    def _claim_next(self, user_id: int, work: Any, claims: Any, key: str, to_do: Any, first: tuple = ()) -> Any:
        """The row of `work` (an item, a demonstration, a battle) this labeler should do next, claimed for them in
        `claims` for `claim_s` seconds: the one they hold, else the first by `first` then id among `to_do(user_id,
        at)`. Under PostgreSQL one labeler at a time claims a row; whoever waited for its lock counts again,
        now seeing the claim just committed (SQLite runs one writer at a time anyway)."""
        at = now()
        held = getattr(claims, key)
        with self.tx() as s:
            s.execute(delete(claims).where(claims.expires_at <= at))
            mine = select(held).where(claims.user_id == user_id)
            order = (work.id.not_in(mine), *first, work.id)
            taken: list[int] = []  # rows others claimed while this labeler waited for them
            while True:
                row_id = s.scalar(select(work.id).where(*to_do(user_id, at), work.id.not_in(taken))
                                  .order_by(*order).limit(1))
                if row_id is None:
                    return None
                taken.append(row_id)
                row = s.scalars(select(work).where(work.id == row_id).with_for_update()).one()
                if s.scalar(select(work.id).where(work.id == row_id, *to_do(user_id, at))) is not None:
                    break
            claim = s.scalars(select(claims).where(held == row_id, claims.user_id == user_id)).first()
            claim = claim or claims(**{key: row_id, "user_id": user_id})
            claim.expires_at = at + timedelta(seconds=self.claim_s)
            try:
                with s.begin_nested():  # a savepoint: the same labeler's other tab may claim it at once
                    s.add(claim)
            except IntegrityError:
                pass
            return row

    def next_demo_item(self, user_id: int) -> Item | None:
        """The oldest prompt this labeler should answer with a demonstration, preferring prompts without
        candidate answers (those are not in the ranking queue)."""
        with self.read() as s:
            q = select(Item).where(self._to_answer(user_id)).order_by(Item.n_responses > 0, Item.id).limit(1)
            return s.scalars(q).first()

    @staticmethod
    def _to_review(user_id: int, at: datetime) -> tuple:
        """Demonstrations this labeler may review: someone else's, unreviewed, not claimed by another."""
        reviewed = select(Review.demonstration_id)
        others = select(ReviewClaim.demonstration_id).where(ReviewClaim.user_id != user_id, ReviewClaim.expires_at > at)
        return (Demonstration.user_id != user_id, Demonstration.id.not_in(reviewed), Demonstration.id.not_in(others))

    def next_review(self, user_id: int) -> Demonstration | None:
        """The demonstration this labeler should review next, claimed for them for `claim_s` seconds
        (only they may review it meanwhile): the one they hold, else the oldest unclaimed one."""
        return self._claim_next(user_id, Demonstration, ReviewClaim, "demonstration_id", self._to_review)

    def queue_counts(self, user_id: int) -> dict[str, int]:
        at = now()
        with self.read() as s:
            rank = s.scalar(select(func.count(Item.id)).where(*self._to_rank(user_id, at)))
            demo = s.scalar(select(func.count(Item.id)).where(self._to_answer(user_id)))
            review = s.scalar(select(func.count(Demonstration.id)).where(*self._to_review(user_id, at)))
            return {"rank": rank, "demo": demo, "review": review}

    # ------------------------------------------------------------ accounts (auth.py hashes passwords)

    def user_by_name(self, name: str) -> User | None:
        with self.read() as s:
            return s.scalars(select(User).where(User.name == name)).first()

    def set_disabled(self, user_id: int, disabled: bool) -> None:
        """Disable (or enable again) an account; disabling also ends its sessions at once."""
        with self.tx() as s:
            user = s.get(User, user_id)
            if user is None:
                raise ValueError(f"user {user_id} does not exist")
            user.disabled = disabled
            if disabled:
                s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))

    def set_password_hash(self, user_id: int, password_hash: str) -> None:
        """Replace an account's password (hash) and end its sessions."""
        with self.tx() as s:
            user = s.get(User, user_id)
            if user is None:
                raise ValueError(f"user {user_id} does not exist")
            user.password_hash = password_hash
            s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))

    def revoke_sessions(self, user_id: int) -> int:
        """Log an account out everywhere; returns how many sessions ended."""
        with self.tx() as s:
            return s.execute(delete(LoginSession).where(LoginSession.user_id == user_id)).rowcount

    # ------------------------------------------------------------ reading back

    def user(self, user_id: int) -> User | None:
        with self.read() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.read() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    def item(self, item_id: int) -> Item | None:
        with self.read() as s:
            return s.get(Item, item_id)

    def items(self) -> list[Item]:
        with self.read() as s:
            return list(s.scalars(select(Item).order_by(Item.id)))

    def rankings(self, item_id: int | None = None, user_id: int | None = None) -> list[Ranking]:
        with self.read() as s:
            q = select(Ranking).order_by(Ranking.id)
            if item_id is not None:
                q = q.where(Ranking.item_id == item_id)
            if user_id is not None:
                q = q.where(Ranking.user_id == user_id)
            return list(s.scalars(q))

    def ranking(self, ranking_id: int) -> Ranking | None:
        with self.read() as s:
            return s.get(Ranking, ranking_id)

    def demonstrations(self, user_id: int | None = None) -> list[Demonstration]:
        with self.read() as s:
            q = select(Demonstration).order_by(Demonstration.id)
            if user_id is not None:
                q = q.where(Demonstration.user_id == user_id)
            return list(s.scalars(q))

    def demonstration(self, demo_id: int) -> Demonstration | None:
        with self.read() as s:
            return s.get(Demonstration, demo_id)

    def reviews(self, user_id: int | None = None) -> list[Review]:
        with self.read() as s:
            q = select(Review).order_by(Review.id)
            if user_id is not None:
                q = q.where(Review.user_id == user_id)
            return list(s.scalars(q))

    def chat_feedback(self) -> list[ChatFeedback]:
        with self.read() as s:
            return list(s.scalars(select(ChatFeedback).order_by(ChatFeedback.id)))

    # ------------------------------------------------------------ arena: side-by-side votes on two models' answers

    def add_battles(self, rows: list[dict], votes_needed: int | None = None, tag: str = "") -> list[int]:
        """Add battles, all or none; returns their ids. Each row: `prompt` (messages ending with a user
        turn, or a string: one user turn), `model_a`, `answer_a`, `model_b`, `answer_b`. The caller
        decides, at random, which model is a (shown on the left). Each battle gets `votes_needed`
        votes (default: `labels_needed`) from different labelers; `tag` names the set of battles."""
        votes_needed = self.labels_needed if votes_needed is None else votes_needed
        if type(votes_needed) is not int or not 1 <= votes_needed <= Battle.MAX_VOTES:
            raise ValueError(f"votes_needed is {votes_needed!r}; expected a whole number from 1 to {Battle.MAX_VOTES}")
        _text(tag, "tag", Battle.MAX_TAG)
        battles = []
        for n, row in enumerate(rows):
            what = f"battle {n}"
            if not isinstance(row, dict):
                raise ValueError(f"{what} is not a dict of prompt, model_a, answer_a, model_b, answer_b")
            prompt = row.get("prompt")
            msgs = _messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                             f"{what}: prompt")
            for m in msgs:
                _text(m["content"], f"{what}: a prompt message")
            chars = sum(len(m["content"]) for m in msgs)
            if chars > Battle.MAX_TEXT:
                raise ValueError(f"{what}: the prompt has {chars} characters; at most {Battle.MAX_TEXT} allowed")
            fields = {k: row.get(k) for k in ("model_a", "answer_a", "model_b", "answer_b")}
            for k, v in fields.items():
                _text(v, f"{what}: {k}", Battle.MAX_MODEL if k.startswith("model") else Battle.MAX_TEXT)
            if not fields["model_a"] or fields["model_a"] == fields["model_b"]:
                raise ValueError(f"{what}: model_a {fields['model_a']!r} and model_b {fields['model_b']!r}; "
                                 "expected two different, non-empty model names")
            battles.append(Battle(tag=tag, prompt=msgs, votes_needed=votes_needed, **fields))
        with self.tx() as s:
            s.add_all(battles)
            s.flush()
            return [b.id for b in battles]

    @staticmethod
    def _to_vote(user_id: int, at: datetime) -> tuple:
        """Battles this labeler should vote on: not voted on by them, short of votes, and either
        claimed by them or short of votes counting other labelers' live claims."""
        done = select(Vote.battle_id).where(Vote.user_id == user_id)
        mine = select(BattleClaim.battle_id).where(BattleClaim.user_id == user_id, BattleClaim.expires_at > at)
        voted = select(func.count(Vote.id)).where(Vote.battle_id == Battle.id).scalar_subquery()
        claimed = select(func.count(BattleClaim.id)).where(BattleClaim.battle_id == Battle.id,
                                                           BattleClaim.user_id != user_id,
                                                           BattleClaim.expires_at > at).scalar_subquery()
        return (Battle.id.not_in(done), voted < Battle.votes_needed,
                or_(Battle.id.in_(mine), voted + claimed < Battle.votes_needed))

    def next_battle(self, user_id: int) -> Battle | None:
        """The battle this labeler should vote on next, claimed for them for `claim_s` seconds: the one
        they already hold, else the oldest (as `next_ranking_item`)."""
        return self._claim_next(user_id, Battle, BattleClaim, "battle_id", self._to_vote)

    def submit_vote(self, user_id: int, battle_id: int, choice: str, token: str, seconds: float,
                    offered: bool = True) -> Submitted:
        """A labeler's vote on a battle: `choice` one of a, b, tie, both_bad. A battle never gets more
        than its `votes_needed` votes, nor two from one labeler. `offered=True` accepts only a battle
        `next_battle` gave this labeler and whose claim they still hold; else NotOffered. The same
        `token` again returns the first submission."""
        if choice not in VOTES:
            raise ValueError(f"vote {str(choice)[:20]!r} is not one of {', '.join(VOTES)}")
        if not _text(token, "token", 64):
            raise ValueError("the submission token is empty")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise ValueError(f"seconds is {seconds!r}; expected a non-negative number")

        def make(s):
            battle = s.get(Battle, battle_id, with_for_update=True)  # PostgreSQL: one vote on a battle at a time
            if battle is None:
                raise ValueError(f"battle {battle_id} does not exist")
            if offered and s.scalar(select(BattleClaim.id).where(
                    BattleClaim.battle_id == battle_id, BattleClaim.user_id == user_id,
                    BattleClaim.expires_at > now())) is None:
                raise NotOffered(f"battle {battle_id} is not yours to vote on (it was not given to you, or your claim "
                                 f"on it expired after {self.claim_s / 60:.0f} minutes); open Arena again")
            done = s.scalar(select(func.count(Vote.id)).where(Vote.battle_id == battle_id))
            if done >= battle.votes_needed:
                raise NotOffered(f"battle {battle_id} already has the {battle.votes_needed} votes it needs")
            s.execute(delete(BattleClaim).where(BattleClaim.battle_id == battle_id, BattleClaim.user_id == user_id))
            return Vote(battle_id=battle_id, user_id=user_id, choice=choice, token=token, seconds=float(seconds))
        return self._once(make, Vote, token, user_id, Vote.battle_id == battle_id)

    def battle_outcomes(self, tag: str | None = None) -> list[tuple[str, str, float]]:
        """One (model_a, model_b, outcome) per vote on the battles tagged `tag` (None: every battle),
        in voting order: 1.0 a won, 0.0 b won, 0.5 a tie or both bad (`cherrytop.eval.arena.ratings`'s input)."""
        with self.read() as s:
            q = select(Battle.model_a, Battle.model_b, Vote.choice).join(Vote, Vote.battle_id == Battle.id)
            if tag is not None:
                q = q.where(Battle.tag == tag)
            return [(a, b, VOTES[c]) for a, b, c in s.execute(q.order_by(Vote.id))]

    def battle_progress(self, tag: str | None = None) -> tuple[int, int]:
        """(votes cast, votes needed) over the battles tagged `tag` (None: every battle)."""
        with self.read() as s:
            done = select(func.count(Vote.id)).join(Battle, Vote.battle_id == Battle.id)
            needed = select(func.coalesce(func.sum(Battle.votes_needed), 0))
            if tag is not None:
                done, needed = done.where(Battle.tag == tag), needed.where(Battle.tag == tag)
            return int(s.scalar(done)), int(s.scalar(needed))

    def battle(self, battle_id: int) -> Battle | None:
        with self.read() as s:
            return s.get(Battle, battle_id)

    def votes(self, battle_id: int | None = None, user_id: int | None = None) -> list[Vote]:
        with self.read() as s:
            q = select(Vote).order_by(Vote.id)
            if battle_id is not None:
                q = q.where(Vote.battle_id == battle_id)
            if user_id is not None:
                q = q.where(Vote.user_id == user_id)
            return list(s.scalars(q))
