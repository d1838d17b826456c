"""The report on data-parallel variants (issue 15): memory per rank, host memory under CPU offload, strategy and
world size as sweep axes, and "how many GPUs do I need" (fewest GPUs per catalogue memory size, and the plot)."""

import html as htmllib
import io
import json
import re

import pandas as pd
from click.testing import CliRunner
from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.report import render_csv, render_html, render_markdown
from peftprof.results import CATEGORIES

GIB = 1 << 30


def record(ws, strategy, est_gib, ranks_gib=None, offload=False, host_gib=0.0):
    """A record as estimate/__init__.py and run/distributed.py write them (world size 1: a single device)."""
    est = int(est_gib * GIB)
    ov = {"distributed.world_size": ws, "distributed.strategy": strategy}
    if offload:
        ov["distributed.cpu_offload"] = True
    r = {"variant": "big[" + ",".join(f"{k}={json.dumps(v)}" for k, v in ov.items()) + "]",
         "scenario": {"scenario": "big", "overrides": ov,
                      # at world size 1 the loader drops strategy as not applicable: the default remains
                      "distributed": {"world_size": ws, "strategy": strategy if ws > 1 else "ddp",
                                      "cpu_offload": offload}},
         "estimate": {"method": "analytic", "device": "cpu", "peak_bytes": est,
                      "breakdown": {c: est if c == "weights" else 0 for c in CATEGORIES}}}
    if ws > 1:
        host = int(host_gib * GIB)
        r["estimate"].update(host_bytes=host, distributed={"strategy": strategy, "world_size": ws, "rank": 0,
                                                           "cpu_offload": offload, "host_bytes": host})
    if ranks_gib:
        ranks = [{"rank": i, "peak_bytes": int(g * GIB), "breakdown": {"weights": int(g * GIB)},
                  "rss_peak_bytes": int((g + 1) * GIB)} for i, g in enumerate(ranks_gib)]
        top = max(ranks, key=lambda x: x["peak_bytes"])
        r.update(status="ok", measured={"peak_bytes": top["peak_bytes"], "breakdown": top["breakdown"],
                                        "peak_rank": top["rank"], "world_size": ws, "ranks": ranks})
    return r


def sweep():
    ddp = [record(ws, "ddp", 30) for ws in (1, 2, 4, 8)]
    # fsdp at 2 ranks: estimated 23.5 GiB, measured 24.5 on rank 0 (over a 24 GiB card) and 24.2 on rank 1
    fsdp = [record(1, "fsdp", 30), record(2, "fsdp", 23.5, ranks_gib=[24.5, 24.2]), record(4, "fsdp", 10),
            record(8, "fsdp", 6)]
    return ddp + fsdp + [record(4, "fsdp", 5, offload=True, host_gib=20)]


