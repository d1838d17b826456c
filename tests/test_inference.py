"""[inference]: serving memory and latency. KV cache bytes against hand computations, the runner against the
analytic and trace estimates on a tiny GQA llama, the loader's refusals, and the report's serving section."""

import pytest
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.errors import UserError
from peftprof.estimate import estimate
from peftprof.estimate.inference import kv_cache_bytes_per_token_per_layer, kv_cache_tokens
from peftprof.scenario import load_scenario

# a GQA llama: 4 query heads, 2 KV heads of 32 dims, 2 layers
SERVE = '''[model]
model_type = "llama"
hidden_size = 128
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 344
vocab_size = 2000
[precision]
weights = "fp32"
[peft]
method = "lora"
r = 8
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 32
[inference]
enabled = true
max_new_tokens = 8
[run]
device = "cpu"
steps = 1
warmup_steps = 0
'''


def _preset(write_scenario, preset: str, weights: str = "bf16", name: str = "p.toml"):
    return load_scenario(write_scenario(f'[model]\npreset = "{preset}"\n[precision]\nweights = "{weights}"\n'
                                        '[inference]\nenabled = true\nmax_new_tokens = 16\n', name))[0]


def test_kv_cache_bytes_per_token_per_layer_by_hand(write_scenario):
    # Llama-3-8B (GQA): 8 KV heads x head_dim 128 (4096 / 32 heads), a key and a value, bf16: 2*8*128*2 B
    s = _preset(write_scenario, "llama-3-8b")
    assert kv_cache_bytes_per_token_per_layer(s.model.arch, 2) == 4096
    assert estimate(s, device="cuda")["kv_cache_bytes_per_token_per_layer"] == 4096
    # Llama-2-7B (MHA): 32 KV heads x 128: 16384 B; Gemma-2B (MQA): 1 KV head x head_dim 256: 1024 B
    assert kv_cache_bytes_per_token_per_layer(_preset(write_scenario, "llama-2-7b").model.arch, 2) == 16384
    assert kv_cache_bytes_per_token_per_layer(_preset(write_scenario, "gemma-2b").model.arch, 2) == 1024
    # the whole cache of Llama-3-8B, batch 1, 512 prompt tokens + 16 new (the last one is never fed back):
    # 32 layers x 527 tokens x 4096 B
    s = load_scenario(write_scenario('[model]\npreset = "llama-3-8b"\n[training]\nseq_len = 512\n'
                                     '[inference]\nenabled = true\nmax_new_tokens = 16\n', "k.toml"))[0]
    assert estimate(s, device="cuda")["kv_cache_bytes"] == 32 * 527 * 4096


