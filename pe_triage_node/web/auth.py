"""Console accounts, server-side sessions, CSRF tokens and the audit log.

Passwords are stored as argon2id hashes (``argon2-cffi`` defaults, RFC 9106).
A session cookie carries a random token; the database keeps only its sha256,
with the session's CSRF token, so a stolen database copy does not sign anyone in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from pe_triage_node.db.models import AuditEvent, WebSession, WebUser, utcnow
from pe_triage_node.errors import PETriageError

log = logging.getLogger(__name__)

ROLES = ("viewer", "admin")
_USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
MAX_FAILED_SIGN_INS = 10
FAILED_SIGN_IN_WINDOW = dt.timedelta(minutes=15)
_hasher = PasswordHasher()
# Verified against when the user does not exist, so timing does not reveal names.
_DUMMY_HASH = _hasher.hash("not-a-real-password-0")


class UserError(PETriageError):
    """A user cannot be created or changed; the message says why."""


@dataclass(frozen=True)
class CurrentUser:
    """The signed-in user of one request."""

    user_id: int
    username: str
    role: str
    session_id: int
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def check_username(name: str) -> str:
    if not _USERNAME_RE.match(name):
        raise UserError(
            f"user name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


def add_user(session: Session, username: str, password: str, role: str) -> WebUser:
    """Create a user (inside the caller's transaction); raises :class:`UserError`."""
    check_username(username)
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(WebUser.id).where(WebUser.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    user = WebUser(username=username, password_hash=_hasher.hash(password), role=role)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    user = session.scalars(select(WebUser).where(WebUser.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
    user.password_hash = _hasher.hash(password)
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))  # sign out everywhere


def list_users(session: Session) -> list[WebUser]:
    return list(session.scalars(select(WebUser).order_by(WebUser.username)))


def verify_password(session: Session, username: str, password: str) -> WebUser | None:
    """The user when ``password`` is right and the account enabled, else ``None``."""
    user = session.scalars(select(WebUser).where(WebUser.username == username)).first()
    if user is None:
        try:
            _hasher.verify(_DUMMY_HASH, password)
        except VerificationError:
            pass
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


def start_session(session: Session, user: WebUser, max_hours: int) -> str:
    """Record a new session for ``user`` and return the cookie token (shown once, never stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            token_sha256=_sha256(token),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + dt.timedelta(hours=max_hours),
        )
    )
    user.last_sign_in_at = now
    session.execute(delete(WebSession).where(WebSession.expires_at < now))  # tidy up
    session.flush()
    return token


def resolve_session(session: Session, token: str | None, idle_minutes: int) -> CurrentUser | None:
    """The user behind a cookie token, or ``None`` (unknown, expired, idle too long, disabled)."""
    if not token or len(token) > 128:
        return None
    try:
        digest = _sha256(token)
    except UnicodeEncodeError:
        return None
    row = session.execute(
        select(WebSession, WebUser).join(WebUser, WebUser.id == WebSession.user_id).where(
            WebSession.token_sha256 == digest
        )
    ).first()
    if row is None:
        return None
    web_session, user = row
    now = utcnow()
    if (
        user.disabled
        or web_session.expires_at <= now
        or web_session.last_seen_at + dt.timedelta(minutes=idle_minutes) <= now
    ):
        session.delete(web_session)
        return None
    if now - web_session.last_seen_at > dt.timedelta(seconds=60):  # bounded write rate
        web_session.last_seen_at = now
    return CurrentUser(user.id, user.username, user.role, web_session.id, web_session.csrf_token)


def end_session(session: Session, session_id: int) -> None:
    session.execute(delete(WebSession).where(WebSession.id == session_id))


def tokens_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; missing on either side never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def audit(
    session: Session,
    action: str,
    *,
    username: str | None,
    target: str | None = None,
    detail: str | None = None,
    remote_addr: str | None = None,
) -> None:
    """Append an audit event (no PHI: targets are internal ids, rule set numbers, job ids)."""
    session.add(
        AuditEvent(
            username=username,
            action=action[:32],
            target=target[:200] if target else None,
            detail=detail,
            remote_addr=remote_addr[:64] if remote_addr else None,
        )
    )


def too_many_failures(session: Session, username: str, *, limit: int = MAX_FAILED_SIGN_INS,
                      window: dt.timedelta = FAILED_SIGN_IN_WINDOW) -> bool:
    """True when ``username`` had ``limit`` failed sign-ins within ``window`` (password guessing)."""
    since = utcnow() - window
    failures = session.scalar(
        select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "sign-in-failed", AuditEvent.username == username, AuditEvent.at >= since
        )
    )
    return int(failures or 0) >= limit


def recent_audit(session: Session, limit: int = 50) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)))
