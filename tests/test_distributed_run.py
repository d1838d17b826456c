"""[distributed] runs: torchrun with gloo on CPU, each rank measured, against the per-rank trace (one process,
fake process group, fake tensors)."""

import json

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.results import CATEGORIES
from peftprof.run.distributed import assemble
from peftprof.run.runner import run_variant
from peftprof.scenario import load_scenario
from peftprof.trace import trace_peak

LORA = TINY_MODEL + """
[peft]
method = "lora"
r = 8
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 32
[run]
device = "cpu"
steps = 1
warmup_steps = 1
[distributed]
world_size = 2
"""


@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory):
    """A 2-process FSDP LoRA run through `peftprof run` and its scenario."""
    tmp = tmp_path_factory.mktemp("fsdp")
    path = tmp / "fsdp-lora.toml"
    path.write_text(LORA + 'strategy = "fsdp"\n')
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp / "out"), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (tmp / "out" / "fsdp-lora.jsonl").read_text().splitlines()]
    (s,) = load_scenario(path)
    return record, s


def test_fsdp_run_records_every_rank(fsdp_lora):
    record, s = fsdp_lora
    assert record["status"] == "ok", record["error"]
    m = record["measured"]
    assert [r["rank"] for r in m["ranks"]] == [0, 1] and m["world_size"] == 2
    for r in m["ranks"]:
        assert set(r["breakdown"]) == set(CATEGORIES)
        assert sum(r["breakdown"].values()) == r["peak_bytes"] > 0
    assert m["peak_bytes"] == max(r["peak_bytes"] for r in m["ranks"])
    assert m["breakdown"] == m["ranks"][m["peak_rank"]]["breakdown"]
    # FSDP2 shards every parameter along dim 0 (all dims of this model are even) and replicates buffers:
    # sharded = params / 2 + buffers, wrapped = params + buffers, so 2 * sharded - wrapped = buffer bytes
    # (llama's rotary embedding: inv_freq and original_inv_freq, head_dim / 2 fp32 values each)
    for r in m["ranks"]:
        phases = {p["phase"]: p["bytes"] for p in r["phases"]}
        assert 2 * phases["sharded"] - phases["wrapped"] == 2 * (64 // 4 // 2) * 4


def test_fsdp_rank_equals_per_rank_trace(fsdp_lora):
    record, s = fsdp_lora
    traced = trace_peak(s)
    for r in record["measured"]["ranks"]:
        assert abs(traced["peak_bytes"] - r["peak_bytes"]) <= 0.005 * r["peak_bytes"], (traced["peak_bytes"], r)
        for category in CATEGORIES:
            assert abs(traced["breakdown"][category] - r["breakdown"][category]) <= 0.005 * r["peak_bytes"], category


def test_ddp_rank_is_one_process_plus_gradient_buckets(write_scenario):
    """DDP: each rank is the one-process step plus DDP's buckets (one more copy of the trainable gradients),
    and the per-rank trace agrees."""
    path = write_scenario(LORA + 'strategy = "ddp"\n')
    (s,) = load_scenario(path)
    record = run_variant(s, device="cpu")
    assert record["status"] == "ok", record["error"]
    single = trace_peak(load_scenario(write_scenario(LORA.replace("world_size = 2", "world_size = 1"),
                                                     "one.toml"))[0])
    trainable_bytes = 2 * 2 * (8 * 64 + 64 * 8) * 4  # 2 layers x (q, v) x LoRA A + B, fp32
    traced = trace_peak(s)
    for r in record["measured"]["ranks"]:
        assert r["peak_bytes"] == single["peak_bytes"] + trainable_bytes
        assert r["breakdown"]["gradients"] == single["breakdown"]["gradients"] + trainable_bytes
        assert abs(traced["peak_bytes"] - r["peak_bytes"]) <= 0.005 * r["peak_bytes"]


def test_zero_is_unmeasured_without_launching(write_scenario):
    (s,) = load_scenario(write_scenario(LORA + 'strategy = "zero2"\n'))
    record = run_variant(s, device="cpu")
    assert record["status"] == "unmeasured" and record["measured"] is None
    assert "DeepSpeed" in record["error"]["message"]


def test_a_failing_rank_decides_the_record():
    """The first rank to fail gives status and phase; a rank that wrote nothing is named."""
    base = {"status": "ok", "error": None, "measured": None, "checks": {}}
    oom = {"rank": 1, "status": "oom", "error": {"phase": "backward", "message": "cap"}, "failed_at": 2.0,
           "measured": None, "checks": {}}
    peer = {"rank": 0, "status": "error", "error": {"phase": "optimizer", "message": "peer gone"},
            "failed_at": 3.0, "measured": None, "checks": {}}
    rec = assemble(dict(base), [peer, oom], exit_code=1)
    assert rec["status"] == "oom" and rec["error"]["phase"] == "backward" and rec["error"]["rank"] == 1
    assert rec["measured"] is None
    rec = assemble(dict(base), [None, None], exit_code=1, log_tail="boom")
    assert rec["status"] == "error" and rec["error"]["phase"] == "startup" and "[0, 1]" in rec["error"]["message"]
    rec = assemble(dict(base), [None, None], exit_code=-9, timed_out=True, timeout_s=5)
    assert rec["status"] == "error" and rec["error"]["phase"] == "run" and "5 s" in rec["error"]["message"]


def test_timeout_kills_the_ranks(write_scenario):
    from peftprof.run.distributed import run_distributed

    (s,) = load_scenario(write_scenario(LORA + 'strategy = "fsdp"\n'))
    record = run_distributed(s, device="cpu", timeout_s=0.5)
    assert record["status"] == "error" and record["error"]["phase"] == "run", record["error"]
    assert record["measured"] is None


def test_tracker_follows_storage_resizes():
    """FSDP2 gathers and frees parameters by resizing their storages (no aten op): the tracker counts them,
    keeping the category they were registered with."""
    import torch

    from peftprof.run.track import MemoryTracker

    w = torch.empty(1000, dtype=torch.float32)
    w.untyped_storage().resize_(0)  # a freed unsharded parameter, as FSDP2 leaves it between steps
    tracker = MemoryTracker()
    tracker.register([w], "weights")
    with tracker:
        tracker.phase = "forward"
        w.untyped_storage().resize_(4000)  # gathered: 1000 fp32 values
        x = torch.ones(10)  # 40 B, alive past forward: an activation
        tracker.phase = "backward"
        w.untyped_storage().resize_(0)  # freed again
    result = tracker.classify([])
    assert result.peak_bytes == 4040 and result.breakdown["weights"] == 4000
    assert result.breakdown["activations"] == 40 and result.steady_bytes == 40
    assert torch.UntypedStorage.resize_ is tracker._resize  # restored after tracking
    del x
