"""Command line: parses arguments, calls a pipeline stage, turns errors into exit codes.

Exit codes: 0 ok, 1 a negative answer (does not fit, regression), 2 bad input. No traceback on user error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import click

from .errors import UserError


def _fail(lines: list[str], code: int = 2) -> None:
    for line in lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def user_errors(fn):
    """Bad input -> one line per problem on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(e.lines())

    return wrapper


def _gpu(name: str | None):
    from .catalog import gpu

    return None if name is None else _parsed("--gpu", gpu, name)


def _parsed(option: str, parse, value):
    """Parse an option value; a ValueError becomes a one-line user error naming the option."""
    try:
        return parse(value)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


def _load(paths):
    from .scenario import load_scenarios

    return load_scenarios(paths)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftprof")
def cli():
    """Memory and speed profiler for parameter-efficient fine-tuning.

    \b
    Example:
      peftprof validate scenarios/*.toml
      peftprof estimate scenarios/qlora-7b.toml --gpu RTX-4090
      peftprof run scenarios/quickstart.toml
    """


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True))
@user_errors
def validate(files):
    """Check scenario files; print every problem. Exit 0 when all are valid, 2 otherwise.

    \b
    Example:
      peftprof validate scenarios/*.toml
    """
    variants = _load(files)
    by_file: dict[str, int] = {}
    for v in variants:
        by_file[v.source] = by_file.get(v.source, 0) + 1
    for f, n in by_file.items():
        click.echo(f"{f}: ok ({n} variant{'s' if n != 1 else ''})")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def presets(fmt):
    """List the model presets and GPUs in the catalogue.

    \b
    Example:
      peftprof presets --format json
    """
    from .arch import analytic_gap, build_arch, resolve_keys
    from .catalog import gpus, model_presets
    from .textfmt import GIB

    models = []
    for name, cfg in model_presets().items():
        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        a = build_arch(resolve_keys(cfg["model_type"], fields))
        models.append({"name": name, "model_type": a.model_type, "n_params": a.n_params,
                       "n_active_params": a.n_active_params, "n_experts": a.n_experts,
                       "experts_per_token": a.experts_per_token, "hidden_size": a.hidden_size,
                       "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                       "vocab_size": a.vocab_size, "max_positions": a.max_positions,
                       # which `estimate --method` answers for its family (the trace answers for every model)
                       "analytic": analytic_gap(a.model_type) is None})
    gpu_rows = [{"name": g.name, "memory_gib": g.memory_bytes / GIB, "bf16_tflops": g.bf16_tflops,
                 "bandwidth_gbps": g.bandwidth_bytes_per_s / 1e9} for g in gpus().values()]
    if fmt == "json":
        click.echo(json.dumps({"models": models, "gpus": gpu_rows}, indent=2))
        return
    from .textfmt import table

    click.echo(table(["model", "type", "params", "active params", "experts", "hidden", "layers", "heads", "kv heads",
                      "vocab", "max pos", "estimators"],
                     [[m["name"], m["model_type"], f"{m['n_params']:,}", f"{m['n_active_params']:,}",
                       f"{m['experts_per_token']} of {m['n_experts']}" if m["n_experts"] else "-", m["hidden_size"],
                       m["n_layers"], m["n_heads"], m["n_kv_heads"], m["vocab_size"], m["max_positions"],
                       "analytic, trace" if m["analytic"] else "trace"]
                      for m in models]))
    click.echo()
    click.echo(table(["gpu", "memory GiB", "bf16 TFLOP/s", "bandwidth GB/s"],
                     [[g["name"], f"{g['memory_gib']:g}", f"{g['bf16_tflops']:g}", f"{g['bandwidth_gbps']:g}"]
                      for g in gpu_rows]))


def _estimates(paths, method, device, gpu_name, mfu):
    from .estimate import AnalyticUnsupported, estimate
    from .trace import trace_estimate

    gpu = _gpu(gpu_name)
    variants = _load(paths)
    out = []
    for v in variants:
        if method == "analytic":
            try:
                out.append((v, estimate(v, device=device, gpu=gpu, mfu=mfu)))
                continue
            except AnalyticUnsupported:  # never a silent guess: the trace answers, and its note says why
                pass
        out.append((v, trace_estimate(v, device=device, gpu=gpu, mfu=mfu)))
    return out


