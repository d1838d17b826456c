"""The CI gate: regressions name the category and the setting that moved; bad input exits 2."""

import copy
import json

import pytest
from click.testing import CliRunner

from peftprof.cli import cli

GIB = 1 << 30


def record(variant="v", peak=10 * GIB, seq_len=2048, **cats):
    breakdown = {"weights": 6 * GIB, "quant_constants": 0, "trainable": 0, "gradients": 0, "optimizer": 0,
                 "activations": 3 * GIB, "logits": GIB, "temporaries": 0, "overhead": 0}
    breakdown.update(cats)
    assert sum(breakdown.values()) == peak, "test data must add up"
    return {"variant": variant, "scenario": {"name": variant, "training": {"seq_len": seq_len, "batch_size": 1}},
            "estimate": {"method": "analytic", "device": "cuda", "peak_bytes": peak, "breakdown": breakdown}}


def write(tmp_path, name, records):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return str(p)


def gate(*args):
    return CliRunner().invoke(cli, ["gate", *map(str, args)])


def test_identical_inputs_pass(tmp_path):
    base = write(tmp_path, "base.json", [record("a"), record("b")])
    result = gate(base, "--baseline", base)
    assert result.exit_code == 0
    assert "PASS: 0 regressed, 0 over budget, 0 improved, 0 added, 0 removed (tolerance 2%)" in result.output


def test_three_percent_growth_fails_at_two_percent_naming_category_and_setting(tmp_path):
    base = write(tmp_path, "base.json", [record("a")])
    grown = int(0.3 * GIB)  # +3% of 10 GiB, all in activations
    cur = write(tmp_path, "cur.json", [record("a", peak=10 * GIB + grown, seq_len=4096, activations=3 * GIB + grown)])
    result = gate(cur, "--baseline", base, "--tolerance", "2%")
    assert result.exit_code == 1
    assert "regression" in result.output
    assert "activations +0.30 GiB: training.seq_len 2048 -> 4096" in result.output
    assert "+3.00%" in result.output
    assert gate(cur, "--baseline", base, "--tolerance", "5%").exit_code == 0


def test_budget_exceeded_fails(tmp_path):
    base = write(tmp_path, "base.json", [record("a")])
    result = gate(base, "--baseline", base, "--budget", "8GiB")
    assert result.exit_code == 1
    assert "over_budget" in result.output and "needs 10.00 GiB of a 8.00 GiB budget" in result.output
    assert gate(base, "--baseline", base, "--gpu", "A100-40GB").exit_code == 0
    assert gate(base, "--baseline", base, "--gpu", "T4").exit_code == 0  # 10 GiB fits 16 GiB
    assert gate(base, "--baseline", base, "--budget", "9.5GiB").exit_code == 1


def test_improvements_are_reported(tmp_path):
    base = write(tmp_path, "base.json", [record("a")])
    cur = write(tmp_path, "cur.json", [record("a", peak=9 * GIB, activations=2 * GIB)])
    result = gate(cur, "--baseline", base)
    assert result.exit_code == 0
    assert "improved" in result.output and "activations -1.00 GiB" in result.output


def test_added_and_removed_variants(tmp_path):
    base = write(tmp_path, "base.json", [record("a"), record("gone")])
    cur = write(tmp_path, "cur.json", [record("a"), record("new")])
    result = gate(cur, "--baseline", base)
    assert result.exit_code == 0
    assert "1 added, 1 removed" in result.output
    assert gate(cur, "--baseline", base, "--strict").exit_code == 1


@pytest.mark.parametrize("content,message", [
    ("", "empty results file"),
    ("{not json", "line 1: not valid JSON"),
    ("[1, 2]", "item 1: not a result object"),
    ('[{"variant": "a", "estimate": {"peak": 3}}]', "item 1: estimate lacks peak_bytes/breakdown (wrong schema)"),
    ('[{"name": "a"}]', "item 1: not a peftprof result (missing variant, estimate)"),
    ("\x00\x01\xff", "not UTF-8 text"),
])
def test_bad_files_exit_2_without_traceback(tmp_path, content, message):
    good = write(tmp_path, "base.json", [record("a")])
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("latin-1"))
    for args in ([bad, "--baseline", good], [good, "--baseline", bad]):
        result = gate(*args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {bad}: {message}")
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_missing_file_unknown_gpu_and_measured_without_measurement(tmp_path):
    good = write(tmp_path, "base.json", [record("a")])
    assert gate(tmp_path / "nope.json", "--baseline", good).output == f"error: {tmp_path / 'nope.json'}: no such file\n"
    result = gate(good, "--baseline", good, "--gpu", "H300")
    assert result.exit_code == 2 and "unknown GPU 'H300'" in result.output
    result = gate(good, "--baseline", good, "--metric", "measured")
    assert result.exit_code == 2
    assert "variant a has no measurement" in result.output


def test_update_round_trips(tmp_path):
    base_path = tmp_path / "baseline.json"
    cur = write(tmp_path, "cur.json", [record("a")])
    result = gate(cur, "--baseline", base_path, "--update")
    assert result.exit_code == 0 and "created with 1 variants" in result.output
    assert gate(cur, "--baseline", base_path).exit_code == 0
    grown = copy.deepcopy(record("a", peak=12 * GIB, activations=5 * GIB))
    cur2 = write(tmp_path, "cur2.json", [grown])
    assert gate(cur2, "--baseline", base_path).exit_code == 1
    result = gate(cur2, "--baseline", base_path, "--update")
    assert result.exit_code == 0 and "1 of 1 variants changed" in result.output
    assert json.loads(base_path.read_text()) == [grown]
    assert gate(cur2, "--baseline", base_path).exit_code == 0


def test_markdown_output_is_a_valid_table(tmp_path):
    base = write(tmp_path, "base.json", [record("a|b")])
    out = gate(base, "--baseline", base, "--format", "markdown").output
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0] == "| variant | status | baseline GiB | current GiB | change | why |"
    assert lines[1] == "|---|---|---:|---:|---:|---|"
    # every row has the header's column count (the | inside the name is escaped)
    for line in lines:
        assert len(line.replace("\\|", "").split("|")) == len(lines[0].split("|"))


def test_json_output_and_runner_results_as_input(tmp_path):
    rec = record("a")
    rec.update(status="ok", measured={"peak_bytes": 9 * GIB, "breakdown": {"weights": 9 * GIB}})
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text(json.dumps(rec) + "\n")
    result = gate(jsonl, "--baseline", jsonl, "--metric", "measured", "--format", "json")
    data = json.loads(result.output)
    assert result.exit_code == 0 and data["result"] == "pass" and data["variants"][0]["current_bytes"] == 9 * GIB
    result = gate(tmp_path, "--baseline", jsonl)  # a directory of results
    assert result.exit_code == 0


def test_exact_fails_on_any_change(tmp_path):
    base = write(tmp_path, "base.json", [record("a")])
    cur = write(tmp_path, "cur.json", [record("a", peak=10 * GIB - 1, activations=3 * GIB - 1)])
    assert gate(cur, "--baseline", base).exit_code == 0
    result = gate(cur, "--baseline", base, "--exact")
    assert result.exit_code == 1 and "1 changed within tolerance" in result.output
    assert gate(base, "--baseline", base, "--exact").exit_code == 0
