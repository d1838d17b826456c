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


@pytest.mark.parametrize("content,message,n_lines", [
    ("", "empty results file", 1),
    ("{not json", "line 1: not valid JSON", 1),
    ("[1, 2]", "item 1: not a result object", 2),  # every bad item, one line each
    ('[{"variant": "a", "estimate": {"peak": 3}}]', "item 1: estimate lacks peak_bytes/breakdown (wrong schema)", 1),
    ('[{"name": "a"}]', "item 1: not a peftprof result (missing variant, estimate)", 1),
    ("\x00\x01\xff", "not UTF-8 text", 1),
])
def test_bad_files_exit_2_without_traceback(tmp_path, content, message, n_lines):
    good = write(tmp_path, "base.json", [record("a")])
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("latin-1"))
    for args in ([bad, "--baseline", good], [good, "--baseline", bad]):
        result = gate(*args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {bad}: {message}")
        assert result.output.count("\n") == n_lines and "Traceback" not in result.output
    if n_lines == 2:
        assert result.output.splitlines()[1] == f"error: {bad}: item 2: not a result object"


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


# --- fail closed: a value the gate cannot compare is exit 2, naming file, variant and field (docs/gate.md) ---

BYTES = "(allowed: a whole number of bytes, a JSON integer from 0 to 2**60)"


def measured(variant, peak):
    rec = record(variant)
    rec.update(status="ok", measured={"peak_bytes": peak, "breakdown": {"weights": 9 * GIB}})
    return rec


def write_jsonl(tmp_path, name, records):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))  # json.dumps writes NaN/Infinity literals
    return str(p)


def test_nan_measured_peaks_fail_closed(tmp_path):
    base = write_jsonl(tmp_path, "base.jsonl", [measured("a", float("nan"))])
    cur = write_jsonl(tmp_path, "cur.jsonl", [measured("a", 100 * 9 * GIB)])
    result = gate(cur, "--baseline", base, "--metric", "measured")
    assert result.exit_code == 2  # was 0: NaN * (1 + tol) compares false, so a 100x growth passed
    assert result.output == f"error: {base}: line 1: variant a: measured.peak_bytes: NaN is not a byte count {BYTES}\n"
    result = gate(base, "--baseline", cur, "--metric", "measured")
    assert result.exit_code == 2
    assert result.output == f"error: {base}: line 1: variant a: measured.peak_bytes: NaN is not a byte count {BYTES}\n"


def test_nan_device_bytes_is_not_ok_under_a_budget(tmp_path):
    rec = record("a")
    rec["estimate"]["device_bytes"] = float("nan")
    path = write(tmp_path, "cur.json", [rec])
    result = gate(path, "--baseline", path, "--budget", "1MiB")
    assert result.exit_code == 2  # was 0 with status ok
    assert result.output == (f"error: {path}: item 1: variant a: estimate.device_bytes: NaN is not a byte count "
                             f"{BYTES}\n")


def test_every_value_the_gate_cannot_compare_is_named_at_once(tmp_path):
    a = record("a")
    a["scenario"] = "qlora"
    a["estimate"]["breakdown"].update(weights=float("nan"), logits=float("inf"), activations="3GiB")
    b = record("b")
    b["estimate"]["breakdown"]["optimizer"] = 10**400
    c = record(["c"])
    d = record("d")
    d["estimate"]["breakdown"]["gradients"] = True
    cur = write(tmp_path, "cur.json", [a, b, c, d, record("a")])
    base = write(tmp_path, "base.json", [record("a")])
    result = gate(cur, "--baseline", base)
    assert result.exit_code == 2, result.output  # was 1 (a traceback, which CI reads as "regression")
    assert "Traceback" not in result.output
    assert result.output.splitlines() == [
        f"error: {cur}: item 3: variant: [\"c\"] is not a variant name (allowed: a non-empty string)",
        f"error: {cur}: item 1: variant a: scenario: \"qlora\" is not an object of resolved settings",
        f"error: {cur}: item 1: variant a: estimate.breakdown.weights: NaN is not a byte count {BYTES}",
        f"error: {cur}: item 1: variant a: estimate.breakdown.activations: \"3GiB\" is not a byte count {BYTES}",
        f"error: {cur}: item 1: variant a: estimate.breakdown.logits: Infinity is not a byte count {BYTES}",
        f"error: {cur}: item 2: variant b: estimate.breakdown.optimizer: an integer of 401 digits is out of range "
        f"{BYTES}",
        f"error: {cur}: item 4: variant d: estimate.breakdown.gradients: true is not a byte count {BYTES}",
        f"error: {cur}: item 5: variant a appears more than once in CURRENT (first at {cur}: item 1)",
    ]


