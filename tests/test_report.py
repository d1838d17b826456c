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
    for section in ["Summary", "Timeline: memory through the step", "What to change", "Memory breakdown",
                    "Estimate against measurement", "Sweeps", "Memory per phase", "PEFT checks", "Provenance"]:
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
    link = copy.deepcopy(recs[1])
    link["variant"] = '<a href="https://evil.example">click</a>'  # plotly would draw it as a live link
    link["scenario"]["scenario"] = link["variant"]
    return recs + [evil, link]


def test_user_strings_are_escaped(results):
    html = render_html(evil_records(results), "t<script>")
    assert "<script>alert(" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    # inside figure JSON: as text for plotly's pseudo-HTML (it decodes &lt; back to <)
    assert "&lt;script&gt;alert('x')&lt;\\u002fscript&gt;" in html


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
            page = b.new_page(viewport={"width": 1400, "height": 900})
            problems, requests = [], []
            page.on("console", lambda m, out=problems: out.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e, out=problems: out.append(str(e)))
            page.on("dialog", lambda d, out=problems: (out.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r, out=requests: out.append(r.url)
                    if not r.url.startswith(("file:", "data:")) else None)
            page.goto(page_path.as_uri(), wait_until="load")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.plot')).every(d => d.querySelector('svg.main-svg'))",
                timeout=20_000)
            n_plots = page.evaluate("document.querySelectorAll('.plot').length")
            drawn = page.evaluate("Array.from(document.querySelectorAll('.plot'))"
                                  ".filter(d => d.querySelectorAll('svg.main-svg g.trace').length > 0).length")
            # timeline, overlaid timelines, breakdown, scatter, one sweep axis, memory per phase
            assert n_plots == 6 and drawn == n_plots
            # the timeline: stacked categories and the peak marker, at the variant's measured peak
            first = json.loads(Path(results).read_text().splitlines()[0])["measured"]
            texts = page.evaluate("Array.from(document.querySelectorAll('#tl-plot text')).map(t => t.textContent)")
            assert f"peak {first['peak_bytes'] / 2**20:,.3f} MiB" in texts
            assert {"weights", "activations", "logits", "forward", "backward", "optimizer"} <= set(texts)
            rows = page.evaluate("Array.from(document.querySelectorAll('#top-tensors tbody tr'))"
                                 ".map(r => Array.from(r.cells).map(c => c.textContent))")
            assert len(rows) == 20 and ["0.244", "weights", "[1000, 64]", "float32", "lm_head", "setup"] in rows
            assert page.evaluate("document.querySelectorAll('#by-layer tbody tr').length") == 3
            page.select_option("#tl-variant", "1")  # another variant: the tables follow
            assert page.evaluate("document.getElementById('tl-peak').textContent").startswith(
                f"Peak {json.loads(Path(results).read_text().splitlines()[1])['measured']['peak_bytes'] / 2**20:,.3f}")
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            assert page.evaluate("document.querySelectorAll('.plot svg a').length") == 0  # names are text
            if page_path == evil:
                assert page.evaluate("Array.from(document.querySelectorAll('.plot svg text'))"
                                     ".some(t => t.textContent.includes('<a href='))")  # shown as written
            assert problems == [] and requests == []
            page.close()
        b.close()


# --- bad input: wrong types, output paths, corrupt lines ---

