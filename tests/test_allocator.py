"""The caching-allocator simulation (peftprof/estimate/allocator.py): one hand-worked event sequence per rule of
c10/cuda/CUDACachingAllocator.cpp with the exact segments expected, properties on random event streams, the
PYTORCH_CUDA_ALLOC_CONF parser, the trace stream, and the replay of recorded snapshots."""

import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftprof.estimate.alloc_conf import AllocConfError, alloc_conf_problems, parse_alloc_conf
from peftprof.estimate.allocator import CachingAllocator, roundup_power2_next_division, simulate
from peftprof.estimate.allocator_replay import replay_snapshot, steady_state_events, tracker_stream

MIB = 1 << 20
KIB = 1 << 10
ROOT = Path(__file__).resolve().parent.parent


def segs(alloc):
    """Segments as (pool, total size, ((block size, allocated), ...)) in address order."""
    return [(s["pool"], s["total_size"], tuple(s["blocks"])) for s in alloc.segments()]


def run(events, conf=None, **kw):
    result, alloc = simulate(events, conf=conf, **kw)
    return result, alloc


# --- round_size --------------------------------------------------------------------------------------------
def test_round_size_rounds_to_512_bytes():
    a = CachingAllocator()
    assert [a.round_size(n) for n in (1, 511, 512, 513, 5 * MIB + 1)] == [512, 512, 512, 1024, 5 * MIB + 512]


def test_roundup_power2_divisions():
    # the example of roundup_power2_next_division's comment: 1200 with 4 divisions -> 1280
    assert roundup_power2_next_division(1200, 4) == 1280
    assert roundup_power2_next_division(4096, 4) == 4096  # powers of 2 stay
    a = CachingAllocator(parse_alloc_conf("roundup_power2_divisions:4"))
    # 5 MiB + 1 lies between 4 and 8 MiB: steps of 1 MiB -> 6 MiB; 1200 B is not > 512 x 4: plain 512 rounding
    assert a.round_size(5 * MIB + 1) == 6 * MIB
    assert a.round_size(1200) == 1536
    _, alloc = run([5 * MIB + 1], "roundup_power2_divisions:4")
    assert segs(alloc) == [("large", 20 * MIB, ((6 * MIB, True), (14 * MIB, False)))]


def test_roundup_power2_divisions_list_as_torchs_own_test():
    # c10/test/core/AllocatorConfig_test.cpp: [64:8,128:2,256:4,512:2,1024:4,>:1]
    conf = parse_alloc_conf("roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]")
    assert [conf.divisions_for(mb * MIB) for mb in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)] == \
        [8, 8, 2, 4, 2, 4, 1, 1, 1]


# --- pools and segment sizes (get_pool, get_allocation_size) -----------------------------------------------
def test_small_requests_share_a_2_mib_segment():
    _, alloc = run([512 * KIB, 512 * KIB])
    assert segs(alloc) == [("small", 2 * MIB, ((512 * KIB, True), (512 * KIB, True), (1 * MIB, False)))]


def test_segment_sizes_by_request():
    # <= 1 MiB: 2 MiB small segment; 1-10 MiB: 20 MiB; >= 10 MiB: rounded up to 2 MiB
    for request, segment in ((1 * MIB, 2 * MIB), (1 * MIB + 1, 20 * MIB), (10 * MIB, 10 * MIB),
                             (11 * MIB - 1, 12 * MIB)):
        _, alloc = run([request])
        assert [s[1] for s in segs(alloc)] == [segment], request
    _, alloc = run([2 * MIB], "large_segment_size_mb:32")
    assert segs(alloc) == [("large", 32 * MIB, ((2 * MIB, True), (30 * MIB, False)))]


# --- best fit (get_free_block) and splitting (should_split, alloc_found_block) -------------------------------
def test_best_fit_by_size_then_address_and_large_split_threshold():
    # three cached segments 12, 12, 14 MiB (in that address order), then three 11.5 MiB requests
    r = 11 * MIB + 512 * KIB
    _, alloc = run([12 * MIB, 12 * MIB, 14 * MIB, -1, -2, -3, r])
    # the first 12 MiB segment (lowest address among the smallest that fit); 0.5 MiB left is not > 1 MiB: no split
    assert segs(alloc) == [("large", 12 * MIB, ((12 * MIB, True),)), ("large", 12 * MIB, ((12 * MIB, False),)),
                           ("large", 14 * MIB, ((14 * MIB, False),))]
    assert alloc.allocated_bytes == 12 * MIB  # the whole block counts
    _, alloc = run([12 * MIB, 12 * MIB, 14 * MIB, -1, -2, -3, r, r, r])
    # the 14 MiB segment splits: 2.5 MiB > 1 MiB
    assert segs(alloc)[2] == ("large", 14 * MIB, ((r, True), (14 * MIB - r, False)))


