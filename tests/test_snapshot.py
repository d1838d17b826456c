"""The step as a PyTorch memory snapshot: torch's own _memory_viz reads it, and it replays to the peak."""

import pickle
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL
from torch.cuda import _memory_viz

from peftprof.cli import cli
from peftprof.run.runner import run_variant
from peftprof.scenario import load_scenario
from peftprof.trace import trace_peak

TINY = 'name = "snap"\n' + TINY_MODEL + '''[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    (d / "snap.toml").write_text(TINY)
    s = load_scenario(d / "snap.toml")[0]
    rec = run_variant(s, device="cpu", snapshot_path=d / "step.pickle")
    assert rec["status"] == "ok"
    return d, rec


def replay(snap) -> tuple[int, int]:
    """(largest live bytes, live bytes at the end) from the device trace alone, matching frees by address."""
    live, total, peak = {}, 0, 0
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            assert e["addr"] not in live
            live[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed":
            total -= live.pop(e["addr"])
        peak = max(peak, total)
    return peak, total


def test_snapshot_replays_to_the_measured_peak(run):
    d, rec = run
    assert rec["measured"]["snapshot_path"] == str(d / "step.pickle")
    snap = pickle.loads((d / "step.pickle").read_bytes())
    peak, end = replay(snap)
    assert peak == rec["measured"]["peak_bytes"]
    assert end == [p["bytes"] for p in rec["measured"]["phases"] if p["phase"] == "steady"][0]
    frames = [e["frames"][0] for e in snap["device_traces"][0] if e["action"] == "alloc"]
    assert {"filename": "lm_head", "line": 0, "name": "weights float32[1000, 64]"} in frames


def test_torch_memory_viz_reads_it(run, tmp_path):
    d, rec = run
    snap = pickle.loads((d / "step.pickle").read_bytes())
    _, end = replay(snap)
    summary = _memory_viz.segsum(snap)  # asserts that every segment's blocks add up
    assert "segments: 1" in summary
    text = _memory_viz.trace(snap)
    assert text.startswith("Device 0 ----------------\n")
    n = len(snap["device_traces"][0])
    assert f"{n} entries" in text and text.count("\ndel ") == sum(
        e["action"] == "free_requested" for e in snap["device_traces"][0])
    lines = _memory_viz.segments(snap, format_flamegraph=lambda lines: lines)  # flamegraph input
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines.splitlines() if ";active_allocated;" in line) == end
    out = tmp_path / "trace.html"
    done = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", "trace_plot", str(d / "step.pickle"),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Active Memory Timeline" in out.read_text()


def test_trace_snapshot_and_command(run, tmp_path):
    d, rec = run
    s = load_scenario(d / "snap.toml")[0]
    traced = trace_peak(s, snapshot_path=tmp_path / "t.pickle")
    assert replay(pickle.loads((tmp_path / "t.pickle").read_bytes()))[0] == traced["peak_bytes"]
    result = CliRunner().invoke(cli, ["snapshot", str(d / "snap.toml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "1-snap.pickle"
    assert result.output == f"snapshot: {path}  (snap)\n"
    assert replay(pickle.loads(path.read_bytes()))[0] == traced["peak_bytes"]


def test_snapshot_command_refuses_a_file_as_directory(run, tmp_path):
    d, _ = run
    (tmp_path / "f").write_text("x")
    result = CliRunner().invoke(cli, ["snapshot", str(d / "snap.toml"), "-o", str(tmp_path / "f")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'f'}: is not a directory; give -o a directory for the snapshots\n"


def test_int4_without_run_points_to_an_option_snapshot_has(tmp_path):
    path = tmp_path / "i4.toml"
    path.write_text(TINY.replace('weights = "fp32"', 'weights = "int4"').replace('name = "snap"', 'name = "i4"'))
    result = CliRunner().invoke(cli, ["snapshot", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--method" not in result.output  # was "use --method analytic", an option snapshot does not have
    assert result.output == (f'error: {path}: [precision] weights: "int4": variant i4: the traced snapshot cannot '
                             "build int4 layers on fake tensors (optimum-quanto cannot quantize meta tensors); add "
                             "--run to snapshot a measured CPU step (allowed without --run: fp32, fp16, bf16, int8, "
                             "fp4, nf4)\n")
