"""Strings from elsewhere made safe to show: no terminal escapes, no bidi tricks, no markup.

Text loratool did not write — a registry's model names, file names and error bodies, a
file's metadata, keys and paths — can carry ESC/OSC sequences (colours, window titles,
hyperlinks, clearing the screen), 8-bit C1 controls (``\\x9b`` is CSI on some terminals),
bidi overrides (U+202E turns ``gnp.exe`` into ``exe.png`` on screen) and rich markup
(``[link=…]``). Such text is printed through :func:`safe` (:func:`printable` for multi-line
values, :func:`markup` where rich renders it): each such character is shown as a visible
escape (``\\x1b``, ``\\u202e``), so the text means on screen exactly what it is. File
names go through :func:`strip_unsafe`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

# Whole escape sequences (7-bit ESC-introduced and 8-bit C1-introduced): CSI, OSC (ended by
# BEL or ST), and two-byte ESC sequences.
ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[@-Z\\-_]"
)
# Unicode categories never shown as themselves: controls (C0, DEL, C1), format characters
# (bidi overrides and isolates, zero-width joiners…), lone surrogates, line/paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def is_unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in UNSAFE_CATEGORIES


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _json_escape(ch: str) -> str:
    n = ord(ch)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000  # JSON spells characters beyond the BMP as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def safe(text: object, keep: str = "") -> str:
    """``text`` as a string fit for a terminal: every unsafe character (but those in
    ``keep``) shown escaped."""
    s = str(text)
    return "".join(_escape(ch) if is_unsafe(ch) and ch not in keep else ch for ch in s)


def printable(text: str) -> str:
    """:func:`safe` for multi-line text from a file (metadata values): newlines and tabs kept."""
    return safe(text, keep="\n\t")


def markup(text: object) -> str:
    """:func:`safe`, then escaped for rich markup (``[bold]`` prints as ``[bold]``)."""
    from rich.markup import escape

    return escape(safe(text))


def strip_unsafe(text: str) -> str:
    """``text`` without escape sequences and unsafe characters (for names saved to disk)."""
    return "".join(ch for ch in ESCAPE_SEQUENCE.sub("", text) if not is_unsafe(ch))


def safe_json(data: Any, indent: int = 2) -> str:
    """Indented JSON (non-ASCII kept readable) in which unsafe characters are ``\\uXXXX``
    escapes: the same data for a parser, nothing a terminal would act on, and always
    encodable as UTF-8 (a lone surrogate from a registry stays an escape)."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
    return "".join(_json_escape(ch) if is_unsafe(ch) and ch != "\n" else ch for ch in text)
