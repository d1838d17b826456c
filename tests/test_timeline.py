"""The memory timeline and the peak's attribution (peftprof/timeline.py), measured and traced."""

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODEL

from peftprof.results import CATEGORIES
from peftprof.run.runner import run_variant
from peftprof.scenario import load_scenario
from peftprof.timeline import at_peak, timeline, timeline_problem
from peftprof.trace import trace_peak

TINY = 'name = "tl"\n' + TINY_MODEL + '''[peft]
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
'''


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    d = tmp_path_factory.mktemp("tl")
    (d / "tl.toml").write_text(TINY)
    return load_scenario(d / "tl.toml")[0]


@pytest.fixture(scope="module")
def measured(variant, tmp_path_factory):
    rec = run_variant(variant, device="cpu", snapshot_path=tmp_path_factory.mktemp("snap") / "step.pickle")
    assert rec["status"] == "ok", rec["error"]
    return rec["measured"]


@pytest.fixture(scope="module")
def traced(variant):
    return trace_peak(variant)


def totals(tl):
    return [sum(series[i] for series in tl["bytes"].values()) for i in range(len(tl["x"]))]


@pytest.mark.parametrize("which", ["measured", "traced"])
def test_timeline_peak_is_the_variants_peak_with_its_breakdown(which, measured, traced):
    m = {"measured": measured, "traced": traced}[which]
    tl = m["timeline"]
    assert timeline_problem(tl) is None
    assert max(totals(tl)) == m["peak_bytes"] == tl["peak"]["bytes"]
    at = tl["x"].index(tl["peak"]["x"])
    assert {c: v[at] for c, v in tl["bytes"].items() if v[at]} == {c: b for c, b in m["breakdown"].items() if b}
    assert tl["peak"]["phase"] == m["peak_phase"]
    assert [p["phase"] for p in tl["phases"]] == ["forward", "backward", "optimizer"]
    assert len(tl["x"]) <= 240 + 2 * 4 + 2 < tl["n_events"]  # downsampled: buckets, phase edges, the peak


@pytest.mark.parametrize("which", ["measured", "traced"])
def test_top_tensors_sum_to_no_more_than_the_peak_and_layers_to_all_of_it(which, measured, traced):
    ap = {"measured": measured, "traced": traced}[which]["at_peak"]
    peak = {"measured": measured, "traced": traced}[which]["peak_bytes"]
    assert ap["live_bytes"] == peak
    top = ap["top_tensors"]
    assert len(top) == 20 and sum(t["bytes"] for t in top) <= peak
    assert [t["bytes"] for t in top] == sorted((t["bytes"] for t in top), reverse=True)
    assert sum(g["bytes"] for g in ap["by_layer"]) == peak  # every live tensor is in one layer group
    assert sum(g["bytes"] for g in ap["by_module"]) <= peak
    for g in ap["by_layer"]:
        assert sum(g["by_category"].values()) == g["bytes"]


def test_tensors_are_attributed_to_the_module_that_created_them(measured):
    top = measured["at_peak"]["top_tensors"]
    # tiny llama: vocab 1000, hidden 64, batch 2 x seq 16 tokens
    assert {"bytes": 256000, "category": "weights", "shape": [1000, 64], "dtype": "float32",
            "module": "lm_head", "layer": None, "allocated_in": "setup"} in top
    assert any(t["category"] == "logits" and t["module"] == "lm_head" and t["shape"] == [32, 1000] for t in top)
    mlp = [t for t in top if t["category"] == "activations" and t["module"] == "model.layers.1.mlp.up_proj"]
    assert mlp and mlp[0]["layer"] == "1" and mlp[0]["shape"] == [32, 160]
    layers = {g["layer"] for g in measured["at_peak"]["by_layer"]}
    assert layers == {"0", "1", None}


def test_tracking_leaves_no_module_hooks_behind(measured):
    from torch.nn.modules import module

    assert not module._global_forward_hooks and not module._global_forward_pre_hooks