def table(html: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    t = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)[1]
    head = [htmllib.unescape(re.sub("<[^>]+>", "", h)) for h in re.findall(r"<th[^>]*>(.*?)</th>", t)]
    rows = [[htmllib.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", t.split("<tbody>")[1])]
    return head, rows


def figure(html: str, div_id: str) -> dict:
    return json.loads(re.search(rf'FIGS\["{div_id}"\]=(.*?);</script>', html, re.S)[1])


def test_fewest_gpus_per_memory_size_uses_the_measurement_where_there_is_one():
    html = render_html(sweep(), "t")
    head, rows = table(html, "fewest-gpus")
    assert head[:3] == ["strategy", "16 GiB (T4, V100-16GB)", "24 GiB (L4, A10G, RTX-3090, RTX-4090)"]
    assert head[3:] == ["32 GiB (V100-32GB)", "40 GiB (A100-40GB)", "48 GiB (L40S)", "80 GiB (A100-80GB, H100-80GB)",
                        "141 GiB (H200)"]
    assert rows == [
        ["ddp", "more than 8", "more than 8", "1", "1", "1", "1", "1"],  # 30 GiB per rank whatever the world size
        ["fsdp", "4", "4", "1", "1", "1", "1", "1"],  # 24 GiB: 2 ranks measured 24.5 GiB, so 4 (estimate alone: 2)
        ["fsdp + CPU offload", "4", "4", "4", "4", "4", "4", "4"],  # the only world size in the results
    ]


def test_a_failed_run_fits_nowhere_and_is_named_in_the_fewest_gpus_table():
    # fsdp at 2 ranks ran out of memory (its estimate, 20 GiB, would fit 24 GiB cards) and at 8 ranks failed;
    # at 4 ranks it ran, 13 GiB on its largest rank: the answer is 4 for every size from 16 GiB, never 2
    oom, ok, err = record(2, "fsdp", 20), record(4, "fsdp", 12, ranks_gib=[13, 12.5]), record(8, "fsdp", 3)
    oom.update(status="oom", measured=None)
    err.update(status="error", measured=None)
    _, rows = table(render_html([oom, ok, err], "t"), "fewest-gpus")
    assert rows == [["fsdp", *["4 (2: out of memory)"] * 7]]
    _, rows = table(render_html([oom, err], "t"), "fewest-gpus")
    assert rows == [["fsdp", *["more than 8 (2: out of memory, 8: error)"] * 7]]


def test_how_many_gpus_plot_has_a_line_per_strategy_and_the_gpu_memory_lines():
    html = render_html(sweep(), "t")
    fig = figure(html, "gpus")
    lines = {t["name"]: (t["x"], [round(y, 3) for y in t["y"]]) for t in fig["data"]}
    assert lines == {"ddp (estimated)": ([1, 2, 4, 8], [30, 30, 30, 30]),
                     "fsdp (estimated)": ([1, 2, 4, 8], [30, 23.5, 10, 6]),
                     "fsdp (measured, largest rank)": ([2], [24.5]),
                     "fsdp + CPU offload (estimated)": ([4], [5])}
    gpu_lines = sorted(s["y0"] for s in fig["layout"]["shapes"])
    assert gpu_lines == [16, 24, 32, 40, 48]  # GiB: the sizes up to twice the largest peak (30 GiB)
    assert "24 GiB: L4, A10G, RTX-3090, RTX-4090" in [a["text"] for a in fig["layout"]["annotations"]]
    # strategy and world size are sweep axes of the summary too
    head, _ = table(html, "summary")
    assert head[2:5] == ["distributed.world_size", "distributed.strategy", "distributed.cpu_offload"]


def test_memory_per_rank_table_with_host_memory():
    html = render_html(sweep(), "t")
    head, rows = table(html, "ranks")
    assert head == ["#", "variant", "strategy", "world size", "rank", "measured peak (GiB)", "estimated peak (GiB)",
                    "error (%)", "biggest category", "host, estimated (GiB)", "process RSS (GiB)"]
    by = {(r[1], r[4]): r for r in rows}
    name = 'big[distributed.world_size=2,distributed.strategy="fsdp"]'
    # the estimate is rank 0's: compared with rank 0 only; (23.5 - 24.5) / 24.5 = -4.08%
    assert by[(name, "0")][2:] == ["fsdp", "2", "0", "24.500", "23.500", "-4.08", "weights", "0.000", "25.500"]
    assert by[(name, "1")][2:] == ["fsdp", "2", "1", "24.200", "", "", "weights", "", "25.200"]
    offload = 'big[distributed.world_size=4,distributed.strategy="fsdp",distributed.cpu_offload=true]'
    assert by[(offload, "0 (estimate)")][2:] == ["fsdp + offload", "4", "0 (estimate)", "", "5.000", "", "weights",
                                                 "20.000", ""]
    assert len(rows) == 3 + 2 + 2 + 1  # ddp 2, 4, 8; fsdp 2 (two ranks), 4, 8; offload (world size 1: not listed)
    assert "up to 20.000 GiB per rank stay in host memory" in html


def test_markdown_and_csv_carry_ranks_and_host_memory():
    recs = sweep()
    md = render_markdown(recs)
    tables = [t for t in md.split("\n\n") if t.startswith("|")]
    assert len(tables) == 3 and md.endswith("(memory per rank, GiB)\n")
    rows = tables[2].splitlines()
    assert rows[0] == ("| variant | strategy | world size | rank | measured peak (GiB) | estimated peak (GiB) | "
                       "error (%) | biggest category | host, estimated (GiB) | process RSS (GiB) |")
    assert len(rows) == 2 + 8 and all(len(r.split(" | ")) == 10 for r in rows[2:])
    assert '| big[distributed.world_size=2,distributed.strategy="fsdp"] | fsdp | 2 | 1 | 24.200 | - |' in md
    df = pd.read_csv(io.StringIO(render_csv(recs)), keep_default_na=False)
    assert list(df["world_size"]) == [1, 2, 4, 8, 1, 2, 4, 8, 4]
    assert list(df["strategy"])[4:] == ["ddp", "fsdp", "fsdp", "fsdp", "fsdp"]
    assert df["est_host_bytes"].iloc[8] == str(20 * GIB)  # exact bytes, not 21474836480.0
    assert df["meas_rank_peak_bytes"].iloc[5] == f"{int(24.5 * GIB)} {int(24.2 * GIB)}"


def test_single_device_records_have_no_distributed_section():
    plain = [record(1, "ddp", 3)]
    assert "Per rank" not in render_html(plain, "t") and "fewest-gpus" not in render_html(plain, "t")
    assert "memory per rank" not in render_markdown(plain)
    columns = pd.read_csv(io.StringIO(render_csv(plain))).columns
    assert "world_size" not in columns and "est_host_bytes" not in columns and "strategy" not in columns


def test_wrong_types_in_distributed_fields_are_exit_2(tmp_path):
    bad = record(2, "fsdp", 23.5, ranks_gib=[24.5, 24.2])
    bad["measured"]["ranks"][1]["peak_bytes"] = float("nan")
    bad["measured"]["ranks"].append({"peak_bytes": 3})
    bad["estimate"]["distributed"]["host_bytes"] = -1
    bad["scenario"]["distributed"]["world_size"] = "2"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([bad, record(4, "fsdp", 10)]))
    result = CliRunner().invoke(cli, ["report", str(path), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    p = f"error: {path}: item 1: variant {bad['variant']}"
    assert result.output.splitlines() == [
        f"{p}: measured.ranks[2].peak_bytes: NaN is not a byte count (allowed: a whole number of bytes, a JSON "
        "integer from 0 to 2**60)",
        f'{p}: measured.ranks[3]: {{"peak_bytes": 3}} is not an object with a whole-number "rank"',
        f'{p}: scenario.distributed.world_size: "2" is not a whole number of ranks from 1',
        f"{p}: estimate.distributed.host_bytes: -1 is out of range (allowed: a whole number of bytes, a JSON integer "
        "from 0 to 2**60)"]
    assert not (tmp_path / "r.html").exists()


def test_real_estimates_of_a_distributed_sweep_render(tmp_path):
    """The contract with the estimator: `estimate --format json` of a [distributed] sweep makes the section."""
    (tmp_path / "d.toml").write_text('name = "d"\n' + TINY_MODEL + '[training]\nseq_len = 16\n[run]\ndevice = "cpu"\n'
                                     '[sweep]\n"distributed.world_size" = [1, 2, 4]\n'
                                     '"distributed.strategy" = ["ddp", "fsdp"]\n')
    result = CliRunner().invoke(cli, ["estimate", str(tmp_path / "d.toml"), "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recs = json.loads(result.stdout)
    html = render_html(recs, "t")
    _, rows = table(html, "fewest-gpus")
    assert [r[0] for r in rows] == ["ddp", "fsdp"] and {c for r in rows for c in r[1:]} == {"1"}  # a tiny model
    fig = figure(html, "gpus")
    fsdp = next(t for t in fig["data"] if t["name"] == "fsdp (estimated)")
    peaks = {r["scenario"]["overrides"]["distributed.world_size"]: r["estimate"]["peak_bytes"] for r in recs
             if r["scenario"]["overrides"]["distributed.strategy"] == "fsdp"}
    assert fsdp["x"] == [1, 2, 4] and fsdp["y"] == [peaks[ws] / (1 << 20) for ws in (1, 2, 4)]  # MiB


def test_the_section_draws_in_chromium(tmp_path):
    from test_report import CHROMIUM, CHROMIUM_ARGS, browser

    path = tmp_path / "d.html"
    path.write_text(render_html(sweep(), "distributed"))
    with browser() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_function("document.querySelector('#gpus svg.main-svg g.trace') !== null", timeout=20_000)
        ticks = page.evaluate("Array.from(document.querySelectorAll('#gpus .xtick text')).map(t => t.textContent)")
        assert ticks == ["1", "2", "4", "8"]  # the world sizes in the results, nothing between
        assert page.evaluate("document.querySelectorAll('#gpus g.trace.scatter').length") == 4
        assert problems == []
        b.close()