def test_free_merges_neighbours_and_empty_cache_releases_whole_segments():
    k = 512 * KIB
    _, alloc = run([k, k, k, -2])
    assert segs(alloc) == [("small", 2 * MIB, ((k, True), (k, False), (k, True), (k, False)))]
    _, alloc = run([k, k, k, -2, -3])
    assert segs(alloc) == [("small", 2 * MIB, ((k, True), (3 * k, False)))]
    _, alloc = run([k, k, k, -2, -3, -1])
    assert segs(alloc) == [("small", 2 * MIB, ((2 * MIB, False),))]
    assert alloc.reserved_bytes == 2 * MIB  # cached, still reserved
    _, alloc = run([k, k, 12 * MIB, -2])
    alloc.empty_cache()  # the split small segment stays (one block live); the 12 MiB one is live too
    assert [s[1] for s in segs(alloc)] == [2 * MIB, 12 * MIB]
    alloc.free(alloc.active[next(iter(alloc.active))])


# --- max_split_size_mb and max_non_split_rounding_mb -------------------------------------------------------
def test_oversize_blocks_serve_only_large_requests_within_the_rounding_limit():
    conf = "max_split_size_mb:20"
    # a cached 24 MiB (oversize) block does not serve a 2 MiB request: a new 20 MiB segment
    _, alloc = run([24 * MIB, -1, 2 * MIB], conf)
    assert segs(alloc) == [("large", 24 * MIB, ((24 * MIB, False),)),
                           ("large", 20 * MIB, ((2 * MIB, True), (18 * MIB, False)))]
    # it serves 22 MiB whole (no split for requests >= max_split_size)
    _, alloc = run([24 * MIB, -1, 22 * MIB], conf)
    assert segs(alloc) == [("large", 24 * MIB, ((24 * MIB, True),))]
    # but a 44 MiB block is >= 22 + 20 MiB (max_non_split_rounding): refused, a new 22 MiB segment
    _, alloc = run([44 * MIB, -1, 22 * MIB], conf)
    assert segs(alloc) == [("large", 44 * MIB, ((44 * MIB, False),)), ("large", 22 * MIB, ((22 * MIB, True),))]
    _, alloc = run([44 * MIB, -1, 22 * MIB], conf + ",max_non_split_rounding_mb:30")
    assert segs(alloc) == [("large", 44 * MIB, ((44 * MIB, True),))]


def test_release_available_cached_blocks_frees_only_enough_oversize_blocks():
    # capacity 80 MiB, cached 24, 24, 30 MiB; a 50 MiB request: the largest first (30, then 24) until >= 50
    events = [24 * MIB, 24 * MIB, 30 * MIB, -1, -2, -3, 50 * MIB]
    _, alloc = run(events, "max_split_size_mb:20", capacity_bytes=80 * MIB)
    assert segs(alloc) == [("large", 24 * MIB, ((24 * MIB, False),)), ("large", 50 * MIB, ((50 * MIB, True),))]
    # without max_split_size: release_cached_blocks frees every cached segment
    _, alloc = run(events, capacity_bytes=80 * MIB)
    assert segs(alloc) == [("large", 50 * MIB, ((50 * MIB, True),))]


# --- the out-of-memory path (release_cached_blocks and retry, then OOM) -----------------------------------------
def test_free_cached_blocks_and_retry_before_an_oom():
    result, alloc = run([12 * MIB, 12 * MIB, -1, -2, 30 * MIB], capacity_bytes=40 * MIB)
    assert result.oom is None and segs(alloc) == [("large", 30 * MIB, ((30 * MIB, True),))]
    assert [x[0] for x in alloc.log] == ["segment_alloc", "segment_alloc", "segment_free", "segment_free",
                                         "segment_alloc"]


def test_fragmentation_oom_although_allocated_is_under_capacity():
    # [a 5][b 5][c 5][5 free] in one 20 MiB segment; free b; 12 MiB fits no free block and 20 + 12 > 30
    result, alloc = run([5 * MIB, 5 * MIB, 5 * MIB, -2, 12 * MIB], capacity_bytes=30 * MIB)
    assert result.oom == {"event": 4, "request_bytes": 12 * MIB, "allocated_bytes": 10 * MIB,
                          "reserved_bytes": 20 * MIB}
    assert result.oom["allocated_bytes"] + 12 * MIB < 30 * MIB
    # the simulation went on without the limit
    assert [s[1] for s in segs(alloc)] == [20 * MIB, 12 * MIB]


