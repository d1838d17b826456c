"""Report size and load time: a 100-variant report in headless Chromium (targets: < 5 MB, load < 1 s).

Every variant carries a memory timeline and its peak's tensors, as `estimate --method trace --report` and
`peftprof run` records do: each is a tiny model's traced timeline scaled to the variant's peak (a timeline
holds at most 240 moments and 20 tensors whatever the model, so its size is that of an 8B model's).

    .venv/bin/python benchmarks/report_load.py      # writes benchmarks/results/report_load.md
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def traced_timeline(tmp: Path) -> dict:
    from peftprof.scenario import load_scenario
    from peftprof.trace import trace_peak

    (tmp / "tiny.toml").write_text('[model]\npreset = "tiny-llama"\n[training]\nbatch_size = 2\nseq_len = 128\n')
    out = trace_peak(load_scenario(tmp / "tiny.toml")[0])
    return {"timeline": out["timeline"], "at_peak": out["at_peak"]}


def scaled(tl: dict, k: float) -> dict:
    """The timeline with every byte count multiplied by k (event numbers kept)."""
    t = copy.deepcopy(tl)
    t["timeline"]["bytes"] = {c: [int(b * k) for b in v] for c, v in t["timeline"]["bytes"].items()}
    t["timeline"]["peak"]["bytes"] = int(t["timeline"]["peak"]["bytes"] * k)
    ap = t["at_peak"]
    ap["live_bytes"] = int(ap["live_bytes"] * k)
    for rows in (ap["top_tensors"], ap["by_module"], ap["by_layer"]):
        for row in rows:
            row["bytes"] = int(row["bytes"] * k)
    return t


def main() -> int:
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp())
    (tmp / "hundred.toml").write_text('[model]\npreset = "llama-3-8b"\n[sweep]\n"peft.r" = [1,2,4,8,16,32,64,128,256,512]\n'
                                      '"training.seq_len" = [128,256,512,1024,2048,3072,4096,5120,6144,8192]\n')
    est = subprocess.run([sys.executable, "-m", "peftprof.cli", "estimate", str(tmp / "hundred.toml"), "--format", "json"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    records = json.loads(est)
    tl = traced_timeline(tmp)
    for r in records:
        r["estimate"].update(scaled(tl, r["estimate"]["peak_bytes"] / tl["timeline"]["peak"]["bytes"]))
    (tmp / "est.json").write_text(json.dumps(records))
    from peftprof.report import write_report

    t = time.perf_counter()
    html = write_report([tmp / "est.json"], tmp / "r.html")
    write_s = time.perf_counter() - t
    size = html.stat().st_size
    loads, drawn = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for _ in range(5):
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(html.as_uri(), wait_until="load")
            loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            page.wait_for_function("Array.from(document.querySelectorAll('.plot'))"
                                   ".every(d => d.querySelector('svg.main-svg'))")
            drawn.append(page.evaluate("performance.now()"))
            assert page.evaluate("document.querySelectorAll('#top-tensors tbody tr').length") == 20
            page.close()
        browser.close()
    lines = [f"# Report size and load time ({datetime.now(timezone.utc):%Y-%m-%d})", "",
             "`benchmarks/report_load.py`: a 100-variant estimate report in headless Chromium "
             f"({Path('/usr/bin/chromium').name}), median of 5 loads; every variant has a memory timeline "
             "(at most 240 moments) and its peak's 20 largest tensors, by module and by layer.", "",
             f"- size: {size / 2**20:.2f} MiB (target < 5 MB)",
             f"- written in {write_s:.2f} s",
             f"- load event: {statistics.median(loads):.0f} ms (target < 1000 ms)",
             f"- every plot drawn: {statistics.median(drawn):.0f} ms (plots below the first screen are drawn "
             "as they come into view and all of them right after the load event)"]
    out = ROOT / "benchmarks" / "results" / "report_load.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