def estimate_rows(results, *, adaptive: bool = False) -> tuple[list[str], list[list]]:
    """Header and rows of the estimate table: sizes in GiB, or with `adaptive` (the human-readable table) in the
    largest unit the largest peak reaches (tiny models read in MiB or KiB, not 0.00 GiB). CSV keeps GiB."""
    from .results import CATEGORIES
    from .textfmt import GIB, in_unit, size_unit

    unit, size = size_unit([e["peak_bytes"] for _, e in results]) if adaptive else ("GiB", GIB)
    with_gpu = any("gpu" in e for _, e in results)
    with_host = any(e.get("host_bytes") for _, e in results)  # [distributed] cpu_offload
    with_disk = any(e.get("disk_bytes") for _, e in results)  # [inference] max_memory: accelerate's disk offload
    headers = ["variant", f"peak {unit}"] + list(CATEGORIES) + ([f"host {unit}"] if with_host else []) + (
        [f"disk {unit}"] if with_disk else [])
    if with_gpu:
        headers += ["gpu", "fits", f"headroom {unit}", "tokens/s"]
    rows = []
    for v, e in results:
        row = [v.name, in_unit(e["peak_bytes"], size)] + [in_unit(e["breakdown"][c], size) for c in CATEGORIES]
        row += [in_unit(e.get("host_bytes", 0), size)] if with_host else []
        row += [in_unit(e.get("disk_bytes", 0), size)] if with_disk else []
        if with_gpu:
            row += [e["gpu"], "yes" if e["fits"] else "NO", in_unit(e["headroom_bytes"], size),
                    "-" if e.get("predicted_tokens_per_s") is None else f"{e['predicted_tokens_per_s']:,.0f}"]
        rows.append(row)
    return headers, rows


@cli.command()
@click.argument("scenarios", nargs=-1, required=True)
@click.option("--gpu", "gpu_name", help="Catalogue GPU (see `peftprof presets`): adds fits, headroom, tokens/s.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Predict for this device (default: the scenario's run.device; auto means cuda).")
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=None,
              help="Model-FLOPs utilisation for the speed prediction (default 0.35).")
@click.option("--advise", is_flag=True, help="With --gpu: the smallest single changes that make each variant fit.")
@click.option("--report", "report_path", default=None,
              help="Also write an HTML report here (with --method trace: the memory timeline and the peak's tensors).")
@user_errors
def estimate(scenarios, gpu_name, device, method, fmt, mfu, advise, report_path):
    """Predict peak training memory by category, FLOPs and speed, without a GPU.

    \b
    Example:
      peftprof estimate scenarios/qlora-7b.toml --gpu RTX-4090 --format json
      peftprof estimate scenarios/qlora-7b.toml --gpu T4 --advise
      peftprof estimate scenarios/quickstart.toml --method trace --report reports/trace.html
    """
    from .estimate.flops import DEFAULT_MFU
    from .textfmt import csv_text, table, visible

    if advise and gpu_name is None:
        raise UserError("--advise: give --gpu NAME, the GPU the variants must fit (see `peftprof presets`)")
    if advise and fmt == "csv":
        raise UserError("--advise: use --format table or json (advice does not fit in CSV rows)")
    if report_path is not None:
        from .report import check_output

        check_output(Path(report_path), [])
    results = _estimates(scenarios, method, device, gpu_name, mfu or DEFAULT_MFU)
    for _, e in results:
        if e.get("note"):
            click.echo(f"note: {e['note']}", err=True)
    records = [{"variant": v.name, "scenario": v.to_dict(), "estimate": e} for v, e in results]
    if advise:
        from .advise import advise as advise_fn
        from .advise import gpu_target

        target = gpu_target(_gpu(gpu_name))
        for (v, _), rec in zip(results, records, strict=True):
            try:
                rec["advice"] = advise_fn(v, dataclasses.replace(target, device=rec["estimate"]["device"]))
            except UserError as e:  # a family only the trace answers for
                rec["advice"] = {"unavailable": e.lines()[0]}
    if report_path is not None:
        from .report import write_records_report

        click.echo(f"report: {write_records_report(records, report_path)}", err=True)
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
        return
    headers, rows = estimate_rows(results, adaptive=fmt == "table")
    click.echo(table(headers, rows) if fmt == "table" else csv_text(headers, rows), nl=fmt == "table")
    if advise:
        from .advise import advice_lines

        for rec in records:
            click.echo()
            click.echo("\n".join(visible(line) for line in advice_lines(rec["variant"], rec["advice"])))


@cli.command()
@click.argument("scenarios", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", default="reports/snapshots", show_default=True,
              help="Directory for the snapshots (one <n>-<variant>.pickle each).")