def report(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


def result_lines(results):
    return Path(results).read_text().splitlines()


def test_wrong_field_types_are_exit_2_naming_file_line_and_field(results, tmp_path):
    rec = json.loads(result_lines(results)[0])
    rec["measured"]["peak_bytes"] = "big"
    rec["measured"]["tokens_per_s"] = [1]
    rec["measured"]["phases"] = [{"phase": 1, "bytes": 3}, {"phase": "forward", "bytes": -3}]
    rec["scenario"]["description"] = ["x"]
    rec["checks"] = "none"
    rec["error"] = "boom"
    path = tmp_path / "bad.jsonl"
    path.write_text(result_lines(results)[1] + "\n" + json.dumps(rec) + "\n")
    result = report(path, "-o", tmp_path / "r.html")
    assert result.exit_code == 2  # was 1: a traceback
    p = f"error: {path}: line 2: variant tiny[peft.r=2]"
    assert result.output.splitlines() == [
        f"{p}: error: \"boom\" is not an object",
        f"{p}: scenario.description: [\"x\"] is not a string",
        f"{p}: measured.peak_bytes: \"big\" is not a byte count (allowed: a whole number of bytes, a JSON integer "
        "from 0 to 2**60)",
        f"{p}: measured.tokens_per_s: [1] is not a number",
        f"{p}: checks: \"none\" is not an object",
        f"{p}: measured.phases[1]: {{\"phase\": 1, \"bytes\": 3}} is not an object with a \"phase\" string",
        f"{p}: measured.phases[2].bytes: -3 is out of range (allowed: a whole number of bytes, a JSON integer from 0 "
        "to 2**60)",
    ]
    assert not (tmp_path / "r.html").exists()


def test_output_onto_a_directory_or_an_unwritable_path_is_exit_2(estimates, tmp_path):
    result = report(estimates, "-o", tmp_path)
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path}: is a directory; give the report a file name, e.g. -o "
                             f"{tmp_path / 'report.html'}\n")
    (tmp_path / "file").write_text("x")
    result = report(estimates, "-o", tmp_path / "file" / "r.html")  # a file where a directory should be
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path / 'file' / 'r.html'}: cannot write the report: ")
    assert result.output.count("\n") == 1
    result = report(estimates, "-o", "/sys/peftprof-report.html")  # read-only, even for root
    assert result.exit_code == 2
    assert result.output in ("error: /sys/peftprof-report.html: cannot write the report: Permission denied\n",
                             "error: /sys/peftprof-report.html: cannot write the report: Read-only file system\n")


def test_output_that_is_an_input_is_refused(estimates, tmp_path, monkeypatch):
    keep = tmp_path / "keep.json"
    keep.write_text(Path(estimates).read_text())
    before = keep.read_text()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(keep)
    monkeypatch.chdir(tmp_path)
    for out in ("keep.json", str(keep), "sub/../keep.json", "link.json", str(tmp_path / "link.json")):
        result = report("keep.json", "-o", out, "--format", "markdown")
        assert result.exit_code == 2, out
        assert result.output == (f"error: {out}: is the input keep.json; writing the report there would overwrite "
                                 "it (give another -o)\n")
    result = report(tmp_path, "-o", "keep.json")  # an input found inside a directory
    assert result.exit_code == 2 and "is the input" in result.output
    assert keep.read_text() == before


def test_corrupt_lines_are_skipped_named_and_left_in_place(results, tmp_path):
    good = result_lines(results)
    path = tmp_path / "run.jsonl"
    content = good[0] + "\n" + '{"variant": "tiny' + "\n[1, 2]\n" + good[1] + "\n"  # a line cut short
    path.write_text(content)
    result = report(path, "-o", tmp_path / "r.md", "--format", "markdown")
    assert result.exit_code == 0  # was 2: one bad line blocked the whole report
    assert result.stderr.splitlines() == [
        f"warning: {path}: line 2: not valid JSON (Unterminated string starting at: line 1 column 13 (char 12)); "
        "skipped (the file is left as it is)",
        f"warning: {path}: line 3: not a result object; skipped (the file is left as it is)"]
    md = (tmp_path / "r.md").read_text()
    assert "| tiny[peft.r=2] | ok |" in md and "| tiny[peft.r=8] | ok |" in md
    assert path.read_text() == content
    path.write_text("garbage\n")
    result = report(path, "-o", tmp_path / "r2.md")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"error: {path}: no results to report"


def test_salvaging_reader_moves_bad_lines_aside(results, tmp_path):
    from peftprof.results import read_results_salvaging

    good = result_lines(results)
    path = tmp_path / "run.jsonl"
    bad1, bad2 = good[1][:40].encode(), b"\xff\xfe not utf-8"
    path.write_bytes(good[0].encode() + b"\n" + bad1 + b"\n\n" + bad2 + b"\n" + good[1].encode() + b"\n")
    records, side = read_results_salvaging(path)
    assert [r["variant"] for r in records] == ["tiny[peft.r=2]", "tiny[peft.r=8]"]
    assert side.parent == tmp_path and re.fullmatch(r"run\.jsonl\.bad-\d{8}T\d{6}Z", side.name)
    assert side.read_bytes() == bad1 + b"\n" + bad2 + b"\n"
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    again, side2 = read_results_salvaging(path)
    assert side2 is None and [r["variant"] for r in again] == ["tiny[peft.r=2]", "tiny[peft.r=8]"]
    assert read_results_salvaging(tmp_path / "none.jsonl") == ([], None)
    path.write_text("x\n")
    path.chmod(0o644)
    _, side3 = read_results_salvaging(path)
    assert side3 != side and side3.read_text() == "x\n" and path.read_text() == ""


