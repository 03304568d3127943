"""Text helpers every renderer uses: a one-line preview, and text wrapped whole."""

from __future__ import annotations

import json
import shutil
import textwrap
from typing import Any

from ..spec.templates import is_list


def short(value: Any, width: int = 48) -> str:
    """A preview of an output on one line; never used for errors, whose fix is at their end."""
    if is_list(value) and not isinstance(value, (list, tuple)):  # a map's output on disk: its first items
        value = value[:width]
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def whole(prefix: str, text: str, indent: int, width: int | None = None) -> str:
    """`prefix` and then `text` complete, wrapped at spaces to `width` columns (default: the
    terminal's), continuation lines indented by `indent`.

    For errors: their fix is at their end, so they are never cut, and words are never broken,
    so a URL or a command in a hint stays copyable.
    """
    width = max(width or shutil.get_terminal_size((100, 24)).columns, indent + 40)
    pad = " " * indent
    lines = []
    for i, line in enumerate(text.splitlines() or [""]):
        first = prefix if i == 0 else pad
        lines.append(textwrap.fill(line, width, initial_indent=first, subsequent_indent=pad,
                                   break_long_words=False, break_on_hyphens=False) or first.rstrip())
    return "\n".join(lines)


def size_text(size: int) -> str:
    """Bytes as written in a spec: `1 GiB` for 2**30, `500 MB` for 500,000,000."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} B"
