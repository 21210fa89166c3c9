# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine's SSO service: password grant, token check, logout.

The SDK posts a form to ``/ovirt-engine/sso/oauth/token`` and reads JSON back
(it never looks at the HTTP status); an ``error`` key makes it raise
AuthError. The engine answers failures of the API scope with HTTP 400 and
``error_code`` plus ``error``, which the SDK shows as
"Error during SSO authentication <error_code> : <error>".
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time

SCOPE = "ovirt-app-api"
# The engine's default token lifetime (SSO_TOKEN_TIMEOUT, 10 hours).
TOKEN_LIFETIME = 36000

OK = 200
BAD_REQUEST = 400


class Sso:
    def __init__(self, db, username: str, password: str, lifetime: int = TOKEN_LIFETIME):
        self.db = db
        self.username = username
        self.password = password
        self.lifetime = lifetime

    def token(self, form: dict[str, str]) -> tuple[int, dict]:
        """Answer a token request: (HTTP status, JSON object)."""
        grant = form.get("grant_type")
        if grant != "password":
            return BAD_REQUEST, {
                "error_code": "unsupported_grant_type",
                "error": f"The grant type '{grant}' is not supported: use 'password'.",
            }
        username = form.get("username", "")
        if "@" not in username:
            return BAD_REQUEST, {
                "error_code": "access_denied",
                "error": f"Cannot authenticate user '{username}': "
                "No valid profile found in credentials..",
            }
        if not self._valid(username, form.get("password", "")):
            return BAD_REQUEST, {
                "error_code": "access_denied",
                "error": f"Cannot authenticate user '{username}': "
                "The username or password is incorrect..",
            }
        token = secrets.token_urlsafe(48)
        now = time.time()
        with self.db.transaction():
            self.db.run("DELETE FROM tokens WHERE expires < ?", (now,))
            self.db.run(
                "INSERT INTO tokens (token, username, created, expires) VALUES (?, ?, ?, ?)",
                (token, username, now, now + self.lifetime),
            )
        return OK, {
            "access_token": token,
            "scope": form.get("scope") or SCOPE,
            "exp": str(int((now + self.lifetime) * 1000)),
            "token_type": "bearer",
        }

    def logout(self, form: dict[str, str]) -> tuple[int, dict]:
        token = form.get("token")
        if token:
            self.db.run("DELETE FROM tokens WHERE token = ?", (token,))
        return OK, {}

    def authenticate(self, authorization: str | None) -> str | None:
        """The user an Authorization header stands for, or None.

        Bearer tokens come from the token call; HTTP Basic with the lab
        credentials is accepted too, as the engine accepts it.
        """
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer" and value:
            row = self.db.one("SELECT * FROM tokens WHERE token = ?", (value,))
            if row is None or row["expires"] < time.time():
                return None
            return row["username"]
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            username, _, password = decoded.partition(":")
            if self._valid(username, password):
                return username
        return None

    def _valid(self, username: str, password: str) -> bool:
        return hmac.compare_digest(username, self.username) and hmac.compare_digest(
            password, self.password
        )