def test_bad_values_in_both_files_are_reported_together_and_update_writes_nothing(tmp_path):
    bad_cur = record("a")
    bad_cur["estimate"]["peak_bytes"] = -1
    bad_base = record("a")
    bad_base["estimate"]["breakdown"]["overhead"] = 1.5
    cur = write(tmp_path, "cur.json", [bad_cur])
    base = write(tmp_path, "base.json", [bad_base])
    before = (tmp_path / "base.json").read_text()
    result = gate(cur, "--baseline", base, "--update")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {cur}: item 1: variant a: estimate.peak_bytes: -1 is out of range {BYTES}",
        f"error: {base}: item 1: variant a: estimate.breakdown.overhead: 1.5 is not a byte count {BYTES}"]
    assert (tmp_path / "base.json").read_text() == before
    result = gate(cur, "--baseline", tmp_path / "new.json", "--update")
    assert result.exit_code == 2 and not (tmp_path / "new.json").exists()


def test_oom_variant_has_no_measurement_and_all_are_named(tmp_path):
    oom = record("b")
    oom.update(status="oom", measured=None)
    path = write_jsonl(tmp_path, "run.jsonl", [record("a"), oom])
    result = gate(path, "--baseline", path, "--metric", "measured")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {path}: line 1: variant a has no measurement (status \"estimate only\"); use --metric estimated",
        f"error: {path}: line 2: variant b has no measurement (status \"oom\"); use --metric estimated"]


@pytest.mark.parametrize("budget,message", [
    ("0.5", "'0.5' is 0.5 bytes: a size must be at least 1 byte; e.g. 512MiB, 16GiB, 24GB"),
    ("0", "'0' is 0 bytes: a size must be at least 1 byte; e.g. 512MiB, 16GiB, 24GB"),
    ("1.5", "'1.5' is 1.5 bytes: a size must be a whole number of bytes; e.g. 512MiB, 16GiB, 24GB"),
    ("1e400", "'1e400' is more than 2**60 bytes (1 EiB); e.g. 512MiB, 16GiB, 24GB"),
    ("nan", "'nan' is not a size (e.g. 512MiB, 16GiB, 24GB)"),
])
def test_budget_must_be_a_whole_number_of_bytes(tmp_path, budget, message):
    path = write(tmp_path, "cur.json", [record("a")])
    result = gate(path, "--baseline", path, "--budget", budget)
    assert result.exit_code == 2
    assert result.output == f"error: --budget: {message}\n"


def test_markdown_and_text_keep_names_inert(tmp_path):
    evil = "x\n| y | ok | 1 | 1 | +0% | |\n[PASS](https://evil.example) <b>\x1b[2J"
    path = write(tmp_path, "cur.json", [record(evil)])
    md = gate(path, "--baseline", path, "--format", "markdown")
    assert md.exit_code == 0
    rows = [line for line in md.output.splitlines() if line.startswith("|")]
    assert len(rows) == 3  # header, rule, one variant: the newline did not add a row
    assert rows[2] == ("| x \\| y \\| ok \\| 1 \\| 1 \\| +0% \\| \\| [PASS]\\(https://evil.example) &lt;b&gt;\\x1b[2J "
                       "| ok | 10.00 | 10.00 | +0.00% |  |")
    text = gate(path, "--baseline", path).output
    assert "\x1b" not in text and "\\x1b[2J" in text and text.count("\n") == 4  # header, rule, row, summary


def test_an_empty_side_fails_closed(tmp_path):
    base = write(tmp_path, "base.json", [record("a")])
    empty = write(tmp_path, "empty.json", [])
    result = gate(empty, "--baseline", base)
    assert result.exit_code == 2  # was 0: nothing compared, "1 removed", a pass unless --strict
    assert result.output == (f"error: {empty}: CURRENT holds no results (allowed: at least one variant; a gate that "
                             "compares nothing fails)\n")
    result = gate(base, "--baseline", empty)
    assert result.exit_code == 2  # was 0: every variant "added"
    assert result.output == (f"error: {empty}: BASELINE holds no results (allowed: at least one variant; a gate that "
                             "compares nothing fails)\n")
    result = gate(base, "--baseline", empty, "--update")  # an empty baseline may be written over
    assert result.exit_code == 0 and json.loads((tmp_path / "empty.json").read_text()) == [record("a")]
    result = gate(write(tmp_path, "e2.json", []), "--baseline", tmp_path / "new.json", "--update")
    assert result.exit_code == 2 and not (tmp_path / "new.json").exists()


def test_no_variant_on_both_sides_fails_closed(tmp_path):
    # every variant added or removed: nothing is compared, which used to pass unless --strict (docs/gate.md)
    base = write(tmp_path, "base.json", [record("old-a"), record("old-b")])
    cur = write(tmp_path, "cur.json", [record("new-a")])
    result = gate(cur, "--baseline", base)
    assert result.exit_code == 2
    assert result.output == (f"error: {cur} and {base}: no variant is on both sides (CURRENT 1, e.g. new-a; "
                             "BASELINE 2, e.g. old-a) (allowed: at least one variant in both, a gate that compares "
                             "nothing fails; --update writes CURRENT as the baseline)\n")
    result = gate(cur, "--baseline", base, "--update")  # renaming every variant on purpose
    assert result.exit_code == 0 and json.loads((tmp_path / "base.json").read_text()) == [record("new-a")]
