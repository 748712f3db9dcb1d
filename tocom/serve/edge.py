"""The HTTP edge of ``tocom serve`` without Ray: what a request may say, checked before it is used.

Query parameters, headers and the bearer token are parsed here, in plain Python, so that each has
one clear error (:class:`BadRequest`, a 400) and can be tested without a running service.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

TOKEN_ENV = "TOCOM_SERVE_TOKEN"
# RFC 6750's b64token: what a client can put after "Bearer " without quoting or escaping
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_K_DIGITS = 6  # no classifier has a million classes; longer numbers are refused before int()
_LENGTH_DIGITS = 18  # about an exabyte: any longer Content-Length is nonsense, not a big body
_SHOWN = 20  # characters of a bad value quoted back to the client


class BadRequest(ValueError):
    """A query parameter or header that this service does not accept (the message says why)."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _ascii_int(text: str, digits: int) -> int | None:
    """``text`` as an int when it is 1 to ``digits`` ASCII digits, else None.

    ``str.isdigit`` accepts ``²`` and other digits ``int`` refuses, and ``int`` of a long string
    costs time quadratic in its length; the pattern allows neither.
    """
    if re.fullmatch(rf"[0-9]{{1,{digits}}}", text) is None:
        return None
    return int(text)


def parse_k(text: str | None, default: int, num_classes: int) -> int:
    """``k`` of ``/v1/classify``: 1 to ``num_classes``; without one, ``default`` (at most the classes)."""
    if text is None:
        return max(1, min(default, num_classes))
    k = _ascii_int(text, _K_DIGITS)
    if k is None or not 1 <= k <= num_classes:
        raise BadRequest(f"k must be an integer from 1 to {num_classes}, got {_shown(text)}")
    return k


def parse_content_length(text: str | None) -> int | None:
    """The declared body size in bytes, None when the header is absent (a chunked body)."""
    if text is None:
        return None
    size = _ascii_int(text.strip(), _LENGTH_DIGITS)
    if size is None:
        raise BadRequest(f"Content-Length must be a byte count, got {_shown(text)}")
    return size


def load_token(path: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token from the file ``path`` (its first line), else ``$TOCOM_SERVE_TOKEN``, else None."""
    environ = os.environ if environ is None else environ
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the token file {path}: {err}") from None
        token, source = (lines[0].strip() if lines else ""), f"the token file {path}"
    elif TOKEN_ENV in environ:
        token, source = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if not token:
        raise ValueError(f"{source} is empty; put the token on its first line")
    if _TOKEN.fullmatch(token) is None:
        # the message must not quote the token: it may be most of a real one
        raise ValueError(f"{source} holds characters a client cannot send in a header; use letters, digits "
                         "and -._~+/, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    return token


def token_digest(token: str) -> str:
    """The SHA-256 of a token (hex): what a deployment keeps, so the token itself travels nowhere."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def bearer_matches(header: str | None, digest: str) -> bool:
    """Whether an ``Authorization`` header carries the token whose :func:`token_digest` is ``digest``.

    The digests are compared with :func:`hmac.compare_digest`: the time taken says nothing about
    how much of a guess was right.
    """
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Starlette decodes headers as Latin-1, so any header re-encodes; a non-ASCII one never matches.
    presented = hashlib.sha256(given.strip().encode("latin-1")).digest()
    return hmac.compare_digest(presented, bytes.fromhex(digest))


def file_identity(path: str | None) -> dict[str, str] | None:
    """``{"name", "sha256"}`` of a file: what ``/v1/info`` shows instead of its absolute path."""
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": os.path.basename(path), "sha256": digest.hexdigest()}
