"""Optional bearer API keys for the OpenAI routes.

Keys come from an environment variable (comma-separated) and/or a file (one key per line, blank lines
and `#` comments skipped), read where the app is built. Only SHA-256 digests of the keys travel to the
ingress (its init args are stored by Serve), the comparison is constant-time, and no key, digest or
presented token is ever logged or echoed in an error.
"""
from __future__ import annotations

import hashlib
import hmac
import os


class ApiKeyError(ValueError):
    """The config asks for API keys but none could be read (the server refuses to start open)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _split(text: str, sep: str | None) -> list[str]:
    keys = []
    for line in text.splitlines() if sep is None else text.split(sep):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def load_key_digests(env_name: str | None, file: str | None) -> list[str] | None:
    """None when auth is off (neither source configured); else the sorted digests of every key.

    Raises ApiKeyError when a configured source yields no key at all: a typo in a variable name must
    not silently open the server."""
    if not env_name and not file:
        return None
    keys: list[str] = []
    if env_name:
        keys += _split(os.environ.get(env_name, ""), ",")
    if file:
        try:
            with open(os.path.expanduser(file), encoding="utf-8") as f:
                keys += _split(f.read(), None)
        except OSError as e:
            raise ApiKeyError(f"api_keys_file {file!r} cannot be read: {e.strerror}") from None
    if not keys:
        where = " and ".join(x for x in (env_name and f"environment variable {env_name}",
                                           file and f"file {file!r}") if x)
        raise ApiKeyError(f"API keys are configured but {where} holds none; refusing to start without auth")
    for k in keys:
        if any(c.isspace() for c in k):
            raise ApiKeyError("an API key contains whitespace")
    return sorted({digest(k) for k in keys})


class KeyChecker:
    def __init__(self, digests: list[str] | None):
        self.digests = [d.encode() for d in digests] if digests else None

    @property
    def enabled(self) -> bool:
        return self.digests is not None

    def check(self, authorization: str | None) -> bool:
        """True for a valid `Bearer <key>` header (or when auth is off)."""
        if self.digests is None:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        d = digest(token.strip()).encode()
        ok = False
        for want in self.digests:                 # no early exit: time does not depend on which key
            ok |= hmac.compare_digest(d, want)
        return ok
