"""Advice: the smallest single changes that make a variant fit, checked against the estimator directly."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from peftprof.advise import advise, advise_record, gpu_target, scenario_from_dict
from peftprof.catalog import gpu
from peftprof.cli import cli
from peftprof.estimate import estimate
from peftprof.report import render_html
from peftprof.scenario import load_scenario

BIG = '''name = "big"
[model]
preset = "llama-2-7b"
[precision]
weights = "bf16"
[peft]
method = "lora"
target_modules = "all-linear"
[training]
batch_size = 4
seq_len = 896
optimizer = "adamw"
'''


@pytest.fixture
def big(write_scenario):
    return load_scenario(write_scenario(BIG, "big.toml"))[0]


GPU = "A100-40GB"


def need(s):
    return estimate(s, device="cuda", gpu=gpu(GPU))["device_bytes"]


def changed(s, key, value, change):
    """The variant with an advised change applied, independently of peftprof.advise."""
    section, _, field = key.partition(".")
    if key == "peft.target_modules" and value == "default":
        value = None
    s = dataclasses.replace(s, **{section: dataclasses.replace(getattr(s, section), **{field: value})})
    if key == "training.batch_size":
        accum = int(change.rsplit("= ", 1)[1])
        s = dataclasses.replace(s, training=dataclasses.replace(s.training, grad_accum_steps=accum))
    return s


def test_every_change_fits_and_is_the_smallest_of_its_knob(big):
    target = gpu_target(gpu(GPU))
    a = advise(big, target)
    assert a["needed"] and a["need_bytes"] == need(big) > target.budget_bytes
    assert [c["key"] for c in a["changes"]] == ["peft.target_modules", "training.batch_size",
                                                "training.gradient_checkpointing", "training.seq_len"]
    for c in a["changes"]:
        new = changed(big, c["key"], c["value"], c["change"])
        assert need(new) == c["need_bytes"] <= target.budget_bytes, c
    knobs = {c["key"]: c for c in a["changes"]}
    assert knobs["training.batch_size"]["change"] == "training.batch_size = 2, training.grad_accum_steps = 2"
    ck = knobs["training.gradient_checkpointing"]
    assert ck["value"] == "every_2" and ck["speed_change_pct"] < 0  # recomputation costs FLOPs
    assert need(changed(big, ck["key"], "every_4", "")) > target.budget_bytes  # the next smaller step does not fit
    assert knobs["training.seq_len"]["value"] == 448
    assert need(changed(big, "training.seq_len", 896, "")) > target.budget_bytes  # the halving before it does not


def test_a_variant_that_fits_needs_no_advice(big):
    a = advise(big, gpu_target(gpu("H200")))
    assert not a["needed"] and a["changes"] == []


def test_scenario_round_trips_through_its_record(big):
    assert scenario_from_dict(json.loads(json.dumps(big.to_dict()))).settings_key() == big.settings_key()


def test_estimate_advise_prints_the_changes_that_fit(write_scenario):
    path = write_scenario(BIG, "big.toml")
    result = CliRunner().invoke(cli, ["estimate", str(path), "--gpu", GPU, "--advise"])
    assert result.exit_code == 0, result.output
    lines = result.output.split("\n\n", 1)[1].splitlines()
    assert lines[0] == f"big: needs {need(load_scenario(path)[0]) / 2**30:.2f} GiB of A100-40GB (40.00 GiB; advice " \
                       "keeps 5% free), changes that fit:"
    assert len(lines) == 5
    assert any(line.startswith("  training.gradient_checkpointing = ") for line in lines[1:])
    assert all(" GiB, speed " in line for line in lines[1:])
    out = CliRunner().invoke(cli, ["estimate", str(path), "--gpu", "L40S", "--advise", "--format", "json"]).output
    assert json.loads(out)[0]["advice"]["changes"]


def test_advise_needs_a_gpu_and_a_readable_format(write_scenario):
    path = write_scenario(BIG, "big.toml")
    result = CliRunner().invoke(cli, ["estimate", str(path), "--advise"])
    assert result.exit_code == 2
    assert result.output == ("error: --advise: give --gpu NAME, the GPU the variants must fit (see `peftprof "
                             "presets`)\n")
    result = CliRunner().invoke(cli, ["estimate", str(path), "--advise", "--gpu", "T4", "--format", "csv"])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_report_shows_advice_for_the_records_gpu_or_the_next_smaller_one(big):
    rec = {"variant": big.name, "scenario": big.to_dict(), "estimate": estimate(big, device="cuda", gpu=gpu(GPU))}
    a = advise_record(rec)
    assert a["target"] == GPU and len(a["changes"]) == 4
    html = render_html([rec], "t")
    assert "<table id='advice'>" in html and "training.gradient_checkpointing = " in html
    no_gpu = dict(rec, estimate=estimate(big, device="cuda"))
    a = advise_record(no_gpu)  # needs ~49 GiB: the largest catalogue GPU it does not fit is the 48 GiB L40S
    assert a["target"] == "L40S" and a["memory_bytes"] < a["need_bytes"]
    assert advise_record({"variant": "x", "scenario": {"bogus": 1}, "estimate": rec["estimate"]}) is None
