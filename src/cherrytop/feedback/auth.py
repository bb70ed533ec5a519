"""Accounts: scrypt password hashes, server-side sessions with a CSRF token each, login rate limiting,
password rules, and what an admin does to an account (disable, reset its password, end its sessions).

Sessions live in the database (a restart logs nobody out); the cookie holds a random token and the
database only its sha256. Every state-changing request must carry the session's CSRF token; the
login form, before a session exists, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from cherrytop.feedback.store import ROLES, LoginAttempt, LoginSession, Store, User, now

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
"""scrypt cost (RFC 7914's interactive-login parameters: ~16 MiB, tens of ms)."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    h = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${h.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, h = stored.split("$")
    except ValueError:
        return False
    if algo != "scrypt":
        return False
    got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(h) // 2)
    return hmac.compare_digest(got.hex(), h)


_DUMMY_HASH = hash_password(secrets.token_hex(8))  # unknown users cost the same time as wrong passwords


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RateLimited(Exception):
    """Too many failed logins from this client address (for this account, or in all); retry after `seconds`."""

    def __init__(self, seconds: int):
        super().__init__(f"too many failed logins; try again in {seconds} s")
        self.seconds = seconds


@dataclass(frozen=True)
class AuthConfig:
    max_failures: int = 5
    """Failed logins allowed for one account from one client address within `window_s`."""
    max_client_failures: int = 20
    """Failed logins allowed from one client address over all accounts within `window_s`."""
    window_s: int = 300
    """Rate-limit window in seconds."""
    session_hours: float = 12.0
    """A session lasts this long after login."""


NAME_CHARS = "-_."
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
COMMON_PASSWORDS = frozenset("""
password passw0rd p@ssword p@ssw0rd pass123 123456 1234567 12345678 123456789 1234567890 12345 1234 111111
000000 123123 654321 666666 121212 112233 qwerty qwertyuiop qwerty123 1q2w3e4r 1q2w3e4r5t asdfgh asdfghjkl
zxcvbnm abc123 abcdef abcd1234 iloveyou monkey dragon letmein welcome admin administrator login master
sunshine princess football baseball superman batman trustno1 shadow michael jennifer whatever freedom
secret changeme default starwars hello test testing guest root labeler cherrytop
""".split())
"""The most common passwords (leaked-password lists' top entries) and this app's obvious words."""


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a user name (1-64 letters, digits, '-', '_', '.'), or None. Checked before
    any query: a NUL or control character would make PostgreSQL fail."""
    if not 1 <= len(name) <= 64 or not all(c.isalnum() or c in NAME_CHARS for c in name):
        shown = name[:64].encode("unicode_escape").decode("ascii")  # control characters shown, not sent
        return f"user name '{shown}' is not valid; expected 1-64 letters, digits, '-', '_' or '.'"
    return None


def password_problem(name: str, password: str) -> str | None:
    """Why `password` is too weak for account `name`, or None."""
    if len(password) < MIN_PASSWORD:
        return f"the password is shorter than {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"the password is longer than {MAX_PASSWORD} characters"
    core = password.lower().rstrip("0123456789!@#$%^&*()-_=+.?~ ")  # "Password1!" is "password"
    if core in COMMON_PASSWORDS or password.lower() in COMMON_PASSWORDS:
        return "the password is one of the most common passwords; choose another"
    if core == name.lower() or password.lower() == name.lower():
        return "the password is the user name"
    classes = sum(any(f(c) for c in password) for f in (str.islower, str.isupper, str.isdigit,
                                                         lambda c: not c.isalnum()))
    if classes < 2:
        return "the password uses one kind of character only; mix letters with digits, capitals or symbols"
    return None


def create_user(store: Store, name: str, password: str, role: str = "labeler") -> int:
    name = name.strip()
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    problem = name_problem(name) or password_problem(name, password)
    if problem:
        raise ValueError(problem)
    try:
        with store.tx() as s:
            u = User(name=name, role=role, password_hash=hash_password(password))
            s.add(u)
            s.flush()
            return u.id
    except IntegrityError:
        raise ValueError(f"user {name!r} already exists") from None


def find_user(store: Store, name: str) -> User:
    """The account called `name`; ValueError if there is none."""
    problem = name_problem(name)
    user = None if problem else store.user_by_name(name)
    if user is None:
        raise ValueError(problem or f"there is no user {name!r}")
    return user


def reset_password(store: Store, name: str, password: str) -> None:
    """Give `name` a new password (checked like a new account's); their sessions end."""
    user = find_user(store, name)
    problem = password_problem(user.name, password)
    if problem:
        raise ValueError(problem)
    store.set_password_hash(user.id, hash_password(password))


def login(store: Store, name: str, password: str, client: str, cfg: AuthConfig = AuthConfig()) -> tuple[User, str, str]:
    """Check a password; returns (user, session token for the cookie, CSRF token).

    Raises RateLimited when this client address has `max_failures` failed logins for this account,
    or `max_client_failures` in all, in the last `window_s` seconds (checked before the password, so
    guessing stops; failures elsewhere never lock the owner out here), ValueError on a malformed
    name, a wrong name or password (the same message for both) or a disabled account."""
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    client = client[:50]
    keys = [f"user:{name}@{client}", f"ip:{client}"]  # at most 5 + 64 + 1 + 50 characters: fits the column
    limits = [cfg.max_failures, cfg.max_client_failures]
    since = now() - timedelta(seconds=cfg.window_s)
    with store.tx() as s:
        s.execute(delete(LoginAttempt).where(LoginAttempt.at < since))
        for key, limit in zip(keys, limits):
            q = select(func.count(LoginAttempt.id), func.min(LoginAttempt.at)).where(LoginAttempt.key == key,
                                                                                     LoginAttempt.at >= since)
            n, first = s.execute(q).one()
            if n >= limit:
                first = first if first.tzinfo else first.replace(tzinfo=since.tzinfo)
                raise RateLimited(max(1, int((first - since).total_seconds())))
        user = s.scalars(select(User).where(User.name == name)).first()
    ok = check_password(password, user.password_hash if user else _DUMMY_HASH) and user is not None
    if not ok:
        with store.tx() as s:
            s.add_all([LoginAttempt(key=k) for k in keys])
        raise ValueError("wrong user name or password")
    if user.disabled:  # told only to whoever knows the password
        raise ValueError("this account is disabled; ask an admin")
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with store.tx() as s:
        s.execute(delete(LoginAttempt).where(LoginAttempt.key == keys[0]))
        s.add(LoginSession(token_hash=_token_hash(token), user_id=user.id, csrf=csrf,
                           expires_at=now() + timedelta(hours=cfg.session_hours)))
    return user, token, csrf


def session_user(store: Store, token: str | None) -> tuple[User, str] | None:
    """(user, CSRF token) of a live session cookie, or None."""
    if not token:
        return None
    with store.read() as s:
        row = s.execute(select(User, LoginSession).join(LoginSession, LoginSession.user_id == User.id)
                        .where(LoginSession.token_hash == _token_hash(token))).first()
    if row is None:
        return None
    user, sess = row
    if user.disabled:
        return None
    expires = sess.expires_at if sess.expires_at.tzinfo else sess.expires_at.replace(tzinfo=now().tzinfo)
    if expires < now():
        with store.tx() as s:
            s.execute(delete(LoginSession).where(LoginSession.id == sess.id))
        return None
    return user, sess.csrf


def logout(store: Store, token: str | None) -> None:
    if token:
        with store.tx() as s:
            s.execute(delete(LoginSession).where(LoginSession.token_hash == _token_hash(token)))


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
