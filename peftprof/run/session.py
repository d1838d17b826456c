"""Run many variants: one results file per scenario, written atomically after each variant, resumable."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from ..results import read_results_file, write_jsonl
from ..settings import Scenario

DONE_STATUSES = ("ok", "oom")  # an error is retried on the next run; ok and oom are results


def results_path(out_dir: Path, scenario_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in scenario_name)
    return Path(out_dir) / f"{safe}.jsonl"


def load_existing(path: Path, force: bool) -> list[dict]:
    if force or not path.exists():
        return []
    try:
        return read_results_file(path)
    except UserError as e:
        raise UserError([f"{e.lines()[0]} (or pass --force to start it over)"]) from None


def run_scenarios(variants: list[Scenario], *, out_dir: str | Path, device: str, steps: int | None = None,
                  force: bool = False, max_memory: int | None = None, progress: bool = True,
                  fault: dict[str, str] | None = None) -> tuple[list[dict], list[Path], bool]:
    """Returns (records of these variants, result files, interrupted). `fault` maps a variant name to a
    phase in which to inject an out-of-memory (tests)."""
    from tqdm import tqdm

    from .runner import run_variant

    by_file: dict[Path, list[Scenario]] = {}
    for v in variants:
        by_file.setdefault(results_path(Path(out_dir), v.scenario), []).append(v)
    existing = {path: load_existing(path, force) for path in by_file}  # fail on corrupt files before running
    records: list[dict] = []
    bar = tqdm(total=len(variants), file=sys.stderr, disable=not progress, unit="variant", dynamic_ncols=True)
    interrupted = False
    try:
        for path, group in by_file.items():
            stored = {r["variant"]: r for r in existing[path]}
            for v in group:
                old = stored.get(v.name)
                if old is not None and old.get("settings_key") == v.settings_key() and old.get("status") in DONE_STATUSES:
                    records.append(old)
                    bar.update(1)
                    continue
                bar.set_description(v.name[-60:])
                rec = run_variant(v, device=device, steps=steps, max_memory=max_memory,
                                  fault=(fault or {}).get(v.name), progress=lambda msg: bar.set_postfix_str(msg))
                stored[v.name] = rec
                records.append(rec)
                write_jsonl(path, list(stored.values()))
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return records, list(by_file), interrupted
