"""Result files: runner results (one JSON object per line) and `estimate --format json` output (a list).

Readers accept a file or a directory of them and normalise both into a list of records with at least
`variant`, `scenario` and `estimate`; runner records add `status`, `measured`, `checks`, `provenance`.
Writers are atomic (temp file + rename). Bad files raise UserError with one clear line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError
from .textfmt import visible

SCHEMA_VERSION = 1
# The memory categories of every breakdown (estimates and measurements); they add up to the peak.
CATEGORIES = ("weights", "quant_constants", "trainable", "gradients", "optimizer", "activations", "logits",
              "temporaries", "overhead")
MAX_RESULTS_BYTES = 512 << 20
MAX_BYTES = 1 << 60  # largest byte count a result may hold (1 EiB); anything above is corrupt


def measured_error(record: dict) -> float | None:
    """(estimated - measured) / measured peak of a runner record; None when it has no measurement."""
    m = record.get("measured")
    if not isinstance(m, dict) or not m.get("peak_bytes"):
        return None
    return (record["estimate"]["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"]


def write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with __import__("contextlib").suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def show(value, limit: int = 60) -> str:
    """A value as JSON, short and printable, for error messages (NaN, "text", [1, 2], 1000...(400 digits))."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    try:
        s = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        s = repr(value)
    return s if len(s) <= limit else s[:limit - 3] + "..."


BYTES_ALLOWED = "allowed: a whole number of bytes, a JSON integer from 0 to 2**60"


