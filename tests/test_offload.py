"""Offloading (`[inference] max_memory`): the analytic placement (estimate/offload.py) against accelerate's own
infer_auto_device_map, and the analytic and traced device peak, disk bytes and disk reads against `peftprof run`
and against hand counts, at a cap that keeps everything, one that offloads half the layers and one below a layer."""

import pytest
import torch
from click.testing import CliRunner

from peftprof.estimate import estimate
from peftprof.estimate.offload import device_map, placement_of
from peftprof.scenario import load_scenario

# llama, hidden 64, 4 query / 2 KV heads of 16, 2 layers, fp32; LoRA r=4 on q and v. Per layer: q 64x64, k and
# v 32x64, o 64x64, gate/up/down 3 x 64x128, two norms of 64 = 36,992 parameters = 147,968 B; LoRA q 4 x (64+64)
# and v 4 x (64+32) = 896 fp32 = 3,584 B. embed_tokens and lm_head 500 x 64 = 128,000 B each, final norm 256 B;
# rotary_emb's inv_freq and original_inv_freq 8 fp32 each = 64 B (buffers: they stay on the device).
TINY = '''[model]
model_type = "llama"
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 128
vocab_size = 500
[precision]
weights = "fp32"
[peft]
method = "lora"
r = 4
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 16
[inference]
enabled = true
max_new_tokens = 4
max_memory = "CAP"
[run]
device = "cpu"
steps = 1
warmup_steps = 0
'''
LAYER, ADAPTER, EMBED, NORM, ROTARY = 147_968, 3_584, 128_000, 256, 64


def _real_map(s, cap: int):
    """accelerate's own placement of the served model built on meta (what run/infer.py dispatches)."""
    import peft

    from peftprof.run.build import _peft_config, base_model
    from peftprof.run.infer import add_resident_adapters, offload_device_map

    model = base_model(s, "meta")
    if s.peft.method != "full" and not s.inference.merged:
        with torch.device("meta"):
            model = peft.get_peft_model(model, _peft_config(s))
            if s.peft.num_adapters > 1:
                add_resident_adapters(model, s)
    return model, offload_device_map(model, cap, "cpu")


PLACEMENT_CASES = {
    "llama-gqa": TINY,
    "llama-tied": TINY.replace("vocab_size = 500", "vocab_size = 500\ntie_word_embeddings = true"),
    "mistral-bare": TINY.replace('model_type = "llama"', 'model_type = "mistral"\nsliding_window = 8').replace(
        'method = "lora"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]', 'method = "full"'),
    "qwen2-3-adapters": TINY.replace('model_type = "llama"', 'model_type = "qwen2"').replace(
        "r = 4", "r = 4\nnum_adapters = 3"),
    "llama-merged-bf16-big-vocab": TINY.replace("enabled = true", "enabled = true\nmerged = true").replace(
        '"fp32"', '"bf16"').replace("vocab_size = 500", "vocab_size = 3000").replace(
        "num_hidden_layers = 2", "num_hidden_layers = 4"),
}


@pytest.mark.parametrize("case", sorted(PLACEMENT_CASES))
def test_placement_is_accelerates(write_scenario, case):
    # every parameter and buffer of the real (meta-built) model placed where accelerate places it, at caps from
    # everything-fits down to nothing-fits; the decoder layers are larger than the embedding in some cases and
    # smaller in others, so the reserve accelerate keeps is sometimes a layer and sometimes the embedding
    s = load_scenario(write_scenario(PLACEMENT_CASES[case].replace("CAP", "1GB")))[0]
    seen = set()
    for cap in (10**9, 800_000, 600_000, 450_000, 350_000, 300_000, 200_000, 150_000, 50_000):
        model, ref = _real_map(s, cap)
        mine = device_map(s, cap, "cpu")
        names = [n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]]
        wrong = [(n, placement_of(n, ref), placement_of(n, mine)) for n in names
                 if placement_of(n, ref) != placement_of(n, mine)]
        assert not wrong, (cap, wrong[:3])
        seen.add(frozenset(ref.values()))
    assert {frozenset({"cpu"}), frozenset({"cpu", "disk"}), frozenset({"disk"})} <= seen  # all three regimes met


