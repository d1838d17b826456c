"""User-facing errors. The CLI turns them into exit code 2 and one line per problem.

Values echoed into a problem go through `show` (or `clean`): non-printable characters are escaped
(an error line is one line and cannot drive the terminal) and long values are cut, giving their
full length, so a multi-megabyte value in an input file never floods the screen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SHOWN = 80  # characters of an echoed value
MAX_MESSAGE = 1000  # a safety net for whole messages; echoed values are already cut to MAX_SHOWN


def _escape(ch: str) -> str:
    code = ord(ch)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")


def clean(text: str, limit: int | None = MAX_SHOWN) -> str:
    """Text for an error line: non-printable characters escaped (\\n, \\u001b), cut after `limit`
    characters with an ellipsis and the full length."""
    text = str(text)
    cut = limit is not None and len(text) > limit
    head = text[:limit] if cut else text
    if not head.isprintable():
        head = "".join(c if c.isprintable() else _escape(c) for c in head)
    return f"{head}… ({len(text):,} characters)" if cut else head


def show(value, limit: int = MAX_SHOWN) -> str:
    """A value as the user wrote it in TOML/JSON (true, "text", 3, ["a", "b"]), cut when long."""
    if isinstance(value, str):
        cut = len(value) > limit
        text = json.dumps(value[:limit] if cut else value, ensure_ascii=False)
        text = clean(text, None)
        return f"{text[:-1]}…\" ({len(value):,} characters)" if cut else text
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(v, limit) for v in value[:limit]) + "]"
        if len(text) > limit or len(value) > limit:
            return f"{text[:limit]}… ({len(value):,} items)"
        return text
    if isinstance(value, dict):
        return clean(json.dumps(value, ensure_ascii=False, default=str), limit)
    try:
        return clean(repr(value), limit)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"an integer of about {value.bit_length() * 0.30103:,.0f} digits"


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One problem in one input file: `FILE: [section] key: message (allowed: ...)`."""

    file: str
    section: str | None = None
    key: str | None = None
    message: str
    allowed: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        where = clean(self.file, None)
        if self.section:
            where += f": [{clean(self.section)}]"
        if self.key:
            key = clean(self.key)
            where += f" {key}" if self.section else f": {key}"
        text = f"{where}: {clean(self.message, MAX_MESSAGE)}"
        if self.allowed:
            text += f" (allowed: {clean(self.allowed, MAX_MESSAGE)})"
        if self.variant:
            text += f" (in variant {clean(self.variant, MAX_MESSAGE)})"
        return text


class UserError(Exception):
    """Bad input: every problem found, reported together; exit code 2."""

    def __init__(self, problems: list[Problem] | list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        # plain-string problems may carry user text (paths, names): escape control characters there too
        return [str(p) if isinstance(p, Problem) else clean(p, 4000) for p in self.problems]
