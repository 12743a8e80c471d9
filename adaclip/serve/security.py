"""Who may talk to the server: the bind address check and the optional bearer token."""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from pathlib import Path

from ..errors import UsageError
from ..files import read_text_file
from ..ui import log

# Load balancers and orchestrators probe these without credentials; they reveal nothing but liveness.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def read_token_file(path: Path) -> str:
    """The bearer token: the file's first line, at least 16 characters."""
    text = read_text_file(path, "token file", UsageError)
    token = (text.strip().splitlines() or [""])[0].strip()
    if len(token) < 16:
        raise UsageError(
            "token file must hold a token of at least 16 characters on its first line",
            path=path,
            fix="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt",
        )
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(f"token file {path} is readable by other users (chmod 600 it)")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_matches(header: bytes | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token.encode())
