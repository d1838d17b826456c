"""The runner's reliability (issue 19) and portability (issue 12) on CPU: run options identify a finished
variant, concurrent runs and --force never lose records, write failures keep the measurement, a memory cap
refuses from the estimate, corrupt files are salvaged, interruptions (SIGINT, SIGTERM, SIGKILL) save what
finished, a variant can run in its own process, and a library refusing a combination is a one-line result."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.estimate import estimate
from peftprof.results import read_results_file
from peftprof.run import runner as runner_mod
from peftprof.run import session as session_mod
from peftprof.run.session import run_scenarios
from peftprof.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_MODEL + '''[peft]
r = 4
[training]
batch_size = 1
seq_len = 16
[run]
device = "cpu"
steps = 1
warmup_steps = 1
'''
INTERRUPTED = "interrupted: the variants that finished are saved; run again to resume\n"


def scenario(tmp_path, text=TINY, sweep=None, name="tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text + ("" if sweep is None else f'[sweep]\n"peft.r" = {sweep}\n'))
    return path


def stored(path: Path) -> list[dict]:
    return read_results_file(path)


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args), "--quiet", "--no-report"])


def counting(monkeypatch, raise_on=None, exc=KeyboardInterrupt):
    """Count run_variant calls; raise `exc` on the call numbered `raise_on` (1-based)."""
    calls, real = [], runner_mod.run_variant

    def wrapped(s, **kw):
        calls.append(s.name)
        if len(calls) == raise_on:
            raise exc()
        return real(s, **kw)

    monkeypatch.setattr(runner_mod, "run_variant", wrapped)
    return calls


# --- 2: run options are part of what identifies a finished variant -------------------------------------------

def test_a_different_memory_cap_or_step_count_runs_the_variant_again(tmp_path, monkeypatch):
    scen, out = scenario(tmp_path), tmp_path / "out"
    result = invoke(scen, "--out", out, "--max-memory", "1B")
    assert result.exit_code == 0, result.output
    (rec,) = stored(out / "tiny.jsonl")
    assert (rec["status"], rec["error"]["phase"]) == ("oom", "build")
    assert rec["run_options"] == {"device": "cpu", "steps": 1, "max_memory": 1}
    calls = counting(monkeypatch)
    result = invoke(scen, "--out", out)  # no cap: measured, not the capped OOM reused
    assert result.exit_code == 0, result.output
    assert calls == ["tiny"]
    (rec,) = stored(out / "tiny.jsonl")
    assert rec["status"] == "ok" and rec["run_options"] == {"device": "cpu", "steps": 1, "max_memory": None}
    result = invoke(scen, "--out", out, "--steps", "2")
    assert result.exit_code == 0 and calls == ["tiny", "tiny"]
    (rec,) = stored(out / "tiny.jsonl")
    assert len(rec["measured"]["step_times_s"]) == 2
    result = invoke(scen, "--out", out, "--steps", "2", "--device", "cpu")  # same options: reused
    assert result.exit_code == 0 and calls == ["tiny", "tiny"]


# --- 3: two runs writing one results file merge -----------------------------------------------------------

def test_two_concurrent_runs_into_one_results_file_keep_every_record(tmp_path):
    a = scenario(tmp_path, 'name = "shared"\n' + TINY, "[1, 2]", "a.toml")
    b = scenario(tmp_path, 'name = "shared"\n' + TINY, "[5, 6]", "b.toml")
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "peftprof.cli", "run", str(f), "--out", str(out), "--quiet",
                               "--no-report"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for f in (a, b)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    names = sorted(r["variant"] for r in stored(out / "shared.jsonl"))
    assert names == [f"shared[peft.r={r}]" for r in (1, 2, 5, 6)]


def test_concurrent_writers_merge_under_the_lock(tmp_path):
    """Two processes saving 40 records each into one file, as fast as they can: all 80 are there."""
    path = tmp_path / "s.jsonl"
    code = ("import sys; from pathlib import Path; from peftprof.run.session import save_record\n"
            "for i in range(40):\n"
            "    save_record(Path(sys.argv[1]), {'variant': f'{sys.argv[2]}{i}', 'estimate': "
            "{'peak_bytes': i, 'breakdown': {}}, 'status': 'ok'})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), tag], cwd=ROOT) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(r["variant"] for r in stored(path)) == sorted(f"{t}{i}" for t in "ab" for i in range(40))


# --- 4: --force replaces records one by one -----------------------------------------------------------------

def test_interrupted_force_keeps_the_records_it_has_not_replaced(tmp_path, monkeypatch):
    variants = load_scenario(scenario(tmp_path, sweep="[2, 4, 8]"))
    run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False)
    before = {r["variant"]: r["provenance"]["time"] for r in stored(tmp_path / "tiny.jsonl")}
    counting(monkeypatch, raise_on=2)
    records, files, interrupted = run_scenarios(variants, out_dir=tmp_path, device="cpu", force=True, progress=False)
    assert interrupted and len(records) == 1
    after = {r["variant"]: r["provenance"]["time"] for r in stored(files[0])}
    assert list(after) == list(before)  # all three kept, in their order
    assert after[variants[0].name] != before[variants[0].name]  # the first was re-measured
    assert [after[v.name] for v in variants[1:]] == [before[v.name] for v in variants[1:]]


# --- 5: write problems: checked before training, and a failed write keeps the measurement -------------------

def test_out_naming_a_regular_file_is_exit_2_before_training(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    (tmp_path / "file").write_text("x")
    result = invoke(scenario(tmp_path), "--out", tmp_path / "file")
    assert result.exit_code == 2
    assert result.output == f"error: --out: {tmp_path / 'file'} is a file, not a directory\n"
    assert calls == []


def test_unwritable_out_is_exit_2_before_training(tmp_path, monkeypatch):
    calls = counting(monkeypatch)

    def refuse(out):  # root writes anywhere chmod forbids: stand in for a read-only directory
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(session_mod, "_write_probe", refuse)
    result = invoke(scenario(tmp_path), "--out", tmp_path)
    assert result.exit_code == 2
    assert result.output == f"error: --out: cannot write in {tmp_path}: Permission denied\n"
    assert calls == []


def test_file_names_too_long_for_the_file_system_are_exit_2_before_training(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    monkeypatch.setattr(session_mod, "_name_max", lambda out: 128)  # e.g. eCryptfs allows 143
    scen = scenario(tmp_path, f'name = "{"n" * 100}"\n' + TINY)
    result = invoke(scen, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output == (f"error: {scen}: name: \"{'n' * 40}…\" (100 characters) makes file names of 130 bytes in "
                             f"{tmp_path / 'out'}; the file system allows 128 (allowed: a name of at most 98 "
                             "characters)\n")
    assert calls == []


def test_a_full_disk_after_training_keeps_the_measurement_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    real, writes = session_mod.write_jsonl, []

    def disk_full_on_second(path, records):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, records)

    monkeypatch.setattr(session_mod, "write_jsonl", disk_full_on_second)
    out = tmp_path / "out"
    result = invoke(scenario(tmp_path, sweep="[2, 4, 8]"), "--out", out)
    fallback = tmp_path / f"peftprof-unsaved-tiny-{os.getpid()}.jsonl"
    assert result.exit_code == 2
    assert result.stderr == (f"error: {out / 'tiny.jsonl'}: cannot write results (No space left on device); the "
                             f"sweep stopped; the measurement of tiny[peft.r=4] was kept in {fallback} (one JSON line, "
                             "results format)\n")
    assert "Traceback" not in result.output
    assert [r["variant"] for r in stored(out / "tiny.jsonl")] == ["tiny[peft.r=2]"]
    (kept,) = stored(fallback)
    assert kept["variant"] == "tiny[peft.r=4]" and kept["status"] == "ok" and kept["measured"]["peak_bytes"] > 0


# --- 6: a memory cap refuses from the estimate, before building -----------------------------------------------

def test_max_memory_below_the_estimated_weights_refuses_without_building(tmp_path, monkeypatch):
    (s,) = load_scenario(scenario(tmp_path))
    built = []
    monkeypatch.setattr(runner_mod, "build", lambda *a: built.append(a))
    b = estimate(s, device="cpu")["breakdown"]
    need = b["weights"] + b["quant_constants"] + b["trainable"]
    assert need > 100_000  # hidden 64, vocab 1000: the embedding alone is 256,000 B
    rec = runner_mod.run_variant(s, device="cpu", max_memory=100_000)
    assert built == []
    assert rec["status"] == "oom" and rec["measured"] is None
    assert rec["error"] == {"phase": "build", "message": "refused from the estimate: weights + quantization constants "
                            f"+ trainable parameters alone are estimated at {need:,} B, over the cap 100,000 B; the "
                            "model was not built"}


# --- 10: a corrupt results file is salvaged and the run resumes -----------------------------------------------

def test_corrupt_results_file_keeps_its_valid_records_and_sets_bad_lines_aside(tmp_path, monkeypatch):
    scen, out = scenario(tmp_path, sweep="[2, 4]"), tmp_path / "out"
    variants = load_scenario(scen)
    run_scenarios(variants[:1], out_dir=out, device="cpu", progress=False)
    path = out / "tiny.jsonl"
    good = path.read_text()
    path.write_text(good + "not json at all\n")
    calls = counting(monkeypatch)
    result = invoke(scen, "--out", out)
    assert result.exit_code == 0, result.output
    (side,) = out.glob("tiny.jsonl.bad-*")
    assert result.stderr == f"warning: {path}: its unreadable lines were moved to {side}; resuming with its 1 valid " \
                            "records\n"
    assert side.read_text() == "not json at all\n"
    assert calls == [variants[1].name]  # the valid record was kept, not measured again
    assert [r["variant"] for r in stored(path)] == [v.name for v in variants]


# --- 11: device blame, every interruption exits 130, results lines only for files that exist -----------------

def test_cuda_in_the_scenario_file_names_the_file_and_key(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    scen = scenario(tmp_path, TINY.replace('device = "cpu"', 'device = "cuda"'))
    result = invoke(scen, "--out", tmp_path)
    assert result.exit_code == 2
    assert result.output == f'error: {scen}: [run] device: "cuda": torch sees no CUDA device (allowed on this ' \
                            'machine: auto, cpu)\n'


def test_ctrl_c_before_anything_finished_prints_no_results_file(tmp_path, monkeypatch):
    counting(monkeypatch, raise_on=1)
    result = invoke(scenario(tmp_path), "--out", tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr == INTERRUPTED
    assert "results:" not in result.stdout and not (tmp_path / "out" / "tiny.jsonl").exists()


def test_a_second_ctrl_c_while_reporting_exits_130(tmp_path, monkeypatch):
    import peftprof.report as report_mod

    counting(monkeypatch, raise_on=2)

    def second_ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_report", second_ctrl_c)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(scenario(tmp_path, sweep="[2, 4]")), "--out", str(out), "--quiet"])
    assert result.exit_code == 130
    assert result.stderr == INTERRUPTED
    assert f"results: {out / 'tiny.jsonl'}\n" in result.stdout
    assert len(stored(out / "tiny.jsonl")) == 1


# --- fault injection: a real `peftprof run` interrupted at random points -----------------------------------------

LOGGING_RUN = r"""
import os, sys, time
import peftprof.run.runner as r
real = r.run_variant
def logged(s, **kw):
    time.sleep(1.5)  # the remaining variants outlast the test's random delay, even on a loaded machine
    rec = real(s, **kw)
    with open(os.environ["FINISHED_LOG"], "a") as f:
        f.write(s.name + "\n")
    return rec
