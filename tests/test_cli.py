"""CLI: help on every command, exit codes, exact error text, fast start without torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftprof.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"peftprof {name}" in result.output.split("Example:")[1]


def test_help_and_validate_do_not_import_torch():
    code = ("import sys; from peftprof.cli import cli; from click.testing import CliRunner;"
            "r = CliRunner().invoke(cli, ['validate', 'scenarios/quickstart.toml']); assert r.exit_code == 0, r.output;"
            "r = CliRunner().invoke(cli, ['estimate', 'scenarios/qlora-7b.toml']); assert r.exit_code == 0, r.output;"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_presets_table_and_json():
    result = CliRunner().invoke(cli, ["presets", "--format", "json"])
    data = json.loads(result.output)
    llama = next(m for m in data["models"] if m["name"] == "llama-2-7b")
    assert llama["n_params"] == 6_738_415_616
    table = CliRunner().invoke(cli, ["presets"]).output
    assert "6,738,415,616" in table and "H200" in table


def test_presets_say_which_estimators_answer(monkeypatch):
    import dataclasses

    from peftprof import families

    data = json.loads(CliRunner().invoke(cli, ["presets", "--format", "json"]).output)
    assert {m["name"]: m["analytic"] for m in data["models"]}["llama-2-7b"] is True
    # a family the analytic estimator does not model shows "trace" only
    monkeypatch.setitem(families.REGISTRY, "gpt2", dataclasses.replace(families.REGISTRY["gpt2"], analytic=False))
    table = CliRunner().invoke(cli, ["presets"]).output
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line}
    assert rows["gpt2"].endswith("  trace") and rows["llama-2-7b"].endswith("  analytic, trace")


def test_size_unit_picks_the_largest_unit_the_largest_value_reaches():
    from peftprof.textfmt import in_unit, size_unit

    assert size_unit([3 << 30, 5]) == ("GiB", 1 << 30)
    assert size_unit([None, (1 << 30) - 1]) == ("MiB", 1 << 20)
    assert size_unit([1023]) == ("KiB", 1024) and size_unit([]) == ("KiB", 1024)
    assert in_unit(1536 << 10, 1 << 20) == "1.50" and in_unit(None, 1 << 20) == "-"


def test_estimate_table_of_a_tiny_model_reads_in_mib_and_csv_keeps_gib():
    table = CliRunner().invoke(cli, ["estimate", str(ROOT / "scenarios" / "quickstart.toml")]).output
    assert table.splitlines()[0].split()[:3] == ["variant", "peak", "MiB"]
    csv = CliRunner().invoke(cli, ["estimate", str(ROOT / "scenarios" / "quickstart.toml"), "--format", "csv"]).output
    assert csv.splitlines()[0].startswith("variant,peak GiB,")


def test_validate_ok_lists_variants():
    result = CliRunner().invoke(cli, ["validate", str(ROOT / "scenarios" / "quickstart.toml")])
    assert result.exit_code == 0
    assert result.output.endswith("quickstart.toml: ok (4 variants)\n")


def test_unknown_gpu_is_exit_2_with_catalogue():
    result = CliRunner().invoke(cli, ["estimate", str(ROOT / "scenarios" / "qlora-7b.toml"), "--gpu", "B200"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --gpu: unknown GPU 'B200' (allowed: T4, L4,")


def test_bad_headroom_is_exit_2():
    result = CliRunner().invoke(cli, ["fit", str(ROOT / "scenarios" / "qlora-7b.toml"), "--gpu", "T4",
                                      "--headroom", "150%"])
    assert result.exit_code == 2
    assert result.output == "error: --headroom: '150%' is not a fraction in [0, 1)\n"