# --- output injection: plotly pseudo-HTML, markdown rows, CSV formulas ---

LINK = '<a href="https://evil.example">click</a>'


def named(estimates, *names):
    recs = json.loads(Path(estimates).read_text())
    out = []
    for i, name in enumerate(names):
        r = copy.deepcopy(recs[i % 2])
        r["variant"] = name
        out.append(r)
    return out


def test_names_reach_plotly_as_text(estimates):
    html = render_html(named(estimates, LINK, "b&lt;"), "t")
    specs = "".join(re.findall(r"FIGS\[[^\]]*\]=(.*?);</script>", html))
    assert "\\u003ca href" not in specs and "<a href" not in specs  # plotly would draw a live link
    assert "&lt;a href=\\\"https:\\u002f\\u002fevil.example\\\"&gt;click&lt;\\u002fa&gt;" in specs
    assert "b&amp;lt;" in specs  # a literal "&lt;" in a name stays "&lt;" on screen


def test_markdown_report_names_cannot_add_rows(estimates):
    md = render_markdown(named(estimates, "a\n| fake | ok | 0 | 0 | 0 | 0 |", "b|c"))
    rows = [r for r in md.splitlines() if r.startswith("|")]
    assert len(rows) == 8  # two tables: header, rule, two variants each
    assert rows[2].startswith("| a \\| fake \\| ok \\| 0 \\| 0 \\| 0 \\| 0 \\| | estimate |")
    assert rows[3].startswith("| b\\|c | estimate |")


def test_csv_report_cells_are_not_formulas(estimates, tmp_path):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(named(estimates, "=HYPERLINK(\"https://evil.example\")", "-2+3", "@SUM(A1)",
                                     "\tx", "-1.5", "plain")))
    result = report(path, "--format", "csv", "-o", "-")
    assert result.exit_code == 0
    df = pd.read_csv(io.StringIO(result.stdout), keep_default_na=False, dtype=str)
    assert list(df["variant"]) == ["'=HYPERLINK(\"https://evil.example\")", "'-2+3", "'@SUM(A1)", "'\tx", "-1.5",
                                   "plain"]


# --- the explaining parts: verdict, readable tables, timeline input checks, estimate --report ---

def test_summary_reads_first_with_units_axes_and_formatted_numbers(results, tmp_path):
    html = write_report([results], tmp_path / "r.html").read_text()
    assert html.index("<ul class='verdict'>") < html.index('id="summary"') < html.index("id='tl-plot'")
    assert "2 variants: 2 measured, 0 estimated only." in html
    assert "its biggest category is <b>weights</b>" in html
    head = re.search(r'<table id="summary"><thead><tr>(.*?)</tr>', html)[1]
    assert [re.sub("<[^>]+>", "", h) for h in head.split("</th>")[:6]] == [
        "#", "variant", "peft.r", "status", "estimated peak (MiB)", "measured peak (MiB)"]
    tables = "".join(re.findall(r"<table.*?</table>", html))
    assert not re.search(r"\d\.\d{4,}", tables)  # 3 decimals at most: no 1.0728836059570312e-06
    assert re.search(r"<td>\d\.\d\de-0\d</td>", tables)  # the merge check's max |diff|, to 3 digits
    assert "quantization rel. error" in tables and "unmerged forward (ms)" in tables