r.run_variant = logged
from peftprof.cli import main
sys.argv = ["peftprof"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("sig, seed", [(signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGKILL, 3)],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_sweep_killed_at_a_random_point_keeps_every_finished_variant(tmp_path, monkeypatch, sig, seed):
    rng = random.Random(seed)
    scen, out, log = scenario(tmp_path, sweep="[1, 2, 3, 4]"), tmp_path / "out", tmp_path / "finished.log"
    proc = subprocess.Popen([sys.executable, "-c", LOGGING_RUN, "run", str(scen), "--out", str(out), "--quiet",
                             "--no-report"], cwd=ROOT, env={**os.environ, "FINISHED_LOG": str(log)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for, deadline = 1, time.monotonic() + 120
    while (not log.exists() or len(log.read_text().split()) < wait_for) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 1.0))  # a variant takes about 1-2 s here: anywhere in the next one
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    finished = log.read_text().split()
    saved = [r["variant"] for r in stored(out / "tiny.jsonl")]  # parses: every write was atomic
    assert len(saved) == len(set(saved)) and saved == [n for n in finished if n in saved]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert set(finished) - set(saved) <= {finished[-1]}  # at most the one being written when killed
    else:
        assert proc.returncode == 128 + sig, err.decode()[-2000:]
        assert err.decode().endswith(INTERRUPTED)
        assert saved == finished
    if sig == signal.SIGINT:  # resume measures exactly what is missing
        calls = counting(monkeypatch)
        variants = load_scenario(scen)
        records, _, interrupted = run_scenarios(variants, out_dir=out, device="cpu", progress=False)
        assert not interrupted and [r["status"] for r in records] == ["ok"] * 4
        assert calls == [v.name for v in variants if v.name not in saved]


@pytest.mark.parametrize("seed", [4, 5])
def test_a_write_failing_at_a_random_variant_keeps_the_others(tmp_path, monkeypatch, seed):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    fail_at = random.Random(seed).randint(1, 3)
    real, writes = session_mod.write_jsonl, []

    def failing(path, records):
        writes.append(path)
        if len(writes) == fail_at:
            raise OSError(errno.EIO, "Input/output error")
        real(path, records)

    monkeypatch.setattr(session_mod, "write_jsonl", failing)
    variants = load_scenario(scenario(tmp_path, sweep="[1, 2, 3]"))
    outcome = run_scenarios(variants, out_dir=tmp_path / "out", device="cpu", progress=False)
    assert not outcome.interrupted and len(outcome.records) == fail_at
    assert outcome.problems[0].startswith(f"{tmp_path / 'out' / 'tiny.jsonl'}: cannot write results (Input/output "
                                          "error); the sweep stopped; the measurement of ")
    saved = [r["variant"] for r in stored(tmp_path / "out" / "tiny.jsonl")] if fail_at > 1 else []
    kept = [r["variant"] for r in stored(tmp_path / f"peftprof-unsaved-tiny-{os.getpid()}.jsonl")]
    assert saved + kept == [v.name for v in variants[:fail_at]]


# --- 12 A: a variant in its own process ------------------------------------------------------------------------

def child_target(s, *, progress, **kw):
    """Runs in the child process (spawned): r=2 exits, r=4 is killed, the others run for real."""
    progress("build")
    if s.peft.r == 2:
        os._exit(3)
    if s.peft.r == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    rec = runner_mod.run_variant(s, progress=progress, **kw)
    rec["child_pid"] = os.getpid()
    return rec


def test_isolated_variants_run_in_child_processes_and_a_dying_child_is_an_error(tmp_path):
    variants = load_scenario(scenario(tmp_path, sweep="[2, 4, 8]"))
    records, files, interrupted = run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False,
                                                isolate=True, target=child_target)
    assert not interrupted
    assert [r["status"] for r in records] == ["error", "error", "ok"]
    assert records[0]["error"] == {"phase": "build", "exit_code": 3,
                                   "message": "the variant's process exited with code 3 without a result during build"}
    assert records[1]["error"] == {"phase": "build", "exit_code": -9,
                                   "message": "the variant's process was killed by signal 9 (SIGKILL, as the "
                                              "kernel's out-of-memory killer does) during build"}
    assert records[2]["child_pid"] != os.getpid() and records[2]["measured"]["peak_bytes"] > 0
    assert [r["status"] for r in stored(files[0])] == ["error", "error", "ok"]


# --- 12 B: a library refusing a combination is a one-line result ---------------------------------------------

def library_raiser(module: str, exc: str, text: str):
    """A function whose frames belong to `module` (as if that library raised)."""
    ns = {"__name__": module}
    exec(f"def refuse(*args, **kwargs):\n    raise {exc}({text!r})\n", ns)
    return ns["refuse"]


@pytest.mark.parametrize("target, module, exc, library", [
    ("peft.get_peft_model", "peft.tuners.tuners_utils", "ValueError", "peft"),
    ("bitsandbytes.nn.Params4bit", "bitsandbytes.nn.modules", "NotImplementedError", "bitsandbytes"),
])
def test_a_library_refusing_a_combination_says_which_and_why(tmp_path, monkeypatch, target, module, exc, library):
    text = TINY.replace('weights = "fp32"', 'weights = "nf4"\ncompute_dtype = "fp32"')
    (s,) = load_scenario(scenario(tmp_path, text))
    monkeypatch.setattr(target, library_raiser(module, exc, "this combination is not supported on CPU\nmore detail"))
    rec = runner_mod.run_variant(s, device="cpu")
    assert rec["status"] == "error"
    err = rec["error"]
    assert (err["phase"], err["library"], err["exception"]) == ("build", library, exc)
    assert err["message"] == f"{library} refuses: this combination is not supported on CPU"


def test_refusing_library_is_the_innermost_library_frame():
    ns = {"__name__": "peft.peft_model", "inner": library_raiser("transformers.modeling_utils", "RuntimeError", "x")}
    exec("def outer():\n    inner()\n", ns)  # peft calls transformers, which raises
    with pytest.raises(RuntimeError) as caught:
        ns["outer"]()
    assert runner_mod.refusing_library(caught.value) == "transformers"
    with pytest.raises(ValueError) as caught:
        raise ValueError("ours only")
    assert runner_mod.refusing_library(caught.value) is None
    try:
        raise ValueError("ours only")
    except ValueError as e:
        assert runner_mod.error_info(e, "build")["message"] == "ValueError: ours only"
