"""The reporter: one self-contained HTML file, escaped user strings, markdown and CSV, checked in Chromium."""

import copy
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.report import plotly_js, render_html, render_markdown, write_report
from peftprof.run.session import run_scenarios
from peftprof.scenario import load_scenario

TINY = 'name = "tiny"\ndescription = "two LoRA ranks"\n' + TINY_MODEL + '''[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
[sweep]
"peft.r" = [2, 8]
'''
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PLOTLY_BANNER = "plotly.js (basic - minified) v4.1.1"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "tiny.toml").write_text(TINY)
    records, files, _ = run_scenarios(load_scenario(d / "tiny.toml"), out_dir=d, device="cpu", progress=False)
    assert [r["status"] for r in records] == ["ok", "ok"]
    return files[0]


@pytest.fixture(scope="module")
def estimates(tmp_path_factory):
    d = tmp_path_factory.mktemp("est")
    (d / "tiny.toml").write_text(TINY)
    out = CliRunner().invoke(cli, ["estimate", str(d / "tiny.toml"), "--format", "json", "--gpu", "T4"]).output
    (d / "est.json").write_text(out)
    return d / "est.json"


def test_html_is_self_contained_with_plotly_once(results, tmp_path):
    html = write_report([results], tmp_path / "r.html").read_text()
    assert html.count(PLOTLY_BANNER) == 1
    ours = html.replace(plotly_js(), "")  # the page without the inlined library
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link[\s>]|https?://", ours)
    for section in ["Summary", "Memory breakdown", "Estimate against measurement", "Sweeps", "Timeline",
                    "PEFT checks", "Provenance"]:
        assert section in html
    assert "tiny[peft.r=2]" in html and "two LoRA ranks" in html


def test_estimates_alone_make_a_report_saying_not_measured(estimates, tmp_path):
    html = write_report([estimates], tmp_path / "e.html").read_text()
    assert "not measured" in html
    assert "estimates only (not measured)" in html


def evil_records(results):
    recs = [json.loads(line) for line in Path(results).read_text().splitlines()]
    evil = copy.deepcopy(recs[0])
    evil["variant"] = "<script>alert('x')</script>"
    evil["scenario"]["description"] = "<img src=x onerror=alert('y')>"
    evil["status"] = "error"
    evil["error"] = {"phase": "<b>forward</b>", "message": "</script><script>alert('z')</script>"}
    return recs + [evil]


def test_user_strings_are_escaped(results):
    html = render_html(evil_records(results), "t<script>")
    assert "<script>alert(" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "\\u003cscript\\u003ealert" in html  # inside figure JSON


def test_markdown_is_two_tables(results):
    md = render_markdown(evil_records(results))
    tables = [t for t in md.split("\n\n") if t.startswith("|")]
    assert len(tables) == 2
    for t in tables:
        rows = [r for r in t.splitlines() if r.startswith("|")]
        width = len(rows[0].replace("\\|", "").split("|"))
        assert all(len(r.replace("\\|", "").split("|")) == width for r in rows)
    assert "| tiny[peft.r=2] | ok |" in md


def test_csv_is_one_row_per_variant(results):
    out = CliRunner().invoke(cli, ["report", str(results), "--format", "csv", "-o", "-"]).output
    df = pd.read_csv(io.StringIO(out))
    assert list(df["variant"]) == ["tiny[peft.r=2]", "tiny[peft.r=8]"]
    assert (df["est_weights_bytes"] > 0).all() and (df["meas_weights_bytes"] > 0).all()


def test_report_command_errors_are_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and result.output == f"error: {tmp_path / 'missing.jsonl'}: no such file\n"


def test_hundred_variants_stay_under_5_mb(estimates, tmp_path):
    recs = json.loads(Path(estimates).read_text())
    many = []
    for i in range(100):
        r = copy.deepcopy(recs[i % 2])
        r["variant"] = f"v{i}"
        many.append(r)
    html = render_html(many, "hundred")
    assert len(html.encode()) < 5 * 1024 * 1024


def browser():
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), \
        "Debian's chromium is needed for the browser test: apt-get install chromium (.ci/run does this)"
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_report_renders_in_chromium_without_errors(results, tmp_path):
    path = write_report([results], tmp_path / "r.html")
    evil = tmp_path / "evil.html"
    evil.write_text(render_html(evil_records(results), "<script>alert(1)</script>"))
    with browser() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for page_path in (path, evil):
            page = b.new_page(viewport={"width": 1300, "height": 900})
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.plot')).every(d => d.querySelector('svg.main-svg'))",
                timeout=20_000)
            n_plots = page.evaluate("document.querySelectorAll('.plot').length")
            drawn = page.evaluate("Array.from(document.querySelectorAll('.plot'))"
                                  ".filter(d => d.querySelectorAll('svg.main-svg g.trace').length > 0).length")
            assert n_plots == 4 and drawn == n_plots  # breakdown, scatter, one sweep axis, timeline
            assert problems == [] and requests == []
            page.close()
        b.close()