def test_tied_lm_head_follows_the_embedding(write_scenario):
    s = load_scenario(write_scenario(PLACEMENT_CASES["llama-tied"].replace("CAP", "1GB")))[0]
    # two layers + embedding fit under the cap minus the reserve (the embedding, 128,000 B): lm_head comes along
    dmap = device_map(s, 2 * (LAYER + ADAPTER) + 2 * EMBED + NORM + ROTARY + 1000, "cpu")
    assert placement_of("base_model.model.lm_head.weight", dmap) == placement_of(
        "base_model.model.model.embed_tokens.weight", dmap) == "cpu"


@pytest.fixture(scope="module")
def offload_runs(tmp_path_factory):
    """The runner, the analytic and the trace estimate at three caps (one tracked request each)."""
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    out = {}
    caps = {"all": "1GB",  # everything fits
            # the embedding and layer 0 (279,552 B) under the cap less the reserve (the largest layer: a decoder
            # layer with its adapters, 151,552 B)
            "half": "440KB",
            "none": "100KB"}  # below one layer, so below the reserve: everything on disk
    for key, cap in caps.items():
        path = tmp_path_factory.mktemp(key) / f"{key}.toml"
        path.write_text(TINY.replace("CAP", cap))
        s = load_scenario(path)[0]
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", rec["error"]
        out[key] = (s, rec, estimate(s, device="cpu"), trace_peak(s))
    return out


@pytest.mark.parametrize("key", ["all", "half", "none"])
def test_estimates_match_the_runner(offload_runs, key):
    s, rec, analytic, traced = offload_runs[key]
    m = rec["measured"]
    assert traced["peak_bytes"] == m["peak_bytes"]  # the trace loads what the hooks load, when they load it
    assert abs(analytic["peak_bytes"] - m["peak_bytes"]) <= 0.02 * m["peak_bytes"]
    for est in (analytic, traced["serving"]):
        assert est["placement_bytes"]["disk"] == m["placement_bytes"].get("disk", 0)
        assert est["disk_read_bytes_per_request"] == m["disk_read_bytes_per_request"]
    assert rec["estimate"]["disk_bytes"] == analytic["disk_bytes"]  # the runner's record carries the estimate


def test_offload_bytes_by_hand(offload_runs):
    forwards = 4  # the prompt's forward and three decode steps
    _, rec, analytic, _ = offload_runs["none"]
    m = rec["measured"]
    every = 2 * (LAYER + ADAPTER) + 2 * EMBED + NORM
    assert m["placement_bytes"] == {"cpu": ROTARY, "disk": every}  # buffers stay, every parameter on disk
    assert m["disk_read_bytes_per_request"] == forwards * every  # every offloaded weight, read on every forward
    assert analytic["disk_read_bytes_per_token"] == every
    # nothing resident but the rotary buffers: the peak holds ONE copy of the largest module loaded (lm_head or
    # the embedding, 128,000 B), not the three the tracker saw before it skipped the memmap views and meta moves
    assert m["breakdown"]["weights"] == ROTARY + EMBED
    _, rec, analytic, _ = offload_runs["half"]
    m = rec["measured"]
    assert m["placement_bytes"]["disk"] == LAYER + ADAPTER + EMBED + NORM  # layer 1, the final norm, lm_head
    assert analytic["breakdown"]["trainable"] == m["breakdown"]["trainable"] == ADAPTER  # layer 0's adapters
    _, rec, analytic, _ = offload_runs["all"]
    assert rec["measured"]["disk_read_bytes_per_request"] == 0 == analytic["disk_bytes"]


def test_estimate_table_shows_disk_bytes(write_scenario):
    from peftprof.cli import cli

    path = write_scenario(TINY.replace("CAP", "100KB"))
    out = CliRunner().invoke(cli, ["estimate", str(path)])
    assert out.exit_code == 0, out.output
    header, _, row = out.output.splitlines()[:3]
    assert header.split()[-2:] == ["disk", "KiB"]
    assert row.split()[-1] == f"{(2 * (LAYER + ADAPTER) + 2 * EMBED + NORM) / 1024:.2f}"  # 546.25: all on disk


LORA_KEYS = 'method = "lora"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]'


