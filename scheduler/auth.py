"""API tokens and roles.

A token is `shoal_<id>_<secret>`: `id` (8 hex chars) is public and names the token in listings
and revocation; the whole token is shown once, at creation, and the store keeps only
HMAC-SHA256(server secret, token). Tokens carry 256 random bits, so a slow password hash adds
nothing against guessing; the keyed HMAC means a stolen database alone cannot be used to check
guesses, and verifying costs microseconds (it runs on every request). The server secret lives in
`$SHOAL_HOME/server.secret` (mode 0600) or the `SHOAL_SECRET` environment variable; losing it
invalidates every token (create new ones with the admin token the server writes on start).
Replicas sharing one database (HA) must share the secret too: the database keeps a fingerprint of
the secret its tokens were made with (`TokenAuthority.check_secret`), and a server started with
another secret refuses to start rather than reject every token after a fail-over. After a lost
secret, `shoal up --rotate-secret` adopts the new one and revokes every old token (they cannot
verify any more anyway); the server then writes a fresh admin token.

Roles, from most to least power:
  admin       cluster admin: everything, every team
  team-admin  a member who may also change their own team's quota limits (see `TEAM_ADMIN_FIELDS`)
              and manage their team's users' tokens
  member      submits and manages their team's jobs; reads their team's quota and usage
  viewer      reads their team's jobs, quota and usage
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from scheduler.models import Role
from scheduler.store import Store, TokenRecord


ALL_ROLES = frozenset(Role)
WRITERS = frozenset({Role.admin, Role.team_admin, Role.member})  # may act on their team's jobs
ADMINS = frozenset({Role.admin})

# The TeamConfig fields a team admin may change for their own team: how much of its idle quota
# it lends and how much it borrows within its cohort. Nominal quota, cohort membership, weight and
# budget move capacity or money between teams and stay with cluster admins.
TEAM_ADMIN_FIELDS = frozenset({"lending_limit", "borrowing_limit"})


@dataclass(frozen=True)
class Principal:
    user: str
    team: str | None
    role: Role
    token_id: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin

    def sees_team(self, team: str) -> bool:
        return self.is_admin or team == self.team

    def teams_filter(self) -> list[str] | None:
        """Teams whose jobs this principal may see; None = all."""
        return None if self.is_admin else [self.team] if self.team else []


class AuthError(Exception):
    """Missing, unknown, expired or revoked token (HTTP 401)."""


SECRET_FINGERPRINT_KEY = "token_secret_fingerprint"


class SecretMismatch(RuntimeError):
    """The server secret differs from the one the database's tokens were made with."""


def load_or_create_secret(home: Path) -> bytes:
    if env := os.environ.get("SHOAL_SECRET"):
        return env.encode()
    path = home / "server.secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), replacing any earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class TokenAuthority:
    """Creates and verifies tokens. Verified tokens are cached for `cache_s` seconds (so a
    revocation made through another server process takes effect within that time; one made
    through this one at once)."""

    def __init__(self, store: Store, secret: bytes, clock=time.time, cache_s: float = 2.0):
        self.store = store
        self._secret = secret
        self._clock = clock
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal, float | None]] = {}
        self._lock = threading.Lock()

    def _fingerprint(self) -> str:
        return hmac.new(self._secret, b"shoal-secret-fingerprint", hashlib.sha256).hexdigest()[:16]

    def check_secret(self) -> None:
        """Refuse a secret other than the one this database's tokens were made with (raises
        SecretMismatch); the first server to start records its secret's fingerprint."""
        mine = self._fingerprint()
        stored = self.store.claim_meta(SECRET_FINGERPRINT_KEY, mine)
        if stored != mine:
            raise SecretMismatch(
                "this database's API tokens were made with another server secret (fingerprint "
                f"{stored}, this server's {mine}): give every server that shares the database the same "
                "secret (the SHOAL_SECRET environment variable, or the same $SHOAL_HOME/server.secret); "
                "if the old secret is lost, start once with --rotate-secret (revokes every token)")

    def rotate_secret(self) -> int:
        """Adopt this server's secret for the database and revoke every token made with another
        (all of them, unless the secret is unchanged). Returns how many were revoked."""
        if self.store.claim_meta(SECRET_FINGERPRINT_KEY, self._fingerprint()) == self._fingerprint():
            return 0
        now = self._clock()
        revoked = 0
        for tok in self.store.tokens():
            if tok.revoked_at is None and self.store.revoke_token(tok.id, now) is not None:
                revoked += 1
        self.store.set_meta(SECRET_FINGERPRINT_KEY, self._fingerprint())
        self.forget()
        return revoked

    def digest(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def create(self, user: str, team: str | None, role: Role, *, ttl_s: float | None = None,
               description: str = "") -> tuple[str, TokenRecord]:
        """Creates (or updates) the user with this team and role and returns a new token for
        them: (the token, shown only now; its record)."""
        now = self._clock()
        self.store.put_user(user, team, role.value, now)
        token_id = secrets.token_hex(4)
        token = f"shoal_{token_id}_{secrets.token_urlsafe(32)}"
        rec = self.store.add_token(token_id, self.digest(token), user, description, now,
                                   None if ttl_s is None else now + ttl_s)
        self.forget()
        return token, rec

    def forget(self) -> None:
        """Drop cached verifications (after a revocation or a user change)."""
        with self._lock:
            self._cache.clear()

    def verify(self, token: str) -> Principal:
        now = self._clock()
        d = self.digest(token)
        with self._lock:
            hit = self._cache.get(d)
        if hit is not None and hit[0] > now and (hit[2] is None or hit[2] > now):
            return hit[1]
        found = self.store.token_principal(d)
        if found is None:
            raise AuthError("unknown token")
        tok, user = found
        if tok.revoked_at is not None:
            raise AuthError(f"token {tok.id} was revoked")
        if tok.expires_at is not None and tok.expires_at <= now:
            raise AuthError(f"token {tok.id} expired")
        try:
            role = Role(user.role)
        except ValueError:
            raise AuthError(f"user {user.name} is disabled") from None
        p = Principal(user.name, user.team, role, tok.id)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[d] = (now + self._cache_s, p, tok.expires_at)
        return p

    def ensure_admin_token(self, path: Path) -> bool:
        """First start: create user `admin` (role admin) and write a token for it to `path`
        (mode 0600). Later starts keep a file whose token still verifies. Returns True if a new
        token was written."""
        try:
            if self.verify(path.read_text().strip()).is_admin:
                return False
        except (OSError, AuthError):
            pass
        token, _ = self.create("admin", None, Role.admin, description=f"bootstrap admin token ({path})")
        write_private(path, token + "\n")
        return True