@click.option("--run", "measured", is_flag=True,
              help="Train for real on CPU and snapshot the measured step (default: the trace, on fake tensors).")
@user_errors
def snapshot(scenarios, out_dir, measured):
    """Export a step as a PyTorch memory snapshot (torch.cuda.memory._dump_snapshot format).

    \b
    Open it with PyTorch's viewer:
      python -m torch.cuda._memory_viz trace_plot reports/snapshots/1-quickstart.pickle -o step.html
    \b
    Example:
      peftprof snapshot scenarios/quickstart.toml -o reports/snapshots
    """
    import re

    from .textfmt import visible

    variants = _load(scenarios)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is not a directory; give -o a directory for the snapshots")
    if not measured:
        from .snapshot import traced_snapshot_problems

        if problems := traced_snapshot_problems(variants):
            raise UserError(problems)
    failed = []
    for i, v in enumerate(variants, 1):
        path = out / f"{i}-{re.sub(r'[^A-Za-z0-9._=,+-]+', '_', v.name)[:120]}.pickle"
        if measured:
            from .run.runner import run_variant

            rec = run_variant(v, device="cpu", snapshot_path=path)
            if rec["status"] != "ok":
                failed.append(f"{visible(v.name)}: {rec['status']}: {visible((rec.get('error') or {}).get('message'))}")
                continue
        else:
            from .trace import check_traceable, trace_peak

            check_traceable(v)
            trace_peak(v, snapshot_path=path)
        click.echo(f"snapshot: {visible(path)}  ({visible(v.name)})")
    if failed:
        _fail(failed)


@cli.command()
@click.argument("scenario")
@click.option("--gpu", "gpu_name", required=True, help="Catalogue GPU (see `peftprof presets`).")
@click.option("--axis", type=click.Choice(["batch_size", "seq_len", "world_size"]), default="batch_size",
              show_default=True, help="world_size: the fewest GPUs whose per-rank peak fits, with the file's "
              "[distributed] strategy.")
@click.option("--headroom", default="5%", show_default=True, help="Memory kept free: '5%' or 0.05.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None)
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True)
@user_errors
def fit(scenario, gpu_name, axis, headroom, device, method):
    """Find the largest batch size (or sequence length) that fits a GPU, or the fewest GPUs (--axis world_size).
    Exit 1 if none fits.

    \b
    Example:
      peftprof fit scenarios/qlora-7b.toml --gpu RTX-4090 --axis seq_len --headroom 10%
      peftprof fit my-fsdp-scenario.toml --gpu H100-80GB --axis world_size   # [distributed] strategy = "fsdp"
    """
    from .estimate import estimate as analytic
    from .fit import fewest_fitting, largest_fitting
    from .results import CATEGORIES
    from .textfmt import gib, parse_fraction, table

    gpu = _gpu(gpu_name)
    frac = _parsed("--headroom", parse_fraction, headroom)
    variants = _load([scenario])
    from .vision import is_vision

    if axis == "world_size" and any(is_vision(v) for v in variants):  # vision/rules.py refuses [distributed]
        raise UserError(f"{scenario}: --axis world_size: distributed training of an image classifier is not "
                        "supported yet (use --axis batch_size)")
    from .arch import analytic_gap

    gaps = {gap for v in variants if (gap := analytic_gap(v.model.arch.model_type))}
    if method == "analytic" and gaps:  # never a silent guess: the trace answers, and says why
        click.echo(f"note: {'; '.join(sorted(gaps))}; --method trace answers instead", err=True)
    if method == "trace" or gaps:
        from .trace import trace_estimate as fn
    else:
        fn = analytic
    found_all = True
    for v in variants:
        estimate_fn = lambda s: fn(s, device=device or "cuda", gpu=gpu)  # noqa: E731
        if axis == "world_size":
            value, est = fewest_fitting(v, gpu, headroom=frac, estimate_fn=estimate_fn)
        else:
            value, est = largest_fitting(v, gpu, axis=axis, headroom=frac, estimate_fn=estimate_fn)
        if value is None:
            found_all = False
            tried = (f"on any number of GPUs with {v.distributed.strategy}" + (
                " (DDP keeps a whole replica on every GPU)" if v.distributed.strategy == "ddp" else "")
                     if axis == "world_size" else f"even at {axis} = 1")
            click.echo(f"{v.name}: does not fit {gpu.name} {tried} "
                       f"(needs {gib(est.get('device_bytes', est['peak_bytes']))} GiB, "
                       f"budget {gib(gpu.memory_bytes * (1 - frac))} GiB)")
        elif axis == "world_size":
            click.echo(f"{v.name}: world_size = {value} ({v.distributed.strategy if value > 1 else 'one GPU'}) "
                       f"fits {gpu.name} with {headroom} headroom (per-rank peak {gib(est['peak_bytes'])} GiB"
                       + (f", host {gib(est['host_bytes'])} GiB per rank" if est.get("host_bytes") else "") + ")")
        else:
            click.echo(f"{v.name}: {axis} = {value} fits {gpu.name} with {headroom} headroom "
                       f"(peak {gib(est['peak_bytes'])} GiB)")
        click.echo(table(["category", "GiB"], [[c, gib(est["breakdown"][c])] for c in CATEGORIES]))
    sys.exit(0 if found_all else 1)


