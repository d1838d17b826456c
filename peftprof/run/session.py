"""Run many variants: one results file per scenario, resumable.

Each finished variant is merged into its results file at once, under an exclusive lock (fcntl.flock on the
sibling `.<file>.lock`) and atomically, so runs writing one file at the same time merge, `--force` replaces
records one by one, and an interruption never loses a variant that finished. A finished variant is identified
by its settings (`settings_key`) and the run options that change a measurement (`run_options`: resolved device,
steps, memory cap); a different option runs it again.

Ctrl-C (SIGINT) and SIGTERM stop a sweep the same way: the variant in progress is abandoned, the finished ones
are saved; the CLI then exits 130 (SIGINT) or 143 (SIGTERM). A results write that fails after training keeps
the measurement in a file in the system temp directory and says where; the sweep stops there.

Sharding (`--shard K/N`, docs/sharding.md): shard K (1-based) runs the variants at positions K-1, K-1+N, ... of
the expansion order of all scenarios given (file by file, each file's sweep in its own order). Every record
carries `variant_index`, its position in its scenario's expansion, so records of several shards merge back
into the unsharded order (peftprof.results.merge_order).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from ..errors import UserError, show
from ..results import read_results_salvaging, write_jsonl
from ..settings import Scenario

DONE_STATUSES = ("ok", "oom")  # an error is retried on the next run; ok and oom are results


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so both stop a sweep the same way."""

    signum = signal.SIGTERM


def interrupt_exit_code(exc: BaseException | None = None, signum: int | None = None) -> int:
    """128 + the signal: 130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
    return 128 + int(signum or getattr(exc, "signum", signal.SIGINT))


class Outcome(tuple):
    """What callers unpack, (records, files, interrupted), plus `signum` (the signal that interrupted the sweep)
    and `problems` (error lines: a results write that failed and where its measurement went instead). `files` are
    the results files that exist."""

    def __new__(cls, records, files, interrupted, *, signum=None, problems=()):
        self = super().__new__(cls, (records, files, interrupted))
        self.records, self.files, self.interrupted = records, files, interrupted
        self.signum, self.problems = signum, list(problems)
        return self


def results_path(out_dir: Path, scenario_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in scenario_name)
    return Path(out_dir) / f"{safe}.jsonl"


MAX_SHARDS = 100_000
SHARD_ALLOWED = "allowed: K/N with whole numbers 1 <= K <= N <= 100000, e.g. 1/4 ... 4/4"


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard K of N, K counted from 1. ValueError (one line) otherwise."""
    k, sep, n = str(text).strip().partition("/")
    if not sep or not k.strip().isdecimal() or not n.strip().isdecimal() or len(k) > 6 or len(n) > 6:
        raise ValueError(f"{show(str(text), 40)} is not K/N ({SHARD_ALLOWED})")
    k_i, n_i = int(k), int(n)
    if not 1 <= n_i <= MAX_SHARDS:
        raise ValueError(f"{show(str(text), 40)}: N = {n_i} shards ({SHARD_ALLOWED})")
    if not 1 <= k_i <= n_i:
        raise ValueError(f"{show(str(text), 40)}: K = {k_i} is not a shard of 1..{n_i} (K counts from 1; "
                         f"{SHARD_ALLOWED})")
    return k_i, n_i


def variant_indices(variants: list[Scenario]) -> dict[str, int]:
    """Each variant's position in its scenario's expansion (0-based), by variant name."""
    seen: dict[str, int] = {}
    out = {}
    for v in variants:
        out[v.name] = seen.get(v.scenario, 0)
        seen[v.scenario] = out[v.name] + 1
    return out


def shard_of(variants: list[Scenario], k: int, n: int) -> list[Scenario]:
    """Shard k of n (k from 1): every n-th variant starting at position k-1 of the expansion order."""
    return variants[k - 1::n]


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _file_names(path: Path) -> list[str]:
    """Every file name a run makes for one results file: itself, its lock, its temp files (write_atomic), the
    side file of bad lines (read_results_salvaging) and the report."""
    html = path.with_suffix(".html").name
    return [path.name, lock_path(path).name, f".{path.name}.xxxxxxxx.tmp", f"{path.name}.bad-20250101T000000Z-99",
            html, f".{html}.xxxxxxxx.tmp"]


def _write_probe(out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".peftprof-write-check.")
    os.close(fd)
    os.unlink(tmp)


