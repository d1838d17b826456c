"""FSDP runs measure the same peak every time (issue #15). gloo runs a collective on a worker thread that wakes the
caller before dropping its own references to the collective's tensors; a buffer FSDP freed next could then die on
that thread, after the caller's next allocation, and gpt2-lora-fsdp2's measured peak moved between 3,819,976 and
3,940,808 B. The runner's collectives now return only once the backend holds none of their tensors
(run/distributed.py wait_released), so every free is seen in program order, as the per-rank trace sees it."""

import pytest
import torch
import torch.distributed as dist

from peftprof.run.distributed import settled_comms, storage_refs

N_COLLECTIVES = 200  # per kind and comm; FSDP2's own returned early in 9-12% of gloo collectives here


def late_references(all_gather, reduce_scatter, group, rank: int, world: int) -> int:
    """How many all-gathers / reduce-scatters (FSDP2's shapes: the all-gather input a view of its output; a
    separate reduce-scatter input) return with more references to their tensors than before the call."""
    n, cpu = 0, torch.device("cpu")
    for _ in range(N_COLLECTIVES):
        out = all_gather.allocate((world * 4096,), dtype=torch.uint8, device=cpu)
        inp = out[rank * 4096:(rank + 1) * 4096].fill_(rank + 1)
        refs = storage_refs(out)
        all_gather(output_tensor=out, input_tensor=inp, group=group)
        n += storage_refs(out) > refs
        rs_in, rs_out = torch.ones(world * 1024), reduce_scatter.allocate((1024,), dtype=torch.float32, device=cpu)
        refs = (storage_refs(rs_in), storage_refs(rs_out))
        reduce_scatter(output_tensor=rs_out, input_tensor=rs_in, group=group, op=dist.ReduceOp.SUM)
        n += (storage_refs(rs_in), storage_refs(rs_out)) != refs
        assert rs_out[0].item() == world and out[-1].item() == world  # the collectives did their work
    return n


def test_settled_collectives_hold_no_backend_references():
    """A one-rank gloo group in this process: gloo runs even its collectives on the worker thread (the same
    runLoop as with more ranks), so the race shows without starting processes."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        settled_all_gather, settled_reduce_scatter = settled_comms()
        settled = late_references(settled_all_gather(), settled_reduce_scatter(), dist.group.WORLD, 0, 1)
        # FSDP2's own collectives show the race this fixes (if a torch release stops showing it, the workaround in
        # run/distributed.py may go). The race is random: usually 10-30% of collectives, but a full suite on a
        # loaded machine once saw none in 400 (CI), so up to 20 rounds are drawn before calling it gone
        default = 0
        for _ in range(20):
            default += late_references(DefaultAllGather(), DefaultReduceScatter(), dist.group.WORLD, 0, 1)
            if default:
                break
    finally:
        dist.destroy_process_group()
    assert settled == 0
    assert default > 0


def test_a_backend_that_keeps_its_references_costs_the_timeout_once():
    """A collective whose references never go (a backend that changed) is counted, and after the first timeout
    the rest of the run stops waiting instead of paying the timeout on every collective."""
    import time

    from peftprof.run.distributed import _settled

    kept = []

    class DefaultKeeper:
        def __call__(self, output_tensor, input_tensor, group, *args, async_op=False, **kwargs):
            kept.append(output_tensor.view(-1))  # a view: one more reference to the storage, never let go

    cls = _settled(DefaultKeeper)
    cls.timeout_s = 0.3
    start = time.monotonic()
    for _ in range(20):
        cls()(torch.ones(2), torch.ones(2), None)
    assert cls.unsettled == 20 and cls.timeout_s == 0.0
    assert time.monotonic() - start < 0.3 * 3  # one timeout, not twenty


GPT2_FSDP = """name = "gpt2-lora-fsdp2"
[model]
model_type = "gpt2"
n_embd = 128
n_layer = 2
n_head = 4
n_positions = 64
vocab_size = 1003
[training]
batch_size = 2
seq_len = 32
[peft]
method = "lora"
r = 6
target_modules = "all-linear"
dropout = 0.0
[run]
steps = 1
warmup_steps = 1
[distributed]
world_size = 2
strategy = "fsdp"
"""


@pytest.fixture(scope="module")
def gpt2_fsdp(tmp_path_factory):
    from peftprof.run.distributed import run_distributed
    from peftprof.scenario import load_scenario

    path = tmp_path_factory.mktemp("gpt2") / "gpt2.toml"
    path.write_text(GPT2_FSDP)
    (s,) = load_scenario(path)
    return s, run_distributed(s, device="cpu")


def test_gpt2_fsdp_each_rank_equals_its_trace(gpt2_fsdp):
    """The benchmark's gpt2-lora-fsdp2 case (bf16, default dropouts, vocabulary 1003: uneven shards): every rank's
    measured peak and breakdown equal, to the byte, the per-rank trace of that rank, every free was seen on the
    step's own thread, and rank 0 (the largest shard) peaks highest. Without the settled collectives this run
    still passes about 3 times in 4 (the race is random; measured): the guard of the fix is
    test_settled_collectives_hold_no_backend_references, which fails every time."""
    from peftprof.results import CATEGORIES
    from peftprof.trace_distributed import trace_peak_distributed

    s, record = gpt2_fsdp
    assert record["status"] == "ok", record["error"]
    ranks = record["measured"]["ranks"]
    for r in ranks:
        assert r["off_thread_frees"] == 0 and r["unsettled_collectives"] == 0, r
        traced = trace_peak_distributed(s, rank=r["rank"])
        assert traced["rank"] == r["rank"]
        assert (r["peak_bytes"], r["peak_phase"]) == (traced["peak_bytes"], traced["peak_phase"])
        assert {c: r["breakdown"][c] for c in CATEGORIES} == {c: traced["breakdown"][c] for c in CATEGORIES}
    assert ranks[0]["peak_bytes"] == max(r["peak_bytes"] for r in ranks) == record["measured"]["peak_bytes"]


def test_trace_refuses_a_rank_outside_the_group(gpt2_fsdp):
    from peftprof.trace_distributed import trace_peak_distributed

    s, _ = gpt2_fsdp
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 ranks"):
        trace_peak_distributed(s, rank=2)


def test_wait_released_gives_up_after_its_timeout():
    from peftprof.run.distributed import wait_released

    t = torch.ones(4)
    extra = t.view(2, 2)  # one more reference to the storage, never released
    assert not wait_released([t], [storage_refs(t) - 1], timeout_s=0.05)
    del extra
    assert wait_released([t], [storage_refs(t)], timeout_s=0.05)


def test_tracker_counts_a_free_on_another_thread():
    """A storage whose last reference dies on another thread is freed at that thread's moment, not the step's:
    the tracker counts it (a rank's `off_thread_frees`)."""
    import threading

    from peftprof.run.track import MemoryTracker

    tracker, box = MemoryTracker(), []
    with tracker:
        tracker.phase = "forward"
        box.append(torch.ones(1000))
        local = torch.ones(10)
        del local  # on this thread: not counted
        other = threading.Thread(target=box.clear)
        other.start()
        other.join()
    assert tracker.off_thread_frees == 1
    assert [sign for _, sign in tracker.events] == [1, 1, -1, -1]
    assert tracker.live_bytes == 0