def fake_tracker(n, seed):
    """Random allocations and frees in the step's phases, with categories, as MemoryTracker holds them."""
    rng = random.Random(seed)
    allocs, events, live, roles, phases = {}, [], [], {}, []
    for uid in range(5):  # registered before the step
        allocs[uid] = SimpleNamespace(nbytes=rng.randrange(1, 10**6), phase="setup", freed_phase=None, where=None,
                                      shape=None, dtype=None)
        roles[uid] = "weights"
        events.append((uid, 1))
        phases.append("setup")
    uid = 5
    for i in range(n):
        phase = ("forward", "backward", "optimizer", "steady")[min(3, 4 * i // n)]
        if live and rng.random() < 0.45:
            u = live.pop(rng.randrange(len(live)))
            events.append((u, -1))
        else:
            allocs[uid] = SimpleNamespace(nbytes=rng.randrange(0, 10**6), phase=phase, freed_phase=None,
                                          where=None, shape=None, dtype=None)
            roles[uid] = rng.choice(CATEGORIES)
            events.append((uid, 1))
            live.append(uid)
            uid += 1
        phases.append(phase)
    return SimpleNamespace(allocs=allocs, events=events, roles=roles, _event_phases=lambda: phases)


@pytest.mark.parametrize("seed", range(5))
def test_downsampling_keeps_the_exact_peak(seed):
    tr = fake_tracker(20_000, seed)
    total, best, phases = 0, 0, tr._event_phases()
    for (uid, sign), phase in zip(tr.events, phases, strict=True):
        total += tr.allocs[uid].nbytes * sign
        if phase in ("forward", "backward", "optimizer"):
            best = max(best, total)
    tl = timeline(tr, n_points=50)
    assert len(tl["x"]) <= 50 + 8 + 2
    assert max(totals(tl)) >= best and tl["peak"]["bytes"] == best
    assert totals(tl)[tl["x"].index(tl["peak"]["x"])] == best
    assert at_peak(tr)["live_bytes"] == best


def test_a_step_without_events_has_an_empty_timeline():
    tr = SimpleNamespace(allocs={}, events=[], roles={}, _event_phases=lambda: [])
    tl = timeline(tr)
    assert tl["peak"] == {"x": None, "bytes": 0, "phase": None} and tl["x"] == [0]
    assert at_peak(tr)["top_tensors"] == []


def test_malformed_timelines_are_named():
    assert timeline_problem([]) == "[] is not an object"
    assert timeline_problem({"x": [0, 1], "bytes": {"weights": [1]}, "peak": {"bytes": 1}, "phases": []}) == \
        "bytes.weights: not a list of 2 byte counts"
    assert timeline_problem({"x": [0], "bytes": {"bogus": [1]}, "peak": {"bytes": 1}, "phases": []}).startswith(
        "bytes: not an object of byte lists per category")


def test_tracked_peak_is_unchanged_by_attribution(variant):
    """The attribution adds no tensor: two tracked runs, with and without the module hooks, agree to the byte."""
    from peftprof.run import track

    rec = run_variant(variant, device="cpu")
    enter = track.MemoryTracker.__enter__
    try:
        track.MemoryTracker.__enter__ = lambda self: torch.utils._python_dispatch.TorchDispatchMode.__enter__(self)
        bare = run_variant(variant, device="cpu")
    finally:
        track.MemoryTracker.__enter__ = enter
    assert bare["measured"]["peak_bytes"] == rec["measured"]["peak_bytes"]
    assert bare["measured"]["breakdown"] == rec["measured"]["breakdown"]
    assert all(t["module"] == "(optimizer state)" or t["category"] != "activations"
               or not t["module"].startswith("model.") for t in bare["measured"]["at_peak"]["top_tensors"])


def test_tracking_a_quanto_model_leaves_no_module_hooks_behind(tmp_path):
    """The tracker re-enters itself inside quanto's QTensor dispatch; its hooks are still removed once."""
    from torch.nn.modules import module

    from peftprof.run.runner import run_variant
    from peftprof.scenario import load_scenarios
    from tests.conftest import TINY_MODEL

    path = tmp_path / "int4.toml"
    path.write_text(TINY_MODEL.replace('weights = "fp32"', 'weights = "int4"\ncompute_dtype = "fp32"')
                    + '[peft]\nmethod = "lora"\n[training]\nbatch_size = 1\nseq_len = 8\n[run]\ndevice = "cpu"\nsteps = 1\n')
    (s,) = load_scenarios([path])
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec["error"]
    assert not module._global_forward_hooks and not module._global_forward_pre_hooks