def _name_max(out: Path) -> int:
    try:
        return os.pathconf(out, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_outputs(variants: list[Scenario], out_dir: str | Path) -> list[str]:
    """What can be checked before training: the output directory exists or can be made, can be written, and
    every results file name fits the file system. Returns the problems (error lines)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        return [f"--out: {out} is a file, not a directory"]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"--out: cannot create the directory {out}: {e.strerror or e}"]
    try:
        _write_probe(out)
    except OSError as e:
        return [f"--out: cannot write in {out}: {e.strerror or e}"]
    problems, seen, name_max = [], set(), _name_max(out)
    owner: dict[str, Scenario] = {}  # results file name (case-folded) -> the first scenario writing it
    clashes: set[tuple[str, str]] = set()
    for v in variants:
        path = results_path(out, v.scenario)
        first = owner.setdefault(path.name.casefold(), v)
        if first.scenario != v.scenario:  # "co b" and "co_b" (or "A" and "a" on macOS) would share one file
            if (first.scenario, v.scenario) not in clashes:
                clashes.add((first.scenario, v.scenario))
                other = results_path(out, first.scenario)
                where = str(path) if other == path else f"{other} and {path.name}: one file where case is ignored"
                problems.append(f"{v.source}: name: scenario {show(v.scenario, 40)} and scenario "
                                f"{show(first.scenario, 40)} of {first.source} would write one results file "
                                f"({where}) (allowed: names that differ in a letter beyond case, a digit, '-', '_' "
                                "or '.'; every other character becomes '_')")
            continue
        if path in seen:
            continue
        seen.add(path)
        longest = max(len(n.encode()) for n in _file_names(path))
        if longest > name_max:
            problems.append(f"{v.source}: name: {show(v.scenario, 40)} makes file "
                            f"names of {longest} bytes in {out}; the file system allows {name_max} "
                            f"(allowed: a name of at most {len(v.scenario) - (longest - name_max)} characters)")
        elif path.is_dir():
            problems.append(f"{path}: is a directory; the results of scenario {v.scenario!r} go in a file there")
    return problems


@contextlib.contextmanager
def locked(path: Path):
    """Hold the exclusive lock of a results file (blocks while another run holds it)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _notice(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _salvage_notice(path: Path, side: Path | None, kept: int) -> None:
    if side is not None:
        _notice(f"{path}: its unreadable lines were moved to {side}; resuming with its {kept} valid records")


def load_existing(path: Path) -> dict[str, dict]:
    """The valid records of a results file by variant; bad lines are set aside in a file the warning names."""
    with locked(path):
        records, side = read_results_salvaging(path)
    _salvage_notice(path, side, len(records))
    return {r["variant"]: r for r in records}


def save_record(path: Path, rec: dict) -> None:
    """Merge one record into its results file: read, replace that variant's record, write atomically; all under
    the file's lock, so concurrent runs never lose each other's records."""
    with locked(path):
        current, side = read_results_salvaging(path)
        merged = {r["variant"]: r for r in current}
        merged[rec["variant"]] = rec
        write_jsonl(path, list(merged.values()))
    _salvage_notice(path, side, len(current))


def rescue(path: Path, rec: dict, err: Exception) -> str:
    """A results write failed after training: keep the measurement in the system temp directory. Returns the
    error line that says where it went."""
    reason = err.lines()[0] if isinstance(err, UserError) else (getattr(err, "strerror", None) or str(err))
    fallback = Path(tempfile.gettempdir()) / f"peftprof-unsaved-{path.stem[:80]}-{os.getpid()}.jsonl"
    line = json.dumps(rec, sort_keys=True, default=str)
    head = f"{path}: cannot write results ({reason}); the sweep stopped"
    try:
        with open(fallback, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{head}; the measurement of {rec['variant']} could not be kept in {fallback} either " \
               f"({e.strerror or e}); here it is: {line}"
    return f"{head}; the measurement of {rec['variant']} was kept in {fallback} (one JSON line, results format)"


def _raise_terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM raises Terminated (a KeyboardInterrupt), as Ctrl-C raises KeyboardInterrupt (main thread only)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM while a record is written; the interruption is raised once it is on disk."""
    if not _main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            raise Terminated() if got[0] == signal.SIGTERM else KeyboardInterrupt()


def is_done(old: dict | None, v: Scenario, options: dict) -> bool:
    """A stored record that measured this variant, with these settings and run options, to a result."""
    return (old is not None and old.get("settings_key") == v.settings_key() and old.get("run_options") == options
            and old.get("status") in DONE_STATUSES)


def run_scenarios(variants: list[Scenario], *, out_dir: str | Path, device: str, steps: int | None = None,
                  force: bool = False, max_memory: int | None = None, progress: bool = True,
                  fault: dict[str, str] | None = None, isolate: bool | None = None, target=None,
                  indices: dict[str, int] | None = None) -> Outcome:
    """Returns Outcome(records of these variants, result files, interrupted). `fault` maps a variant name to a
    phase in which to inject an out-of-memory (tests). `isolate` runs each variant in its own process (default:
    on for cuda); `target` is the function that process runs instead of run_variant (tests). `indices`: each
    variant's position in its scenario's whole expansion (a shard runs part of it; default: these variants')."""
    from tqdm import tqdm

    from . import runner

    device = runner.resolve_device(device)
    problems = check_outputs(variants, out_dir)
    if problems:
        raise UserError(problems)
    by_file: dict[Path, list[Scenario]] = {}
    for v in variants:
        by_file.setdefault(results_path(Path(out_dir), v.scenario), []).append(v)
    existing = {}
    for path in by_file:  # read (and salvage) every file before running anything
        try:
            existing[path] = load_existing(path)
        except (UserError, OSError) as e:
            problems += e.lines() if isinstance(e, UserError) else [f"{path}: cannot read: {e.strerror or e}"]
    if problems:
        raise UserError(problems)
    isolate = device == "cuda" if isolate is None else isolate
    indices = variant_indices(variants) if indices is None else indices
    records: list[dict] = []
    failures: list[str] = []
    bar = tqdm(total=len(variants), file=sys.stderr, disable=not progress, unit="variant", dynamic_ncols=True)

    def measure(v: Scenario) -> dict:
        kw = {"device": device, "steps": steps, "max_memory": max_memory, "fault": (fault or {}).get(v.name),
              "progress": lambda msg: bar.set_postfix_str(msg)}
        rec = runner.run_variant_isolated(v, target=target, **kw) if isolate else runner.run_variant(v, **kw)
        rec["variant_index"] = indices[v.name]
        return rec

    def sweep() -> None:
        for path, group in by_file.items():
            for v in group:
                options = runner.run_options(v, device=device, steps=steps, max_memory=max_memory)
                old = existing[path].get(v.name)
                if not force and is_done(old, v, options):
                    index = old.get("variant_index")
                    if isinstance(index, bool) or index != indices[v.name]:  # written before variant_index, or
                        old = {**old, "variant_index": indices[v.name]}  # the sweep around it changed: renumber
                        with deferred_signals():
                            try:
                                save_record(path, old)
                            except (OSError, UserError) as e:
                                failures.append(rescue(path, old, e))
                    records.append(old)
                    bar.update(1)
                    if failures:
                        return
                    continue
                bar.set_description(v.name[-60:])
                rec = None
                try:
                    rec = measure(v)
                finally:
                    if rec is not None:  # finished: saved even when a signal arrived right after
                        records.append(rec)
                        with deferred_signals():
                            try:
                                save_record(path, rec)
                            except (OSError, UserError) as e:
                                failures.append(rescue(path, rec, e))
                bar.update(1)
                if failures:
                    return

    signum = None
    try:
        with signals_as_interrupts():
            sweep()
    except KeyboardInterrupt as e:
        signum = int(getattr(e, "signum", signal.SIGINT))
    finally:
        bar.close()
    return Outcome(records, [p for p in by_file if p.exists()], signum is not None, signum=signum,
                   problems=failures)


def run_all(variants: list[Scenario], *, device: str | None, out_dir: str | Path, steps: int | None = None,
            force: bool = False, max_memory: int | None = None, progress: bool = True,
            isolate: bool | None = None, shard: tuple[int, int] | None = None) -> Outcome:
    """`peftprof run`: group the variants by device (`device` overrides each scenario's run.device), check
    every device and the outputs before training anything (all problems at once, UserError), then run the
    groups until one is interrupted or a results write fails. `shard` (K, N): run only shard K of N
    (`shard_of`); the outputs are checked for every variant, so every shard refuses the same sweep."""
    from .runner import resolve_device

    indices = variant_indices(variants)
    everything, variants = variants, variants if shard is None else shard_of(variants, *shard)
    by_device: dict[str, list[Scenario]] = {}
    for v in variants:
        by_device.setdefault(device or v.run.device, []).append(v)
    problems, resolved = [], {}
    for dev, group in by_device.items():
        try:
            resolved[dev] = resolve_device(dev)
        except RuntimeError as e:
            problems += [f"--device: {e}"] if device else [
                f'{src}: [run] device: "{dev}": torch sees no CUDA device (allowed on this machine: auto, cpu)'
                for src in dict.fromkeys(v.source for v in group)]
    problems += check_outputs(everything, out_dir)
    if problems:
        raise UserError(problems)
    records, files, failures, signum = [], [], [], None
    for dev, group in by_device.items():
        outcome = run_scenarios(group, out_dir=out_dir, device=resolved[dev], steps=steps, force=force,
                                max_memory=max_memory, progress=progress, isolate=isolate, indices=indices)
        records += outcome.records
        files += outcome.files
        failures += outcome.problems
        signum = outcome.signum
        if signum or failures:
            break
    return Outcome(records, list(dict.fromkeys(files)), signum is not None, signum=signum, problems=failures)
