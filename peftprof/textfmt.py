"""Plain-text tables and size formatting for the CLI (no pandas: the CLI starts fast).

Everything here that prints user strings makes them inert for where they go: terminal text shows control
characters as escapes (`visible`), CSV cells never start a spreadsheet formula (`csv_cell`), markdown
cells cannot end a cell or a row (`md_cell`).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from decimal import Decimal, InvalidOperation

GIB = 1 << 30
MAX_SIZE = 1 << 60  # 1 EiB: larger sizes are typos (and would overflow float arithmetic downstream)

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def _is_control(c: str) -> bool:
    # Cc: C0, DEL and C1 (ANSI escape sequences start with ESC or CSI); Cf: bidi overrides and zero-width marks
    # (text that displays in another order than it is stored)
    return unicodedata.category(c) in ("Cc", "Cf")


def visible(text) -> str:
    """`text` with control and format characters replaced by a visible escape (ESC -> \\x1b)."""
    s = str(text)
    if s.isprintable():  # fast path: no control characters
        return s
    return "".join(_escape_char(c) if _is_control(c) else c for c in s)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


SIZE_UNITS = (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size_unit(values) -> tuple[str, int]:
    """The largest binary unit (GiB, MiB, KiB) in which the largest of `values` (bytes; None ignored) is at least
    1, so that a table of tiny models does not read 0.00 throughout: (its name, its size in bytes)."""
    largest = max((abs(v) for v in values if v is not None), default=0)
    for name, size in SIZE_UNITS:
        if largest >= size:
            return name, size
    return SIZE_UNITS[-1]


def in_unit(n: float | None, size: int) -> str:
    """`n` bytes in a unit of `size` bytes, two decimals ("-" for None)."""
    return "-" if n is None else f"{n / size:.2f}"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[visible(c) for c in headers]] + [["" if c is None else visible(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A string a spreadsheet would run as a formula (starts with = + - @ tab CR) gets a leading ' (OWASP
    CSV injection); plain numbers such as -1.5, a lone "-" (no value) and non-strings are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and value != "-" and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(headers: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(h) for h in headers])
    w.writerows([csv_cell(c) for c in row] for row in rows)
    return buf.getvalue()


def md_cell(value) -> str:
    """One markdown (GFM) table cell: on one line, `|` and `\\` escaped, no HTML or link syntax."""
    s = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("&", "&amp;").replace("<", "&lt;")
    s = s.replace(">", "&gt;").replace("](", "]\\(").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return visible(s)


def parse_fraction(text: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05. ValueError on anything else or outside [0, 1)."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 1:
        raise ValueError(f"{text!r} is not a fraction in [0, 1)")
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE = re.compile(r"(\d+(\.\d*)?|\.\d+)(E[+-]?\d+)?")
SIZE_EXAMPLES = "e.g. 512MiB, 16GiB, 24GB"


def parse_size(text: str) -> int:
    """'24GiB', '16 GB', '1024' -> bytes: a whole number of bytes from 1 to 2**60. ValueError otherwise."""
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if unit not in _UNITS or not _SIZE.fullmatch(num):
        raise ValueError(f"{visible(repr(text))} is not a size ({SIZE_EXAMPLES})")
    try:
        value = Decimal(num) * _UNITS[unit]  # exact: 1.1GB is 1100000000 bytes, not 1100000000.0000002
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise ValueError(f"{visible(repr(text))} is not a size ({SIZE_EXAMPLES})") from None
    if value > MAX_SIZE:
        raise ValueError(f"{visible(repr(text))} is more than 2**60 bytes (1 EiB); {SIZE_EXAMPLES}")
    if value < 1:
        raise ValueError(f"{text!r} is {value.normalize():f} bytes: a size must be at least 1 byte; {SIZE_EXAMPLES}")
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is {value.normalize():f} bytes: a size must be a whole number of bytes; "
                         f"{SIZE_EXAMPLES}")
    return int(value)
