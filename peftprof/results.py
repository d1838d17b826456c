"""Result files: runner results (one JSON object per line) and `estimate --format json` output (a list).

Readers accept a file or a directory of them and normalise both into a list of records with at least
`variant`, `scenario` and `estimate`; runner records add `status`, `measured`, `checks`, `provenance`.
Writers are atomic (temp file + rename). Bad files raise UserError with one clear line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError

SCHEMA_VERSION = 1
# The memory categories of every breakdown (estimates and measurements); they add up to the peak.
CATEGORIES = ("weights", "quant_constants", "trainable", "gradients", "optimizer", "activations", "logits",
              "temporaries", "overhead")
MAX_RESULTS_BYTES = 512 << 20


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


def _check_record(path: Path, where: str, rec) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: not a result object")
    missing = [k for k in ("variant", "estimate") if k not in rec]
    if missing:
        raise UserError(f"{path}: {where}: not a peftprof result (missing {', '.join(missing)})")
    est = rec["estimate"]
    if not isinstance(est, dict) or not isinstance(est.get("peak_bytes"), int) or not isinstance(
            est.get("breakdown"), dict):
        raise UserError(f"{path}: {where}: estimate lacks peak_bytes/breakdown (wrong schema)")
    return rec


def read_results_file(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise UserError(f"{path}: larger than {MAX_RESULTS_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected JSON results)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    stripped = text.strip()
    if not stripped:
        raise UserError(f"{path}: empty results file")
    if stripped.startswith("["):  # estimate --format json
        try:
            data = json.loads(stripped)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        return [_check_record(path, f"item {i + 1}", r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}: line {n}: not valid JSON ({e}); fix or delete the file") from None
        out.append(_check_record(path, f"line {n}", rec))
    return out


def read_results(paths) -> list[dict]:
    """Read files and directories (every *.jsonl and *.json inside, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted([*p.glob("*.jsonl"), *p.glob("*.json")])
            if not files:
                raise UserError(f"{p}: no *.jsonl or *.json results in this directory")
            for f in files:
                out.extend(read_results_file(f))
        else:
            out.extend(read_results_file(p))
    return out
