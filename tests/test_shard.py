"""Sharded sweeps (issue 15): `run --shard K/N` runs every N-th variant, and `report`/`gate` merge the shards'
result files into what one unsharded run writes. Also: two scenarios whose results file names collide."""

import copy
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.report import load_records
from peftprof.results import Located, merge_order, read_results_file, write_jsonl
from peftprof.run.session import parse_shard, shard_of
from peftprof.scenario import load_scenarios

SWEEP = 'name = "tiny"\n' + TINY_MODEL + '''[training]
batch_size = 1
seq_len = 16
[run]
device = "cpu"
warmup_steps = 1
[sweep]
"peft.r" = [2, 4, 8, 16, 32]
'''
RANKS = [2, 4, 8, 16, 32]
# What differs between two runs of one variant: wall-clock times, speeds and the process's RSS (which depends
# on what ran before it in the process), the run's time stamp. Everything else must be equal.
VARYING = {"provenance": ("time",), "measured": ("step_time_s", "step_times_s", "tokens_per_s", "rss_peak_bytes"),
           "checks": ("merged_latency_ms", "unmerged_latency_ms")}


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args), "--quiet", "--no-report", "--steps", "1"])


def comparable(rec: dict) -> dict:
    rec = copy.deepcopy(rec)
    for part, keys in VARYING.items():
        for k in keys:
            (rec.get(part) or {}).pop(k, None)
    return rec


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The sweep run whole into d0, and as shards 1/3, 2/3, 3/3 into d1, d2, d3."""
    d = tmp_path_factory.mktemp("shard")
    (d / "tiny.toml").write_text(SWEEP)
    result = run(d / "tiny.toml", "--out", d / "d0")
    assert result.exit_code == 0, result.output
    for k in (1, 2, 3):
        result = run(d / "tiny.toml", "--out", d / f"d{k}", "--shard", f"{k}/3")
        assert result.exit_code == 0, result.output
    return d


def test_each_shard_runs_every_third_variant(sharded):
    for k, ranks in ((1, [2, 16]), (2, [4, 32]), (3, [8])):  # positions k-1, k-1+3 of the expansion
        recs = read_results_file(sharded / f"d{k}" / "tiny.jsonl")
        assert [r["variant"] for r in recs] == [f"tiny[peft.r={r}]" for r in ranks]
        assert [r["variant_index"] for r in recs] == [RANKS.index(r) for r in ranks]
        assert all(r["status"] == "ok" for r in recs)


def test_merged_shards_equal_the_unsharded_run(sharded):
    whole = load_records([sharded / "d0"])
    merged = load_records([sharded / "d3", sharded / "d1", sharded / "d2"])  # any order of directories
    assert [r["variant"] for r in merged] == [f"tiny[peft.r={r}]" for r in RANKS]
    assert [comparable(r) for r in merged] == [comparable(r) for r in whole]
    # the merged report is the unsharded one, but for the measured speed column
    md = CliRunner().invoke(cli, ["report", *(str(sharded / f"d{k}") for k in (1, 2, 3)), "--format", "markdown",
                                  "-o", "-"])
    md0 = CliRunner().invoke(cli, ["report", str(sharded / "d0"), "--format", "markdown", "-o", "-"])
    assert md.exit_code == 0 and md0.exit_code == 0
    assert [row.rsplit("|", 2)[0] for row in md.stdout.splitlines()] == \
        [row.rsplit("|", 2)[0] for row in md0.stdout.splitlines()]


def test_gate_merges_shards_against_the_unsharded_run(sharded):
    shards = [str(sharded / f"d{k}") for k in (1, 2, 3)]
    base = str(sharded / "d0" / "tiny.jsonl")
    for metric in ("estimated", "measured"):  # the CPU tensor-level peak is exact, so the shards match to the byte
        result = CliRunner().invoke(cli, ["gate", *shards, "--baseline", base, "--metric", metric, "--exact",
                                          "--strict"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[-1] == "PASS: 0 regressed, 0 over budget, 0 improved, 0 added, 0 removed " \
                                                 "(tolerance 2%)"
    result = CliRunner().invoke(cli, ["gate", *shards[:2], "--baseline", base, "--strict"])  # a shard missing
    assert result.exit_code == 1 and "1 removed" in result.output


def test_resuming_over_older_results_renumbers_them(sharded, tmp_path):
    # results written before variant_index existed (32, 2), or numbered by an earlier sweep (8 was first), in
    # the file's own order: resuming reuses each measurement and stores its position in this sweep
    recs = {r["variant"]: r for r in read_results_file(sharded / "d0" / "tiny.jsonl")}
    older = []
    for rank, index in ((32, None), (2, None), (4, 1), (8, 0), (16, 3)):
        rec = copy.deepcopy(recs[f"tiny[peft.r={rank}]"])
        rec.pop("variant_index")
        older.append(rec if index is None else dict(rec, variant_index=index))
    write_jsonl(tmp_path / "tiny.jsonl", older)
    result = run(sharded / "tiny.toml", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    stored = {r["variant"]: r for r in read_results_file(tmp_path / "tiny.jsonl")}
    assert {v: r["variant_index"] for v, r in stored.items()} == {f"tiny[peft.r={r}]": RANKS.index(r) for r in RANKS}
    assert all(stored[v]["provenance"] == recs[v]["provenance"] for v in stored)  # reused, not measured again
    assert [r["variant"] for r in load_records([tmp_path])] == [f"tiny[peft.r={r}]" for r in RANKS]


def test_a_variant_in_two_inputs_is_an_error_naming_both(sharded):
    d0, d1 = sharded / "d0" / "tiny.jsonl", sharded / "d1" / "tiny.jsonl"
    hint = "; a variant comes from one input only: leave out the stale file"
    result = CliRunner().invoke(cli, ["report", str(sharded / "d0"), str(sharded / "d1"), "-o", "-"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {d1}: line 1: variant tiny[peft.r=2] appears more than once in the inputs (first at {d0}: line 1){hint}",
        f"error: {d1}: line 2: variant tiny[peft.r=16] appears more than once in the inputs (first at {d0}: line 4)"
        f"{hint}"]
    result = CliRunner().invoke(cli, ["gate", str(sharded / "d0"), str(sharded / "d1"), "--baseline", str(d0)])
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == (f"error: {d1}: line 1: variant tiny[peft.r=2] appears more than once in "
                                             f"CURRENT (first at {d0}: line 1){hint}")
    # the same file reached twice (given, and inside a given directory) is one input, not a duplicate
    result = CliRunner().invoke(cli, ["report", str(sharded / "d0"), str(d0), "--format", "csv", "-o", "-"])
    assert result.exit_code == 0 and result.stdout.count("tiny[peft.r=") == 5


@pytest.mark.parametrize("value,why", [
    ("0/3", '"0/3": K = 0 is not a shard of 1..3 (K counts from 1; '),
    ("4/3", '"4/3": K = 4 is not a shard of 1..3 (K counts from 1; '),
    ("1/0", '"1/0": N = 0 shards ('),
    ("2", '"2" is not K/N ('),
    ("a/b", '"a/b" is not K/N ('),
    ("-1/3", '"-1/3" is not K/N ('),
    ("1/3/4", '"1/3/4" is not K/N ('),
    ("1.0/3", '"1.0/3" is not K/N ('),
])
def test_bad_shards_exit_2_with_one_line(tmp_path, value, why):
    (tmp_path / "tiny.toml").write_text(SWEEP)
    result = run(tmp_path / "tiny.toml", "--out", tmp_path / "out", "--shard", value)
    assert result.exit_code == 2
    assert result.output == (f"error: --shard: {why}allowed: K/N with whole numbers 1 <= K <= N <= 100000, "
                             "e.g. 1/4 ... 4/4)\n")
    assert not (tmp_path / "out").exists()


def test_parse_shard_accepts_k_of_n():
    assert parse_shard("1/1") == (1, 1) and parse_shard(" 3/8 ") == (3, 8) and parse_shard("8/8") == (8, 8)


def test_a_shard_beyond_the_sweep_runs_nothing_and_passes(tmp_path):
    (tmp_path / "tiny.toml").write_text(SWEEP)
    result = run(tmp_path / "tiny.toml", "--out", tmp_path / "out", "--shard", "6/8")
    assert result.exit_code == 0
    assert result.stderr == "shard 6/8: no variants to run (the sweep has 5)\n"
    assert not (tmp_path / "out").exists()


def test_shards_cover_several_files_in_command_line_order(tmp_path):
    (tmp_path / "a.toml").write_text(SWEEP.replace('name = "tiny"', 'name = "a"'))
    (tmp_path / "b.toml").write_text(SWEEP.replace('name = "tiny"', 'name = "b"').replace("16, 32", "16"))
    variants = load_scenarios([tmp_path / "b.toml", tmp_path / "a.toml"])  # b's 4 variants, then a's 5
    names = [v.name for v in variants]
    shards = [[v.name for v in shard_of(variants, k, 4)] for k in (1, 2, 3, 4)]
    assert shards[0] == ["b[peft.r=2]", "a[peft.r=2]", "a[peft.r=32]"]
    assert shards[3] == ["b[peft.r=16]", "a[peft.r=16]"]
    assert sorted(sum(shards, [])) == sorted(names) and len(sum(shards, [])) == 9  # each variant exactly once


def loc(path: str, variant: str, index=None, scenario=None) -> Located:
    rec = {"variant": variant, "estimate": {"peak_bytes": 1, "breakdown": {}}}
    if scenario is not None:
        rec["scenario"] = {"scenario": scenario}
    if index is not None:
        rec["variant_index"] = index
    return Located(Path(path), "line 1", rec)


def test_merge_order_restores_one_run_s_order():
    # shard 1 holds only scenario b's results, shard 2 both: as one directory, a.jsonl is read before b.jsonl
    located = [loc("s1/b.jsonl", "b1", 1), loc("s2/a.jsonl", "a1", 1), loc("s2/a.jsonl", "a0", 0),
               loc("s2/b.jsonl", "b0", 0)]
    assert [x.record["variant"] for x in merge_order(located, True)] == ["a0", "a1", "b0", "b1"]
    # files named on the command line keep their order; records without an index keep their reading order
    located = [loc("est.json", "e1"), loc("est.json", "e0"), loc("run.jsonl", "r1", 1), loc("run.jsonl", "r0", 0)]
    assert [x.record["variant"] for x in merge_order(located, False)] == ["e1", "e0", "r0", "r1"]


def test_merge_order_keeps_the_scenarios_of_one_file_apart():
    # a baseline written by `gate --update` holds scenarios a and b in one file, each with indices 0 and 1:
    # sorting the file by variant_index alone interleaved them (a0 b0 a1 b1)
    located = [loc("base.json", f"{s}{i}", i, scenario=s) for s in "ab" for i in (0, 1)]
    assert [x.record["variant"] for x in merge_order(located, False)] == ["a0", "a1", "b0", "b1"]
    # within one scenario the indices still order the records, the scenarios in the order first met
    located = [loc("base.json", "b1", 1, "b"), loc("base.json", "a1", 1, "a"), loc("base.json", "b0", 0, "b"),
               loc("base.json", "a0", 0, "a")]
    assert [x.record["variant"] for x in merge_order(located, False)] == ["b0", "b1", "a0", "a1"]


CLASH = TINY_MODEL + '[training]\nseq_len = 16\n[run]\ndevice = "cpu"\n'


@pytest.mark.parametrize("first,second,where", [
    ("co b", "co_b", "{out}/co_b.jsonl"),
    ("Co", "co", "{out}/Co.jsonl and co.jsonl: one file where case is ignored"),
])
def test_scenarios_sharing_a_results_file_are_refused(tmp_path, first, second, where):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'name = "{first}"\n' + CLASH)
    b.write_text(f'name = "{second}"\n' + CLASH)
    out = tmp_path / "out"
    result = run(a, b, "--out", out)
    assert result.exit_code == 2  # was 0: both scenarios' records went into one file
    assert result.output == (f'error: {b}: name: scenario "{second}" and scenario "{first}" of {a} would write one '
                             f"results file ({where.format(out=out)}) (allowed: names that differ in a letter beyond "
                             "case, a digit, '-', '_' or '.'; every other character becomes '_')\n")
    assert list(out.iterdir()) == []  # nothing trained, nothing written