def test_sliding_window_layers_keep_the_window(write_scenario):
    s = load_scenario(write_scenario(SERVE.replace('"llama"', '"mistral"\nsliding_window = 24')))[0]
    a = s.model.arch
    assert a.n_sliding_layers == 2
    # cache_utils.py DynamicSlidingWindowLayer: after decode steps the storage is min(tokens, window)
    assert kv_cache_tokens(a, 32, 8) == (39, 24)
    assert kv_cache_tokens(a, 32, 1) == (32, 32)  # prefill only: the whole prompt's storage
    assert kv_cache_tokens(a, 10, 8) == (17, 17)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Runner records (generation, forward only, merged, 3 adapters, mistral sliding) with both estimates."""
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    d = tmp_path_factory.mktemp("serve")
    texts = {"generate": SERVE, "forward": SERVE.replace("max_new_tokens = 8", "max_new_tokens = 0"),
             "merged": SERVE.replace("enabled = true", "enabled = true\nmerged = true"),
             "adapters": SERVE.replace('"v_proj"]', '"v_proj"]\nnum_adapters = 3'),
             "sliding": SERVE.replace('"llama"', '"mistral"\nsliding_window = 24').replace(
                 'weights = "fp32"', 'weights = "bf16"').replace('["q_proj", "v_proj"]', '"all-linear"')}
    out = {}
    for key, text in texts.items():
        path = d / f"{key}.toml"
        path.write_text(text)
        s = load_scenario(path)[0]
        out[key] = (s, run_variant(s, device="cpu"), trace_peak(s))
    return out


def test_runner_measures_serving_and_estimates_agree(measured):
    for key, (_s, rec, traced) in measured.items():
        assert rec["status"] == "ok", (key, rec["error"])
        m = rec["measured"]
        assert m["mode"] == "inference" and m["latency_ms"] > 0 and m["tokens_per_s"] > 0
        assert sum(m["breakdown"].values()) == m["peak_bytes"]
        assert m["breakdown"]["gradients"] == m["breakdown"]["optimizer"] == 0
        # the trace runs the same request on fake tensors: within 0.5% (exact here)
        assert abs(traced["peak_bytes"] - m["peak_bytes"]) <= 0.005 * m["peak_bytes"], key
        # the analytic estimate: within 2% on these tiny configs
        err = (rec["estimate"]["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"]
        assert abs(err) < 0.02, (key, err, rec["estimate"]["breakdown"], m["breakdown"])


def test_kv_cache_measured_equals_hand_count(measured):
    # GQA llama fp32: 2 layers x (key + value) x batch 2 x 2 KV heads x 32 dims x 4 B x (32 + 8 - 1) tokens
    s, rec, _ = measured["generate"]
    assert rec["measured"]["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 32 * 4 * 39 == rec["estimate"]["kv_cache_bytes"]
    # mistral bf16 with a 24-token window on both layers: the storage holds min(39, 24) tokens
    s, rec, _ = measured["sliding"]
    assert rec["measured"]["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 32 * 2 * 24 == rec["estimate"]["kv_cache_bytes"]


def test_merged_and_resident_adapters(measured):
    unmerged, merged, three = (measured[k][1]["measured"] for k in ("generate", "merged", "adapters"))
    one_adapter = 2 * (8 * 128 + 128 * 8 + 8 * 128 + 64 * 8) * 4  # q and v per layer, LoRA A and B, fp32
    assert unmerged["breakdown"]["trainable"] == one_adapter and unmerged["n_adapters"] == 1
    assert three["breakdown"]["trainable"] == 3 * one_adapter and three["n_adapters"] == 3
    assert merged["breakdown"]["trainable"] == 0 and merged["n_adapters"] == 0
    assert merged["breakdown"]["weights"] == unmerged["breakdown"]["weights"]  # folded in place
    # the merged model computes what the unmerged one does (LoRA B made non-zero first)
    assert measured["merged"][1]["checks"]["merge_max_abs_diff"] < 1e-4


def test_loader_refuses_training_settings_and_bad_combinations(write_scenario):
    text = SERVE.replace("seq_len = 32", 'seq_len = 32\noptimizer = "sgd"\ngradient_checkpointing = "full"\n'
                         "grad_accum_steps = 2").replace("[run]", "[distributed]\nworld_size = 2\n[run]").replace(
        "enabled = true", 'enabled = true\nmerged = true\nmax_memory = "lots"')
    path = write_scenario(text.replace("method = \"lora\"", "method = \"prompt_tuning\"").replace(
        "r = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]", ""))
    with pytest.raises(UserError) as e:
        load_scenario(path)
    lines = "\n".join(e.value.lines())
    for expected in ("[training] optimizer: inference with an optimizer", "[training] gradient_checkpointing",
                     "[training] grad_accum_steps", "[distributed] world_size", "[inference] merged: merging needs "
                     "an adapter method", "[inference] max_memory: 'lots' is not a size accelerate reads"):
        assert expected in lines, (expected, lines)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_loader_refuses_unmergeable_and_too_long(write_scenario):
    bad = SERVE.replace('weights = "fp32"', 'weights = "nf4"').replace('method = "lora"', 'method = "ia3"').replace(
        "r = 8\n", "").replace("enabled = true", "enabled = true\nmerged = true\nmax_memory = \"1GiB\"").replace(
        "max_new_tokens = 8", "max_new_tokens = 4090")
    with pytest.raises(UserError) as e:
        load_scenario(write_scenario(bad))
    lines = "\n".join(e.value.lines())
    assert "peft cannot merge ia3 into nf4 quantized weights" in lines
    assert "offloading nf4 quantized weights" in lines
    assert "exceeds the model's max_position_embeddings 2048" in lines
    many = SERVE.replace('"v_proj"]', '"v_proj"]\nnum_adapters = 2').replace("enabled = true",
                                                                              "enabled = true\nmerged = true")
    with pytest.raises(UserError, match="a merged model serves one adapter"):
        load_scenario(write_scenario(many, "m.toml"))


def test_inference_keys_without_enabled_are_not_applicable(write_scenario):
    # in a sweep, serving keys apply where serving is on and are recorded as not applicable elsewhere
    text = SERVE.replace("enabled = true\n", "merged = true\n") + '[sweep]\n"inference.enabled" = [false, true]\n'
    off, on = load_scenario(write_scenario(text))
    assert not off.inference.enabled and not off.inference.merged and "inference.merged" in off.not_applicable
    assert on.inference.enabled and on.inference.merged and not on.not_applicable
    with pytest.raises(UserError, match=r"\[inference\] merged: applies only with \[inference\] enabled = true"):
        load_scenario(write_scenario(SERVE.replace("enabled = true", "enabled = false\nmerged = true"), "o.toml"))


def test_offloading_is_estimated(write_scenario):
    # measured against the runner in tests/test_offload.py; here: the analytic estimate answers with the placement
    s = load_scenario(write_scenario(SERVE.replace("enabled = true", 'enabled = true\nmax_memory = "3MB"')))[0]
    est = estimate(s, device="cpu")
    placed = est["placement_bytes"]
    assert placed["disk"] > 0 and placed["cpu"] > 0 and est["disk_bytes"] == placed["disk"]
    assert est["peak_bytes"] < estimate(load_scenario(write_scenario(SERVE, "all.toml"))[0], device="cpu")["peak_bytes"]


def test_report_shows_the_serving_section(measured, tmp_path):
    from peftprof.report import render_html, render_markdown

    records = [measured[k][1] for k in ("generate", "merged")]
    md = render_markdown(records)
    assert "| variant | merged | new tokens |" in md and "(serving," in md
    page = render_html(records, "serving")
    assert "Serving: latency against memory" in page


def test_training_records_have_no_serving_section():
    from peftprof.report_inference import markdown_lines

    assert markdown_lines([{"variant": "x", "scenario": {"inference": {"enabled": False}}}], "MiB", 1 << 20) == []


def test_trace_refuses_long_generation_and_the_analytic_answers(write_scenario):
    from peftprof.trace import TraceTooLarge, trace_estimate, trace_peak

    s = load_scenario(write_scenario(SERVE.replace("max_new_tokens = 8", "max_new_tokens = 200")))[0]
    with pytest.raises(TraceTooLarge, match="2 layers x 200 forwards"):
        trace_peak(s)
    est = trace_estimate(s, device="cpu")  # falls back to the analytic estimate, and says so
    assert est["method"] == "analytic" and "the analytic estimate answers instead" in est["note"]


def test_loader_refuses_serving_an_image_classifier(write_scenario):
    text = ('[model]\nmodel_type = "vit"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
            'intermediate_size = 128\nimage_size = 32\npatch_size = 8\n[peft]\ntarget_modules = ["query", "value"]\n'
            '[inference]\nenabled = true\n')
    with pytest.raises(UserError, match=r"\[inference\] enabled: serving is modelled for causal language models"):
        load_scenario(write_scenario(text))


def test_prompt_tuning_cache_grows_by_the_virtual_tokens_each_step(write_scenario):
    # peft 0.21 re-prepends the virtual tokens on every decode step under transformers 5 (estimate/inference.py):
    # 1 layer x (key + value) x batch 1 x 2 KV heads x 32 dims x 4 B x (16 + 4 + 3 x (1 + 4)) tokens
    from peftprof.run.runner import run_variant

    text = SERVE.replace('method = "lora"\nr = 8\ntarget_modules = ["q_proj", "v_proj"]',
                         'method = "prompt_tuning"\nnum_virtual_tokens = 4').replace(
        "num_hidden_layers = 2", "num_hidden_layers = 1").replace("batch_size = 2\nseq_len = 32",
                                                                  "batch_size = 1\nseq_len = 16").replace(
        "max_new_tokens = 8", "max_new_tokens = 4")
    s = load_scenario(write_scenario(text))[0]
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec["error"]
    expected = 2 * 2 * 32 * 4 * (16 + 4 + 3 * 5)
    assert rec["measured"]["kv_cache_bytes"] == expected == rec["estimate"]["kv_cache_bytes"]


def test_loader_refuses_ia3_on_bitsandbytes_when_serving(write_scenario):
    text = SERVE.replace('weights = "fp32"', 'weights = "int8"\ncompute_dtype = "bf16"').replace(
        'method = "lora"\nr = 8\ntarget_modules = ["q_proj", "v_proj"]', 'method = "ia3"')
    with pytest.raises(UserError, match="SDPA refuses the mixed query/key dtypes"):
        load_scenario(write_scenario(text))