def run_summary(records) -> str:
    """The table printed after a run, sizes in the largest unit the largest peak reaches (textfmt.size_unit)."""
    from .results import measured_error
    from .textfmt import in_unit, size_unit, table

    unit, size = size_unit([r["estimate"]["peak_bytes"] for r in records]
                           + [(r.get("measured") or {}).get("peak_bytes") for r in records])
    rows = []
    for r in records:
        m = r.get("measured") or {}
        err = measured_error(r)
        status = r["status"] if r["status"] == "ok" else f"{r['status']} ({(r.get('error') or {}).get('phase')})"
        rows.append([r["variant"], status, in_unit(r["estimate"]["peak_bytes"], size), in_unit(m.get("peak_bytes"), size),
                     "-" if err is None else f"{err * 100:+.1f}%",
                     "-" if not m.get("tokens_per_s") else f"{m['tokens_per_s']:,.0f}"])
    return table(["variant", "status", f"estimated {unit}", f"measured {unit}", "error", "tokens/s"], rows)


@cli.command()
@click.argument("scenarios", nargs=-1, required=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where to train (default: the scenario's run.device; auto = cuda when available).")
@click.option("--out", "out_dir", default="reports", show_default=True, help="Directory for results and report.")
@click.option("--steps", type=click.IntRange(1, 100_000), default=None, help="Measured steps (default: run.steps).")
@click.option("--force", is_flag=True, help="Re-run variants already measured with the same settings.")
@click.option("--max-memory", default=None,
              help="CPU: treat more tracked memory than this as out-of-memory (e.g. 16GiB).")
@click.option("--no-report", is_flag=True, help="Do not write the HTML report.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--isolate/--no-isolate", default=None,
              help="Run each variant in its own process (default: on for cuda, off for cpu).")
@click.option("--shard", default=None, metavar="K/N",
              help="Run only shard K of N (K from 1): variants K, K+N, K+2N, ... of the sweep "
                   "(e.g. --shard $SLURM_ARRAY_TASK_ID/8); merge with `peftprof report DIR...`.")
@user_errors
def run(scenarios, device, out_dir, steps, force, max_memory, no_report, quiet, isolate, shard):
    """Train each variant for real on synthetic tokens; measure memory per phase and speed.

    Results go to OUT/<scenario>.jsonl (one JSON object per variant, merged in as each finishes);
    running again skips variants already measured with the same settings and options unless --force.
    Ctrl-C or SIGTERM saves what finished and exits 130 (SIGINT) or 143 (SIGTERM).

    \b
    Example:
      peftprof run scenarios/quickstart.toml --device cpu
      peftprof run scenarios/rank-sweep.toml --shard 2/4 --out reports/shard-2
    """
    from .run.session import interrupt_exit_code, parse_shard, run_all, shard_of, signals_as_interrupts
    from .textfmt import parse_size

    signum = None
    try:  # Ctrl-C or SIGTERM anywhere, a second one included: the finished variants are saved; exit 130 / 143
        with signals_as_interrupts():
            cap = None if max_memory is None else _parsed("--max-memory", parse_size, max_memory)
            part = None if shard is None else _parsed("--shard", parse_shard, shard)
            variants = _load(scenarios)
            if part is not None and not shard_of(variants, *part):
                click.echo(f"shard {part[0]}/{part[1]}: no variants to run (the sweep has {len(variants)})", err=True)
                return
            outcome = run_all(variants, device=device, out_dir=out_dir, steps=steps, force=force,
                              max_memory=cap, progress=not quiet, isolate=isolate, shard=part)
            records, files, failures, signum = outcome.records, outcome.files, outcome.problems, outcome.signum
            click.echo(run_summary(records))
            for f in dict.fromkeys(files):  # only files that exist
                click.echo(f"results: {f}")
            if not no_report and records and not failures:
                from .report import write_report

                for f in dict.fromkeys(files):
                    try:
                        html = write_report([f], Path(f).with_suffix(".html"))
                    except OSError as e:
                        failures.append(f"{Path(f).with_suffix('.html')}: cannot write the report: {e.strerror or e}")
                        continue
                    click.echo(f"report: {html}")
            for line in failures:
                click.echo(f"error: {line}", err=True)
            if signum:
                raise KeyboardInterrupt
            if failures:
                sys.exit(2)
    except KeyboardInterrupt as e:
        click.echo("interrupted: the variants that finished are saved; run again to resume", err=True)
        sys.exit(interrupt_exit_code(e, signum=signum))


@cli.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--output", default=None, help="Output file (default: reports/<first input>.html|md|csv).")
@click.option("--format", "fmt", type=click.Choice(["html", "markdown", "csv"]), default="html", show_default=True)
@user_errors
def report(results, output, fmt):
    """Write one self-contained report from runner results and/or estimate JSON.

    \b
    Example:
      peftprof report reports/quickstart.jsonl -o reports/quickstart.html
      peftprof estimate scenarios/rank-sweep.toml --format json > est.json && peftprof report est.json --format markdown
    """
    from .report import write_report

    ext = {"html": ".html", "markdown": ".md", "csv": ".csv"}[fmt]
    out = Path(output) if output else Path("reports") / (Path(results[0]).stem + ext)
    if output == "-":
        from .report import load_records, render_csv, render_html, render_markdown

        records = load_records(results)
        click.echo({"html": lambda: render_html(records, "peftprof report"),
                    "markdown": lambda: render_markdown(records), "csv": lambda: render_csv(records)}[fmt](), nl=False)
        return
    click.echo(f"report: {write_report(results, out, fmt)}")


@cli.command()
@click.argument("current", nargs=-1, required=True)
@click.option("--baseline", required=True, help="Baseline results: a file or a directory of them.")
@click.option("--tolerance", default="2%", show_default=True, help="Allowed peak growth: '2%' or 0.02.")
@click.option("--budget", default=None, help="Fail any variant needing more than this, e.g. 24GiB.")
@click.option("--gpu", "gpu_name", default=None, help="Budget = this catalogue GPU's memory.")
@click.option("--metric", type=click.Choice(["estimated", "measured"]), default="estimated", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@click.option("--strict", is_flag=True, help="Added or removed variants fail too.")
@click.option("--exact", is_flag=True, help="Any change at all fails (baselines updated on purpose only).")
@click.option("--update", is_flag=True, help="Write CURRENT as the new baseline (atomically) and say what changed.")
@user_errors
def gate(current, baseline, tolerance, budget, gpu_name, metric, fmt, strict, exact, update):
    """Fail (exit 1) when peak memory regressed against a baseline or exceeds a budget.

    \b
    Example:
      peftprof estimate scenarios/*.toml --format json > current.json
      peftprof gate current.json --baseline benchmarks/baseline/estimates.json --tolerance 2% --gpu RTX-4090
    """
    from . import gate as gate_mod
    from .textfmt import parse_fraction, parse_size

    tol = _parsed("--tolerance", parse_fraction, tolerance)
    if budget is not None and gpu_name is not None:
        raise UserError("--budget and --gpu: give one of them")
    limit = None
    if budget is not None:
        limit = _parsed("--budget", parse_size, budget)
    elif gpu_name is not None:
        limit = _gpu(gpu_name).memory_bytes
    creating = update and not Path(baseline).exists()
    cur, base = gate_mod.load_inputs(list(current), None if creating else baseline, metric, update=update)
    if creating:
        gate_mod.update_baseline(cur, baseline)
        click.echo(f"baseline {baseline} created with {len(cur)} variants")
        return
    diffs = gate_mod.compare(cur, base, tolerance=tol, budget=limit, metric=metric)
    click.echo(gate_mod.render(diffs, fmt, tolerance=tol, strict=strict, exact=exact))
    if update:
        if Path(baseline).is_dir():
            raise UserError(f"--update: {baseline} is a directory; give the baseline file")
        gate_mod.update_baseline(cur, baseline)
        changed = [d for d in diffs if d.status != "ok" or d.categories]
        click.echo(f"baseline {baseline} updated: {len(changed)} of {len(diffs)} variants changed", err=fmt == "json")
        return
    sys.exit(1 if gate_mod.failed(diffs, strict, exact) else 0)


def main() -> None:
    cli(prog_name="peftprof")


if __name__ == "__main__":  # pragma: no cover
    main()