# --- expandable_segments ----------------------------------------------------------------------------------------
def test_expandable_segments_grow_one_segment_by_pages():
    events = [3 * MIB, 30 * MIB]
    result, alloc = run(events, "expandable_segments:True")
    assert segs(alloc) == [("large", 40 * MIB, ((3 * MIB, True), (30 * MIB, True), (7 * MIB, False)))]
    assert result.n_segments == 1 and result.peak_reserved_bytes == 40 * MIB
    result, alloc = run(events)  # the same without: two segments, 50 MiB
    assert result.n_segments == 2 and result.peak_reserved_bytes == 50 * MIB
    _, alloc = run([1000], "expandable_segments:True")
    assert segs(alloc) == [("small", 2 * MIB, ((1024, True), (2 * MIB - 1024, False)))]


def test_expandable_empty_cache_unmaps_whole_free_pages_only():
    _, alloc = run([3 * MIB, 30 * MIB, 4 * MIB, -2], "expandable_segments:True")
    # [3 T][30 F][4 T][3 F] over pages of 20 MiB: the free 30 MiB at 3..33 MiB contains no whole page
    alloc.empty_cache()
    assert segs(alloc) == [("large", 40 * MIB, ((3 * MIB, True), (30 * MIB, False), (4 * MIB, True),
                                                (3 * MIB, False)))]
    _, alloc = run([3 * MIB, 50 * MIB, 4 * MIB, -2], "expandable_segments:True")
    # 53..57 is the 4 MiB block; the free 3..53 MiB holds the whole page 20..40 MiB: it is unmapped, the
    # segment splits into two mapped ranges
    alloc.empty_cache()
    assert segs(alloc) == [("large", 20 * MIB, ((3 * MIB, True), (17 * MIB, False))),
                           ("large", 20 * MIB, ((13 * MIB, False), (4 * MIB, True), (3 * MIB, False)))]
    assert alloc.reserved_bytes == 40 * MIB


# --- garbage_collection_threshold ---------------------------------------------------------------------------------
def test_garbage_collection_frees_the_oldest_cached_segments():
    conf = "garbage_collection_threshold:0.5,per_process_memory_fraction:0.5"
    # allowed 80 MiB of 160; threshold 40 MiB. Cached A 12, B 14, C 16 (42 MiB); A reused and freed again (younger);
    # a 20 MiB request finds no block: reserved 42 > 40, ages A 1, B 2, C 2, mean 5/3: B and C go
    events = [12 * MIB, 14 * MIB, 16 * MIB, -1, -2, -3, 12 * MIB, -4, 20 * MIB]
    _, alloc = run(events, conf, total_memory_bytes=160 * MIB)
    assert segs(alloc) == [("large", 12 * MIB, ((12 * MIB, False),)), ("large", 20 * MIB, ((20 * MIB, True),))]
    _, alloc = run(events, total_memory_bytes=160 * MIB)  # no fraction: no garbage collection
    assert [s[1] for s in segs(alloc)] == [12 * MIB, 14 * MIB, 16 * MIB, 20 * MIB]


def test_memory_fraction_refuses_past_the_allowed_maximum():
    result, _ = run([30 * MIB, 30 * MIB], "per_process_memory_fraction:0.5", total_memory_bytes=100 * MIB)
    assert result.oom is not None and result.oom["reserved_bytes"] == 30 * MIB


# --- properties on random event streams -------------------------------------------------------------------------
CONFS = [None, "expandable_segments:True", "max_split_size_mb:24", "roundup_power2_divisions:[1:4,>:2]",
         "garbage_collection_threshold:0.6,per_process_memory_fraction:0.9"]


def random_sizes(rng, n):
    return [rng.choice([rng.randint(1, 4096), rng.randint(1, 2 * MIB), rng.randint(1, 64 * MIB)]) for _ in range(n)]


@pytest.mark.parametrize("conf", CONFS)
@pytest.mark.parametrize("seed", range(3))
def test_reserved_covers_allocated_and_everything_returns(conf, seed):
    rng = random.Random(seed)
    alloc = CachingAllocator(parse_alloc_conf(conf), total_memory_bytes=4 << 30)
    live = []
    for size in random_sizes(rng, 300):
        if live and rng.random() < 0.45:
            alloc.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(alloc.malloc(size))
        assert alloc.reserved_bytes >= alloc.allocated_bytes
        snap = alloc.segments()
        assert sum(s["total_size"] for s in snap) == alloc.reserved_bytes
        assert sum(b for s in snap for b, on in s["blocks"] if on) == alloc.allocated_bytes
    for b in live:
        alloc.free(b)
    alloc.empty_cache()
    assert (alloc.reserved_bytes, alloc.allocated_bytes, alloc.segments()) == (0, 0, [])