def test_a_malformed_timeline_is_bad_input(results, tmp_path):
    rec = json.loads(result_lines(results)[0])
    rec["measured"]["timeline"]["bytes"]["weights"] = "many"
    rec["measured"]["at_peak"]["top_tensors"][0]["bytes"] = -1
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    result = report(path, "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    p = f"error: {path}: line 1: variant tiny[peft.r=2]"
    assert result.output.splitlines() == [f"{p}: measured.timeline: bytes.weights: not a list of "
                                          f"{len(rec['measured']['timeline']['x'])} byte counts",
                                          f"{p}: measured.at_peak: top_tensors[1]: not an object with a byte count"]


def test_estimate_method_trace_report_has_the_timeline(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "trace.html"
    result = CliRunner().invoke(cli, ["estimate", str(tmp_path / "tiny.toml"), "--method", "trace", "--report",
                                      str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == f"report: {out}"
    records = json.loads(result.stdout)
    tl = json.loads(re.search(r"<script>var TL=(.*?);</script>", out.read_text())[1])
    assert [v["src"] for v in tl["v"]] == ["estimated (trace)", "estimated (trace)"]
    assert [v["pk"][1] for v in tl["v"]] == [r["estimate"]["peak_bytes"] for r in records]  # device cpu: no overhead
    assert len(tl["v"][0]["top"]) == 20
    result = CliRunner().invoke(cli, ["estimate", str(tmp_path / "tiny.toml"), "--report", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_markdown_and_csv_show_small_peaks_in_readable_units(results):
    recs = [json.loads(line) for line in result_lines(results)]
    md = render_markdown(recs)
    lines = md.splitlines()
    assert lines[0] == "| variant | status | estimated MiB | measured MiB | error % | tokens/s |"  # was GiB: 0.00
    est, meas = recs[0]["estimate"]["peak_bytes"], recs[0]["measured"]["peak_bytes"]
    assert lines[2].startswith(f"| tiny[peft.r=2] | ok | {est / 2**20:,.2f} | {meas / 2**20:,.2f} |")
    assert f"{est / 2**20:,.2f}" != "0.00" and md.endswith("(estimated breakdown, MiB)\n")
    weights = recs[0]["estimate"]["breakdown"]["weights"]
    assert lines[7].startswith(f"| tiny[peft.r=2] | {weights / 2**20:,.2f} |")
    big = copy.deepcopy(recs[0])
    big["estimate"]["peak_bytes"] = big["measured"]["peak_bytes"] = 3 << 30
    assert render_markdown([big]).splitlines()[0].startswith("| variant | status | estimated GiB | measured GiB |")
    out = CliRunner().invoke(cli, ["report", str(results), "--format", "csv", "-o", "-"]).output
    df = pd.read_csv(io.StringIO(out))
    assert list(df["estimated_peak_bytes"]) == [r["estimate"]["peak_bytes"] for r in recs]  # exact bytes
    assert list(df["measured_peak_bytes"]) == [r["measured"]["peak_bytes"] for r in recs]


def test_an_estimate_and_a_run_of_one_variant_are_reported_together(results, estimates, tmp_path):
    # `report` takes "runner results and/or estimate JSON": one variant in both is two rows, as before sharding
    result = report(results, estimates, "-o", tmp_path / "r.md", "--format", "markdown")
    assert result.exit_code == 0, result.output
    rows = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| tiny[peft.r=2] |")]
    assert [row.split(" | ")[1] for row in rows[:2]] == ["ok", "estimate"]  # the summary, then the breakdown
    # two runner results (or two estimates) of one variant are still an error
    twin = tmp_path / "again.json"
    twin.write_text(estimates.read_text())
    result = report(estimates, twin, "-o", tmp_path / "r2.md")
    assert result.exit_code == 2 and "variant tiny[peft.r=2] appears more than once in the inputs" in result.output


@pytest.mark.parametrize("index", ["5", "-1", "true", "1.5"])
def test_a_malformed_variant_index_is_warned_about_and_read_as_absent(results, tmp_path, index):
    lines = result_lines(results)
    recs = [json.loads(line) for line in lines]
    recs[0]["variant_index"] = json.loads(index)  # r=2 first, r=8 at index 1 after it
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = report(path, "-o", tmp_path / "r.md", "--format", "markdown")
    assert result.exit_code == 0, result.output
    warning = (f"warning: {path}: line 1: variant tiny[peft.r=2]: variant_index: {index} is not a position in the "
               "sweep (allowed: a whole number from 0); ordered as if absent")
    assert result.stderr.splitlines() == ([] if index == "5" else [warning])
    md = (tmp_path / "r.md").read_text()
    # r=8 (index 1) first: a valid 5 comes after it, and so does a record without a usable index (-1 would not)
    assert md.index("| tiny[peft.r=8] |") < md.index("| tiny[peft.r=2] |")
