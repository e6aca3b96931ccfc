"""Strict hostname validation: every name that reaches ssh, pdsh or a hostfile is an
RFC 1123 host name, so none can carry shell syntax or pose as a command-line option."""
from __future__ import annotations

import re

MAX_NAME = 253
MAX_LABEL = 63
_ALLOWED = re.compile(r"[A-Za-z0-9.-]")
RULE = "RFC 1123 host names use only letters, digits, '-' and '.'"


class HostnameError(ValueError):
    """A host name was refused; the message names the rule it breaks."""


def validate_hostname(name: str) -> str:
    """Return ``name`` if it is a valid RFC 1123 host name (IPv4 dotted quads pass too), else
    raise HostnameError naming the broken rule."""
    if not isinstance(name, str) or name == "":
        raise HostnameError("refused hostname '': empty (a host name needs at least one label)")
    shown = repr(name)
    bad = sorted({c for c in name if not _ALLOWED.fullmatch(c)})
    if bad:
        chars = " ".join(repr(c) for c in bad)
        space = " (whitespace)" if any(c.isspace() for c in bad) else ""
        raise HostnameError(f"refused hostname {shown}: character{'s' if len(bad) > 1 else ''} {chars}{space} "
                            f"not allowed ({RULE}; nothing a shell would interpret)")
    if len(name) > MAX_NAME:
        raise HostnameError(f"refused hostname {shown}: {len(name)} characters, more than the {MAX_NAME} RFC 1123 "
                            f"allows")
    for label in name.split("."):
        if label == "":
            raise HostnameError(f"refused hostname {shown}: empty label (leading, trailing or doubled '.')")
        if len(label) > MAX_LABEL:
            raise HostnameError(f"refused hostname {shown}: label '{label[:20]}...' is {len(label)} characters, "
                                f"more than the {MAX_LABEL} RFC 1123 allows")
        if label.startswith("-") or label.endswith("-"):
            raise HostnameError(f"refused hostname {shown}: label '{label}' starts or ends with '-' (RFC 1123; "
                                f"a leading '-' would also read as a command-line option)")
    return name
