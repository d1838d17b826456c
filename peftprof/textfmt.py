"""Plain-text tables and size formatting for the CLI (no pandas: the CLI starts fast)."""

from __future__ import annotations

import csv
import io

GIB = 1 << 30


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def csv_text(headers: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()


def parse_fraction(text: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05. ValueError on anything else or outside [0, 1)."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 1:
        raise ValueError(f"{text!r} is not a fraction in [0, 1)")
    return value


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'24GiB', '16 GB', '1024' -> bytes. ValueError otherwise."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"{text!r} is not a size (e.g. 24GiB, 16GB)")
    value = float(num) * _UNITS[unit]
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)
