"""Keep secrets out of what a run writes: ``config.json``, ``metrics.jsonl``, log lines,
checkpoints' client state, wandb's config.

Masked: the value of every environment variable whose name says it is a secret
(``WANDB_API_KEY``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``*PASSWORD*``, ...) wherever it
appears; passwords in URLs (``https://user:PW@host``); secret-looking query parameters
(``?token=``, ``X-Amz-Signature=``, ...), ``NAME=value`` assignments and ``--password X``
flags (as in ``pipe:`` shard sources), and ``Authorization: Bearer ...`` values.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from dtp_ds.secrets import SECRET_NAME, SECRET_WORDS, WORDS

MASK = "***"
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") are not searched for

_PATTERNS = [
    # scheme://user:password@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*):([^/\s@'\"]+)@"), r"\1:" + MASK + "@"),
    # ?token=..., &X-Amz-Signature=...
    (re.compile(r"([?&;][^=&\s'\"]*(?<![a-z])(?:" + WORDS + r"|signature|sig)(?![a-z])[^=&\s'\"]*=)([^&\s'\"]+)",
                re.I),
     r"\1" + MASK),
    # NAME=value (NAME secret-looking), as in `pipe:env HF_TOKEN=... curl ...`
    (re.compile(r"\b([A-Za-z0-9_]*" + SECRET_WORDS + r"[A-Za-z0-9_]*=)([^\s'\"&]+)", re.I), r"\1" + MASK),
    # --password X / --api-key=X
    (re.compile(r"(--?[A-Za-z0-9-]*" + SECRET_WORDS + r"[A-Za-z0-9-]*(?:=|\s+))([^\s'\"-][^\s'\"]*)", re.I),
     r"\1" + MASK),
    # Authorization: Basic X, Bearer X
    (re.compile(r"(Authorization:\s*(?:Basic|Bearer|Token)\s+|\bBearer\s+)[A-Za-z0-9._~+/=-]{6,}", re.I),
     r"\1" + MASK),
]


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-named environment variables, longest first."""
    env = os.environ if env is None else env
    vals = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret masked."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like object with every string redacted, and the value of every
    secret-named key masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, Mapping):
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str) and v
                    else redact_obj(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, secrets) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """Mask secrets in everything the root logger's handlers emit."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def one_line(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a dataloader worker (whose message
    is a traceback), the original exception's own message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
