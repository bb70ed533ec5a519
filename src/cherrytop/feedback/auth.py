"""Accounts: scrypt password hashes, server-side sessions with a CSRF token each, login rate limiting.

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
    """Too many failed logins for this account or address; retry after `seconds`."""

    def __init__(self, seconds: int):
        super().__init__(f"too many failed logins; try again in {seconds} s")
        self.seconds = seconds


@dataclass(frozen=True)
class AuthConfig:
    max_failures: int = 5
    """Failed logins allowed per account and per client address within `window_s`."""
    window_s: int = 300
    """Rate-limit window in seconds."""
    session_hours: float = 12.0
    """A session lasts this long after login."""


def create_user(store: Store, name: str, password: str, role: str = "labeler") -> int:
    name = name.strip()
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"user name {name!r} is not valid; expected 1-64 letters, digits, '-', '_' or '.'")
    if len(password) < 8:
        raise ValueError("the password is shorter than 8 characters")
    try:
        with store.tx() as s:
            u = User(name=name, role=role, password_hash=hash_password(password))
            s.add(u)
            s.flush()
            return u.id
    except IntegrityError:
        raise ValueError(f"user {name!r} already exists") from None


def login(store: Store, name: str, password: str, client: str, cfg: AuthConfig = AuthConfig()) -> tuple[User, str, str]:
    """Check a password; returns (user, session token for the cookie, CSRF token).

    Raises RateLimited when the account or the client address has `max_failures` failed logins in
    the last `window_s` seconds (checked before the password, so guessing stops), ValueError on a
    wrong name or password (the same message for both)."""
    keys = [f"user:{name[:100]}", f"ip:{client[:100]}"]
    since = now() - timedelta(seconds=cfg.window_s)
    with store.tx() as s:
        s.execute(delete(LoginAttempt).where(LoginAttempt.at < since))
        for key in keys:
            q = select(func.count(LoginAttempt.id), func.min(LoginAttempt.at)).where(LoginAttempt.key == key,
                                                                                     LoginAttempt.at >= since)
            n, first = s.execute(q).one()
            if n >= cfg.max_failures:
                first = first if first.tzinfo else first.replace(tzinfo=since.tzinfo)
                raise RateLimited(max(1, int((first - since).total_seconds())))
        user = s.scalars(select(User).where(User.name == name)).first()
    ok = check_password(password, user.password_hash if user else _DUMMY_HASH) and user is not None
    if not ok:
        with store.tx() as s:
            s.add_all([LoginAttempt(key=k) for k in keys])
        raise ValueError("wrong user name or password")
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
