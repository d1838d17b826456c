"""Output safety: terminal text, CSV and sizes; the documented CI snippet under `bash -e`."""

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.textfmt import csv_cell, csv_text, parse_size, table, visible

ROOT = Path(__file__).resolve().parent.parent


def test_table_shows_control_characters_as_escapes():
    out = table(["variant", "GiB"], [["a\x1b[31mred\x1b[0m", "1.00"], ["two\nlines\t\x7f\u202eevil", None]])
    assert out.splitlines() == [
        "variant                     GiB",
        "--------------------------  ----",
        "a\\x1b[31mred\\x1b[0m         1.00",
        "two\\nlines\\t\\x7f\\u202eevil",
    ]
    assert visible("plain [peft.r=8] é 日本") == "plain [peft.r=8] é 日本"


def test_csv_cells_never_start_a_formula():
    out = csv_text(["variant", "peak GiB"], [["=1+2", "-1.50"], ["+cmd", "+3"], ["-x", "1e5"], ["@SUM(A1)", "-.5"],
                                             ["\tx", "12%"], ["-", "-"], ["a=b", None]])
    assert out.split("\n") == ["variant,peak GiB", "'=1+2,-1.50", "'+cmd,+3", "'-x,1e5", "'@SUM(A1),-.5",
                                "'\tx,12%", "-,-", "a=b,", ""]  # a lone "-" marks no value: no formula
    assert csv_cell("\rx") == "'\rx" and csv_cell(-1.5) == -1.5 and csv_cell("1e-3") == "1e-3"


@pytest.mark.parametrize("text,size", [("24GiB", 24 << 30), ("16 GB", 16 * 10**9), ("1024", 1024),
                                       ("1.1GB", 11 * 10**8), ("0.5KiB", 512), ("1.5GiB", 3 << 29), ("1", 1)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value,message", [
    ("0.5", "'0.5' is 0.5 bytes: a size must be at least 1 byte; e.g. 512MiB, 16GiB, 24GB"),
    ("0.4B", "'0.4B' is 0.4 bytes: a size must be at least 1 byte; e.g. 512MiB, 16GiB, 24GB"),
    ("0.0001KB", "'0.0001KB' is 0.1 bytes: a size must be at least 1 byte; e.g. 512MiB, 16GiB, 24GB"),
    ("2.5", "'2.5' is 2.5 bytes: a size must be a whole number of bytes; e.g. 512MiB, 16GiB, 24GB"),
    ("-1GiB", "'-1GiB' is not a size (e.g. 512MiB, 16GiB, 24GB)"),
    ("inf", "'inf' is not a size (e.g. 512MiB, 16GiB, 24GB)"),
    ("2TiB1", "'2TiB1' is not a size (e.g. 512MiB, 16GiB, 24GB)"),
])
def test_max_memory_must_be_a_whole_number_of_bytes(value, message):
    result = CliRunner().invoke(cli, ["run", str(ROOT / "scenarios" / "quickstart.toml"), "--max-memory", value,
                                      "--no-report", "--quiet"])
    assert result.exit_code == 2  # 0.5 was a 0-byte cap: every variant "out of memory"
    assert result.output == f"error: --max-memory: {message}\n"


def ci_snippet() -> str:
    """The GitHub Actions step of docs/ci.md that publishes the gate's table to the job summary."""
    text = (ROOT / "docs" / "ci.md").read_text()
    match = re.search(r"\n( +)- run: \|\n((?:\1  .*\n)+)", text[text.index("GITHUB_STEP_SUMMARY") - 600:])
    assert match and "GITHUB_STEP_SUMMARY" in match.group(2), "docs/ci.md: the summary step moved"
    return textwrap.dedent(match.group(2))


@pytest.mark.parametrize("shell", [["bash", "-e"], ["bash", "--noprofile", "--norc", "-eo", "pipefail"]])
@pytest.mark.parametrize("code", [0, 1, 2])
def test_documented_ci_step_keeps_the_gate_exit_code_and_publishes_the_table(tmp_path, shell, code):
    stub = tmp_path / "bin" / "peftprof"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "table for: $*"\nif [ "$STUB_RC" = 2 ]; then echo "error: bad" >&2; fi\n'
                    'exit "$STUB_RC"\n')
    stub.chmod(0o755)
    (tmp_path / "step.sh").write_text(ci_snippet())
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}", STUB_RC=str(code),
               GITHUB_STEP_SUMMARY=str(summary))
    run = subprocess.run([*shell, "step.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == code, run.stderr
    gate_output = ("table for: gate current.json --baseline memory-baseline.json --tolerance 2% --gpu A100-80GB "
                   "--format markdown\n")
    assert summary.read_text() == "earlier step\n" + gate_output
    assert run.stdout == gate_output  # the table is in the job log too, whatever the verdict
    assert run.stderr == ("error: bad\n" if code == 2 else "")


def test_plain_string_user_errors_escape_control_characters():
    from peftprof.errors import UserError

    assert UserError("reports/a\x1b[31mb.jsonl: no such file").lines() == ["reports/a\\u001b[31mb.jsonl: no such file"]