@pytest.mark.parametrize("method, keys, failure", [
    ("prompt_tuning", 'method = "prompt_tuning"\nnum_virtual_tokens = 4', "Cannot copy out of meta tensor"),
    ("ia3", 'method = "ia3"\ntarget_modules = ["k_proj", "v_proj", "down_proj"]', "device meta"),
    ("lora with use_dora", LORA_KEYS + "\nuse_dora = true", "Cannot copy out of meta tensor"),
    ("vera", LORA_KEYS.replace('"lora"', '"vera"'), "device cpu"),
    ("loha", LORA_KEYS.replace('"lora"', '"loha"'), "at least two devices"),
])
def test_methods_that_fail_under_offload_are_refused(write_scenario, method, keys, failure):
    # measured: peft's forward of these under accelerate's hooks raises the quoted error (loha: the trace does;
    # the runner serves it but no estimate would); the loader says so in one line, exit 2
    from peftprof.cli import cli

    path = write_scenario(TINY.replace(LORA_KEYS, keys).replace("CAP", "100KB"))
    out = CliRunner().invoke(cli, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    line = [ln for ln in out.output.splitlines() if "max_memory" in ln]
    assert len(line) == 1 and f"offloading {method}:" in line[0] and failure in line[0], out.output
    assert "Traceback" not in out.output
    if method != "prompt_tuning":  # merged: merge_and_unload leaves the bare base, which offloads (measured: runs)
        merged = write_scenario(path.read_text().replace("enabled = true", "enabled = true\nmerged = true"), "m.toml")
        assert CliRunner().invoke(cli, ["validate", str(merged)]).exit_code == 0
    # without offloading the same variant is accepted
    path.write_text(path.read_text().replace('max_memory = "100KB"', 'max_memory = ""'))
    assert CliRunner().invoke(cli, ["validate", str(path)]).exit_code == 0


@pytest.mark.parametrize("cap", ["infKB", "-5KB", "lots"])
def test_unreadable_caps_are_one_line_exit_2(write_scenario, cap):
    from peftprof.cli import cli

    path = write_scenario(TINY.replace("CAP", cap))
    for cmd in ("validate", "estimate"):
        out = CliRunner().invoke(cli, [cmd, str(path)])
        assert out.exit_code == 2 and "Traceback" not in out.output, out.output
        assert f"max_memory: {cap!r} is not a size accelerate reads" in out.output


def test_modules_to_save_and_padded_cap_trace_equals_runner(write_scenario):
    # modules_to_save = ["lm_head"]: ModulesToSaveWrapper runs modules_to_save["default"], never original_module,
    # so the request reads one lm_head copy per forward (the trace counted both: 2,749,440 against 2,237,440).
    # The cap carries surrounding whitespace, which the loader accepts: the runner and the trace read it alike.
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    path = write_scenario(TINY.replace(LORA_KEYS, LORA_KEYS + '\nmodules_to_save = ["lm_head"]')
                          .replace("CAP", " 100KB "))
    s = load_scenario(path)[0]
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec["error"]
    traced = trace_peak(s)
    m = rec["measured"]
    # every parameter on disk, the saved lm_head copy (EMBED) too; read per forward: all but original_module
    every = 2 * (LAYER + ADAPTER) + 3 * EMBED + NORM
    assert m["placement_bytes"]["disk"] == traced["serving"]["placement_bytes"]["disk"] == every
    assert traced["serving"]["disk_read_bytes_per_request"] == m["disk_read_bytes_per_request"] == 4 * (
        every - EMBED)
    assert traced["peak_bytes"] == m["peak_bytes"]


def test_report_shows_disk_bytes_and_reads(offload_runs):
    from peftprof.report import render_html
    from peftprof.report_inference import serving_rows

    _, rec, _, _ = offload_runs["none"]
    every = 2 * (LAYER + ADAPTER) + 2 * EMBED + NORM
    row = serving_rows([rec], "B", 1)[0]
    assert row["disk meas. (B)"] == row["disk est. (B)"] == f"{every:,.3f}"
    assert row["disk reads/token est. (B)"] == f"{every:,.3f}"
    assert row["disk reads/request meas. (B)"] == row["disk reads/request est. (B)"] == f"{4 * every:,.3f}"
    html = render_html([rec], "offload")
    for col in ("disk est.", "disk meas.", "disk reads/token est.", "disk reads/request meas."):
        assert col in html
    _, rec_all, _, _ = offload_runs["all"]  # nothing on disk: the columns still say so (0), not absent
    assert serving_rows([rec_all], "B", 1)[0]["disk est. (B)"] == "0.000"
