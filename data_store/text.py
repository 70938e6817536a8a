"""What text the store accepts: any valid Unicode, verbatim, except what UTF-8 or PostgreSQL cannot hold."""

from __future__ import annotations

import re

# JSON's "\ud800" escapes decode to lone UTF-16 surrogates, which UTF-8 cannot encode; PostgreSQL
# text cannot hold NUL. Both are refused at the edge rather than mangled or crashing the write.
_BAD = re.compile("[\ud800-\udfff\x00]")


def unstorable(value: str) -> str | None:
    """Why `value` cannot be stored as it is, or None when it can."""
    m = _BAD.search(value)
    if m is None:
        return None
    ch = m.group()
    what = "a NUL character" if ch == "\x00" else f"an unpaired UTF-16 surrogate (\\u{ord(ch):04x})"
    return f"contains {what} at position {m.start()}; send valid Unicode text"