@pytest.mark.parametrize("seed", range(5))
def test_expandable_segments_waste_under_one_page_per_pool(seed):
    """Allocations only: each pool's mapped memory exceeds its allocated bytes by less than one page (2 MiB
    small, 20 MiB large). After frees the freed blocks stay mapped until empty_cache, which keeps at most the
    partial pages around live blocks: no free block then contains a whole page."""
    rng = random.Random(seed)
    alloc = CachingAllocator(parse_alloc_conf("expandable_segments:True"))
    live = []
    for size in random_sizes(rng, 200):
        live.append(alloc.malloc(size))
        for pool, page in (("small", 2 * MIB), ("large", 20 * MIB)):
            snap = [s for s in alloc.segments() if s["pool"] == pool]
            waste = sum(s["total_size"] for s in snap) - sum(b for s in snap for b, on in s["blocks"] if on)
            assert 0 <= waste < page
    for b in rng.sample(live, len(live) // 2):
        alloc.free(b)
    alloc.empty_cache()
    for s in alloc.segments():
        page = 2 * MIB if s["pool"] == "small" else 20 * MIB
        assert all(size < 2 * page for size, on in s["blocks"] if not on)


# --- PYTORCH_CUDA_ALLOC_CONF -----------------------------------------------------------------------------------
def test_alloc_conf_parses_what_torch_parses():
    c = parse_alloc_conf(" expandable_segments:True, max_split_size_mb:128,garbage_collection_threshold:0.8 ")
    assert (c.expandable_segments, c.max_split_size_bytes, c.garbage_collection_threshold) == (True, 128 * MIB, 0.8)
    assert parse_alloc_conf("") == parse_alloc_conf(None) == parse_alloc_conf("backend:native")
    assert parse_alloc_conf("release_lock_on_cudamalloc:True,pinned_num_register_threads:8").expandable_segments \
        is False


@pytest.mark.parametrize("text, words", [
    ("expandable_segments:true", ["expandable_segments", "True or False"]),
    ("max_split_size_mb:10", ["max_split_size_mb", ">= 20"]),
    ("max_split_size_mb:abc", ["max_split_size_mb", "MiB"]),
    ("garbage_collection_threshold:1.5", ["garbage_collection_threshold", "(0.0, 1.0)"]),
    ("roundup_power2_divisions:3", ["roundup_power2_divisions", "power of 2"]),
    ("roundup_power2_divisions:[64:8", ["roundup_power2_divisions", "]"]),
    ("expandable_segment:True", ["unknown option", "expandable_segments:True|False"]),
    ("expandable_segments", ["expandable_segments:<value>"]),
    ("backend:cudaMallocAsync", ["backend", "native"]),
    ("expandable_segments:True max_split_size_mb:30", ["expandable_segments", "True or False"]),  # spaces dropped
])
def test_alloc_conf_errors_are_one_line_naming_option_and_allowed(text, words):
    with pytest.raises(AllocConfError) as e:
        parse_alloc_conf(text)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert alloc_conf_problems(text) == [msg]
    assert alloc_conf_problems("expandable_segments:True") == []
    assert alloc_conf_problems(3) == ["must be a string such as \"expandable_segments:True\", got 3"]


# --- from a trace --------------------------------------------------------------------------------------------
def test_tracker_stream_and_steady_state():
    allocs = {0: SimpleNamespace(nbytes=100, category="weights"), 1: SimpleNamespace(nbytes=200, category="optimizer"),
              2: SimpleNamespace(nbytes=0, category=None), 3: SimpleNamespace(nbytes=300, category=None),
              4: SimpleNamespace(nbytes=400, category=None)}
    tracker = SimpleNamespace(allocs=allocs, events=[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (2, -1), (3, -1)])
    stream = tracker_stream(tracker, paged=lambda a: a.category == "optimizer")
    assert stream == {"events": [100, 200, 300, 400, -3], "n_registered": 2, "paged": [1]}
    # registered (the paged one left out), a 1000 B workspace, two steps; the step leaves 400 B alive, freed
    # before the second step
    assert steady_state_events(stream, workspace_bytes=1000) == [100, 1000, 300, 400, -3, -4, 300, 400, -5]


# --- replay of recorded snapshots ------------------------------------------------------------------------------
A, B = 0x7F0000000000, 0x7F0000200000


def hand_made_snapshot():
    """What torch.cuda.memory._snapshot() records for: x = 1000 B, y = 5 MiB, del y, z = 5 MiB, then an
    empty_cache that releases nothing (both segments hold live blocks)."""
    trace = [{"action": "segment_alloc", "addr": A, "size": 2 * MIB}, {"action": "alloc", "addr": A, "size": 1000},
             {"action": "segment_alloc", "addr": B, "size": 20 * MIB}, {"action": "alloc", "addr": B, "size": 5 * MIB},
             {"action": "free_requested", "addr": B, "size": 5 * MIB},
             {"action": "free_completed", "addr": B, "size": 5 * MIB}, {"action": "alloc", "addr": B, "size": 5 * MIB}]
    segments = [
        {"device": 0, "address": A, "total_size": 2 * MIB, "segment_type": "small",
         "blocks": [{"size": 1024, "state": "active_allocated"}, {"size": 2 * MIB - 1024, "state": "inactive"}]},
        {"device": 0, "address": B, "total_size": 20 * MIB, "segment_type": "large",
         "blocks": [{"size": 5 * MIB, "state": "active_allocated"}, {"size": 15 * MIB, "state": "inactive"}]}]
    return {"segments": segments, "device_traces": [trace], "allocator_settings": {}}


def test_replay_of_a_hand_made_snapshot():
    out = replay_snapshot(hand_made_snapshot())
    assert out["match"] and out["recorded_peak_reserved_bytes"] == out["simulated_peak_reserved_bytes"] == 22 * MIB
    bad = hand_made_snapshot()
    bad["device_traces"][0][2]["size"] = 10 * MIB  # a recording the rules would not produce
    out = replay_snapshot(bad)
    assert not out["match"]
    assert out["first_segment_difference"] == {"index": 1, "recorded": ("segment_alloc", 10 * MIB),
                                               "simulated": ("segment_alloc", 20 * MIB)}


def test_replay_treats_unexplained_segment_frees_as_empty_cache():
    snap = hand_made_snapshot()
    snap["device_traces"][0] += [{"action": "free_completed", "addr": B, "size": 5 * MIB},
                                 {"action": "segment_free", "addr": B, "size": 20 * MIB}]
    snap["segments"] = snap["segments"][:1]
    out = replay_snapshot(snap)
    assert out["match"] and out["simulated_segments"] == [(2 * MIB, ((1024, True), (2 * MIB - 1024, False)))]


def test_recorded_snapshots_replay_exactly():
    """Snapshots recorded on a GPU by benchmarks/gpu_check.sh (committed under benchmarks/results/gpu/) replay to
    the recorded segments and peak reserved; the hand-made one always runs, so this test never passes empty."""
    snaps = [("hand-made", hand_made_snapshot())]
    for path in sorted((ROOT / "benchmarks" / "results" / "gpu").glob("snapshot-*.pickle")):
        with open(path, "rb") as f:
            snaps.append((path.name, pickle.load(f)))
    for name, snap in snaps:
        out = replay_snapshot(snap)
        assert out["match"], (name, out["first_segment_difference"], out["recorded_peak_reserved_bytes"],
                              out["simulated_peak_reserved_bytes"])


def test_scenario_cuda_alloc_conf_reaches_the_simulated_allocator(write_scenario, monkeypatch, tmp_path):
    """`[run] cuda_alloc_conf` (swept here: torch's defaults, then expandable segments) changes the simulated
    segments and reservation of `estimate --method trace --device cuda`, and nothing else."""
    import json

    from click.testing import CliRunner

    from peftprof.cli import cli

    monkeypatch.setenv("PEFTPROF_CACHE", str(tmp_path / "cache"))
    path = write_scenario('[model]\nmodel_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\n'
                          'num_attention_heads = 4\nintermediate_size = 160\nvocab_size = 1000\n'
                          '[training]\nbatch_size = 2\nseq_len = 64\n'
                          '[sweep]\n"run.cuda_alloc_conf" = ["", "expandable_segments:True"]\n')
    result = CliRunner().invoke(cli, ["estimate", str(path), "--method", "trace", "--device", "cuda",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    default, expandable = (row["estimate"] for row in json.loads(result.stdout))
    assert default["peak_bytes"] == expandable["peak_bytes"] and default["breakdown"] == expandable["breakdown"]
    assert expandable["n_segments"] < default["n_segments"]
    assert expandable["reserved_bytes"] != default["reserved_bytes"]  # whole 20 MiB pages: here more
    assert expandable["device_bytes"] - expandable["reserved_bytes"] == default["device_bytes"] - \
        default["reserved_bytes"]