def bytes_problem(value) -> str | None:
    """Why `value` is not a byte count a comparison can use (None when it is one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{show(value)} is not a byte count ({BYTES_ALLOWED})"
    if not 0 <= value <= MAX_BYTES:
        return f"{show(value)} is out of range ({BYTES_ALLOWED})"
    return None


def _variant_problem(value) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"variant: {show(value)} is not a variant name (allowed: a non-empty string)"
    return None


def _check_record(path: Path, where: str, rec) -> dict:
    """The part of the schema every reader relies on; raises UserError with one line."""
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: not a result object")
    missing = [k for k in ("variant", "estimate") if k not in rec]
    if missing:
        raise UserError(f"{path}: {where}: not a peftprof result (missing {', '.join(missing)})")
    problem = _variant_problem(rec["variant"])
    if problem:
        raise UserError(f"{path}: {where}: {problem}")
    est = rec["estimate"]
    if not isinstance(est, dict) or "peak_bytes" not in est or "breakdown" not in est:
        raise UserError(f"{path}: {where}: estimate lacks peak_bytes/breakdown (wrong schema)")
    prefix = f"{path}: {where}: variant {visible(rec['variant'])}"
    problem = bytes_problem(est["peak_bytes"])
    if problem:
        raise UserError(f"{prefix}: estimate.peak_bytes: {problem}")
    if not isinstance(est["breakdown"], dict):
        raise UserError(f"{prefix}: estimate.breakdown: {show(est['breakdown'])} is not an object of byte counts "
                        "per category")
    return rec


@dataclass(frozen=True)
class Located:
    """A record and where it came from (`where` is 'line 3' in JSON Lines, 'item 3' in a JSON list)."""

    path: Path
    where: str
    record: dict


@dataclass(frozen=True)
class BadLine:
    path: Path
    where: str
    reason: str
    raw: bytes | None  # the line verbatim (JSON Lines); None for an item of a JSON list


def _read_bytes(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise UserError(f"{path}: larger than {MAX_RESULTS_BYTES:,} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def _scan_lines(path: Path, data: bytes) -> tuple[list[Located], list[BadLine]]:
    """JSON Lines, line by line: only "\n" ends a line (a JSON string may hold U+2028 and the like)."""
    good, bad = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(BadLine(path, where, "not UTF-8 text", raw))
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            bad.append(BadLine(path, where, f"not valid JSON ({e})", raw))
            continue
        try:
            good.append(Located(path, where, _check_record(path, where, rec)))
        except UserError as e:
            bad.append(BadLine(path, where, e.lines()[0].split(f"{where}: ", 1)[1], raw))
    return good, bad


def scan_results_file(path: str | os.PathLike) -> tuple[list[Located], list[BadLine]]:
    """Valid records and bad lines (or items) of one file. Raises UserError only when the file as a whole
    cannot be read: missing, too large, or a JSON list that is not valid JSON."""
    path = Path(path)
    return _scan(path, _read_bytes(path))


def _scan(path: Path, data: bytes) -> tuple[list[Located], list[BadLine]]:
    if data.lstrip()[:1] != b"[":
        return _scan_lines(path, data)
    try:  # estimate --format json: one JSON list
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected JSON results)") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(items, list):  # pragma: no cover - a text starting with [ that parses is a list
        raise UserError(f"{path}: not a JSON list of results")
    good, bad = [], []
    for i, rec in enumerate(items, 1):
        try:
            good.append(Located(path, f"item {i}", _check_record(path, f"item {i}", rec)))
        except UserError as e:
            bad.append(BadLine(path, f"item {i}", e.lines()[0].split(f"item {i}: ", 1)[1], None))
    return good, bad


MAX_PROBLEM_LINES = 20


def _bad_line_problems(bad: list[BadLine]) -> list[str]:
    lines = [f"{b.path}: {b.where}: {b.reason}" + ("; fix or delete the file" if b.reason.startswith("not valid JSON")
                                                  else "") for b in bad[:MAX_PROBLEM_LINES]]
    if len(bad) > MAX_PROBLEM_LINES:
        lines.append(f"{bad[0].path}: and {len(bad) - MAX_PROBLEM_LINES} more bad lines")
    return lines


def _read_checked(path: Path) -> tuple[list[Located], list]:
    try:
        data = _read_bytes(path)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected JSON results)") from None
        if not data.strip():
            raise UserError(f"{path}: empty results file")
        good, bad = _scan(path, data)
    except UserError as e:
        return [], e.problems
    return good, _bad_line_problems(bad) if bad else []


def read_checked(paths) -> tuple[list[Located], list]:
    """(every valid record of files and directories with where it is, one problem line per bad file, line or
    item of them): for readers that add their own checks and report all problems together."""
    try:
        files = result_files(paths)
    except UserError as e:
        return [], e.problems
    out, problems = [], []
    for f in files:
        good, bad = _read_checked(f)
        out += good
        problems += bad
    return out, problems


def read_located(path: str | os.PathLike) -> list[Located]:
    """Every record of one file with where it is; UserError naming every bad line (up to 20)."""
    good, problems = _read_checked(Path(path))
    if problems:
        raise UserError(problems)
    return good


def read_results_file(path: str | os.PathLike) -> list[dict]:
    return [loc.record for loc in read_located(path)]


def result_files(paths) -> list[Path]:
    """The files behind `paths`: each file itself, each directory's *.jsonl and *.json (sorted); a file reached
    twice (given twice, or given and inside a given directory) is read once."""
    out, problems, seen = [], [], set()
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted([*p.glob("*.jsonl"), *p.glob("*.json")])
            if not files:
                problems.append(f"{p}: no *.jsonl or *.json results in this directory")
        else:
            files = [p]
        for f in files:
            try:
                same = f.resolve()
            except (OSError, RuntimeError):  # a symlink loop: the reader says what is wrong
                same = f
            if same not in seen:
                seen.add(same)
                out.append(f)
    if problems:
        raise UserError(problems)
    return out


def duplicate_problems(located: list[Located], label: str) -> list[str]:
    """A variant may come from one record of the inputs only (docs/sharding.md): one line per extra record."""
    first: dict[str, Located] = {}
    out = []
    for loc in located:
        name = loc.record["variant"]
        if name not in first:
            first[name] = loc
            continue
        f = first[name]
        hint = "" if f.path == loc.path else "; a variant comes from one input only: leave out the stale file"
        out.append(f"{loc.path}: {loc.where}: variant {visible(name)} appears more than once in {label} "
                   f"(first at {f.path}: {f.where}){hint}")
    return out


def _index(rec: dict) -> int | None:
    i = rec.get("variant_index")
    return i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_BYTES else None


def index_problem(rec: dict) -> str | None:
    """Why a record's `variant_index` is unusable (merge_order then orders it as if it had none); None when it
    is absent, null or a position."""
    if rec.get("variant_index") is None or _index(rec) is not None:
        return None
    return (f"variant_index: {show(rec['variant_index'])} is not a position in the sweep (allowed: a whole number "
            "from 0); ordered as if absent")


def _scenario(rec: dict) -> str:
    """The scenario a record belongs to (its `scenario.scenario`), as a hashable key."""
    sc = rec.get("scenario")
    name = sc.get("scenario") if isinstance(sc, dict) else None
    return name if isinstance(name, str) else show(name)


def merge_order(located: list[Located], all_directories: bool) -> list[Located]:
    """Records of several inputs in the order one run would have written them, so the results of a sweep run
    as shards into several directories read like the unsharded run's: files of one name (one scenario's
    results, from each shard's directory) form one group, the groups in name order when every input is a
    directory (as one directory is read) and else in the order they are first met; within a group, the
    records of each scenario (`scenario.scenario`: one file may hold several, e.g. a baseline written by
    `gate --update`) in the order the scenarios are first met, and within a scenario runner records by
    `variant_index` (their position in the scenario's sweep), then the others in reading order."""
    names = [loc.path.name for loc in located]
    groups = sorted(set(names)) if all_directories else list(dict.fromkeys(names))
    rank = {n: i for i, n in enumerate(groups)}
    scenarios = {k: i for i, k in enumerate(dict.fromkeys((loc.path.name, _scenario(loc.record)) for loc in located))}

    def key(item):
        pos, loc = item
        i = _index(loc.record)
        group = (rank[loc.path.name], scenarios[loc.path.name, _scenario(loc.record)])
        return (*group, 0, i) if i is not None else (*group, 1, pos)

    return [loc for _, loc in sorted(enumerate(located), key=key)]


def read_results_located(paths) -> list[Located]:
    """Every record of files and directories, with where each came from; UserError listing every bad line of
    every file."""
    out, problems = read_checked(paths)
    if problems:
        raise UserError(problems)
    return out


def read_results(paths) -> list[dict]:
    """Read files and directories (every *.jsonl and *.json inside, sorted)."""
    return [loc.record for loc in read_results_located(paths)]


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def read_results_salvaging(path: str | os.PathLike) -> tuple[list[dict], Path | None]:
    """Read a runner results file (JSON Lines), keeping what is good: returns (every valid record, the side
    file the bad lines were moved to, or None when none was bad).

    Bad lines (not UTF-8, not JSON, not a peftprof result) are copied verbatim to `<name>.bad-<UTC time>`
    next to the file (never overwriting one), then the file is rewritten atomically with only its valid
    lines, so a crash in between loses nothing. A missing or empty file is ([], None). UserError when the
    file cannot be read or the side file or the rewrite cannot be written.
    """
    path = Path(path)
    if not path.exists():
        return [], None
    data = _read_bytes(path)
    good, bad = _scan_lines(path, data)
    if not bad:
        return [loc.record for loc in good], None
    stamp, n = _utc_stamp(), 1
    side = path.with_name(f"{path.name}.bad-{stamp}")
    try:
        while True:
            try:
                fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                n += 1
                side = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(b.raw + b"\n" for b in bad))
            f.flush()
            os.fsync(f.fileno())
        lines = data.split(b"\n")
        kept = {int(loc.where.split()[1]) for loc in good}
        write_atomic(path, "".join(lines[i - 1].decode("utf-8") + "\n" for i in sorted(kept)))
    except OSError as e:
        raise UserError(f"{path}: cannot set its {len(bad)} bad line(s) aside: {e.strerror or e}") from None
    return [loc.record for loc in good], side
