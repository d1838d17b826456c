"""The generic path (peftprof/families/generic.py): a decoder-only causal LM outside the registry, built by
transformers from its config, profiled by the trace and the runner; everything else refused in one line."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from peftprof import trace as trace_mod
from peftprof.cli import cli
from peftprof.families import REGISTRY, family, generic
from peftprof.families.base import Arch
from peftprof.scenario import load_scenario

# Tiny configs of model types outside the registry, each with a detail the registry families lack: falcon's
# fused query_key_value, grouped kv heads and two parallel LayerNorms (new_decoder_architecture); gpt_neox's
# fused qkv with biases, sequential residual and untied lm_head; starcoder2's biased attention and c_fc/c_proj MLP;
# olmo2's q/k norms over all heads and post-norms.
TINY = {
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                   new_decoder_architecture=True, num_kv_heads=2),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                     intermediate_size=96, use_parallel_residual=False),
    "starcoder2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=300, intermediate_size=96, bos_token_id=0, eos_token_id=0),
    "olmo2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=300, intermediate_size=96, pad_token_id=1, eos_token_id=0),
}


def toml_model(model_type: str, **extra) -> str:
    keys = {"model_type": model_type, **TINY[model_type], **extra}
    return "[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def real_model(model_type: str):
    conf = CONFIG_MAPPING[model_type](**TINY[model_type])
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_arch_is_the_module_tree_of_the_real_model(write_scenario, model_type):
    (s,) = load_scenario(write_scenario(toml_model(model_type) + '[peft]\ntarget_modules = "all-linear"\n'))
    a = s.model.arch
    assert model_type not in REGISTRY and not family(model_type).analytic
    model = real_model(model_type)  # real CPU tensors, built apart from peftprof's meta build
    assert a.n_params == model.num_parameters()
    # the per-layer formula of Arch (uniform layers) plus the parameters outside the layers gives the same count
    assert a.uniform_layers and Arch.n_params.fget(a) + sum(p.numel for p in a.model_params) == a.n_params
    layer = model.get_decoder().layers[0] if hasattr(model.get_decoder(), "layers") else model.get_decoder().h[0]
    linears = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert {s.path: (s.in_features, s.out_features, s.bias) for s in a.layer_linears} == linears
    assert (a.n_layers, a.hidden_size, a.vocab_size, a.n_heads) == (2, 64, 300, 4)
    assert a.tied_embeddings == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def test_falcon_counted_by_hand(write_scenario):
    """FalconDecoderLayer with new_decoder_architecture (modeling_falcon.py): query_key_value 64 -> (4 + 2*2)
    heads x 16 = 128, dense 64 -> 64, dense_h_to_4h 64 -> 256, dense_4h_to_h 256 -> 64, no biases, ln_attn and
    ln_mlp (weight + bias, 64 each); tied embeddings 300 x 64; ln_f 2 x 64."""
    (s,) = load_scenario(write_scenario(toml_model("falcon")))
    a = s.model.arch
    per_layer = 64 * 128 + 64 * 64 + 64 * 256 + 256 * 64 + 2 * 2 * 64
    assert a.n_params == 2 * per_layer + 300 * 64 + 2 * 64 == 109_952
    assert (a.n_kv_heads, a.head_dim, a.tied_embeddings, a.norm) == (2, 16, True, "layer")
    # LoRA on peft's default falcon target, query_key_value: r x (in + out) per layer (peft/tuners/lora/layer.py)
    assert family("falcon").lora_targets == ("query_key_value",)
    assert s.peft.targets(a) == ("query_key_value",)


SCENARIOS = {  # (model, peft and training keys): peft defaults, target lists, all-linear, IA3, checkpointing
    "falcon-default-ckpt": ("falcon", '[training]\ngradient_checkpointing = "full"\n'),
    "gpt_neox-all-linear": ("gpt_neox", '[peft]\ntarget_modules = "all-linear"\n'),
    "starcoder2-list-every2": ("starcoder2", '[peft]\ntarget_modules = ["q_proj", "c_fc"]\n'
                                             '[training]\ngradient_checkpointing = "every_2"\n'),
    "olmo2-ia3-bf16": ("olmo2", '[peft]\nmethod = "ia3"\ntarget_modules = ["k_proj", "down_proj"]\n'
                                '[precision]\nweights = "bf16"\n'),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_trace_equals_the_runner(write_scenario, monkeypatch, tmp_path, name):
    from peftprof.run.runner import run_variant

    monkeypatch.setattr(trace_mod, "CACHE_DIR", tmp_path / "cache")
    model_type, rest = SCENARIOS[name]
    text = toml_model(model_type) + rest.replace("[training]\n", "[training]\nbatch_size = 2\nseq_len = 48\n")
    if "[training]" not in rest:
        text += "[training]\nbatch_size = 2\nseq_len = 48\n"
    if "[precision]" not in rest:
        text += '[precision]\nweights = "fp32"\n'
    (s,) = load_scenario(write_scenario(text))
    record = run_variant(s, device="cpu", steps=1)
    assert record["status"] == "ok", record.get("error")
    est, measured = record["estimate"], record["measured"]
    assert est["method"] == "trace" and "from the trace alone" in est["note"]
    assert est["peak_bytes"] == measured["peak_bytes"], (est, measured)  # to the byte, as docs/models.md says
    assert est["n_params"] == s.model.arch.n_params
    if name == "falcon-default-ckpt":  # LoRA r=8 on query_key_value (64 -> 128): 8 x (64 + 128) per layer
        assert est["n_trainable_params"] == 2 * 8 * (64 + 128)
    if name == "olmo2-ia3-bf16":  # IA3 vectors on k_proj's outputs (2 kv heads x 16) and down_proj's outputs
        # (64): peft has no feed-forward default for olmo2, so down_proj is scaled on its output
        assert est["n_trainable_params"] == 2 * (32 + 64)


def test_checkpointing_reaches_a_generic_model(write_scenario, monkeypatch, tmp_path):
    monkeypatch.setattr(trace_mod, "CACHE_DIR", tmp_path / "cache")
    peaks = {}
    for policy in ("none", "full"):
        (s,) = load_scenario(write_scenario(toml_model("gpt_neox") + f'[training]\ngradient_checkpointing = "{policy}"'
                                            '\nbatch_size = 2\nseq_len = 64\n[precision]\nweights = "fp32"\n'))
        peaks[policy] = trace_mod.trace_peak(s)["breakdown"]["activations"]
    assert peaks["full"] < peaks["none"]


def test_estimate_falls_back_to_the_trace_and_says_so(write_scenario, monkeypatch, tmp_path):
    monkeypatch.setattr(trace_mod, "CACHE_DIR", tmp_path / "cache")
    path = write_scenario(toml_model("gpt_neox") + "[training]\nbatch_size = 1\nseq_len = 16\n")
    result = CliRunner().invoke(cli, ["estimate", str(path), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["estimate"]["method"] == "trace" and row["estimate"]["flops_per_step"] > 0
    assert result.stderr.startswith("note: s: model_type 'gpt_neox' is not in the analytic estimator's families (")
    assert "--method trace answers instead, from the trace alone" in result.stderr


def test_a_config_file_with_published_keys_loads(write_scenario, tmp_path):
    published = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "torch_dtype": "float16",
                 "transformers_version": "4.40.0", "use_cache": True, "_name_or_path": "x/y", **TINY["gpt_neox"],
                 "rope_scaling": None, "use_parallel_residual": False}
    (tmp_path / "config.json").write_text(json.dumps(published))
    (s,) = load_scenario(write_scenario('[model]\nconfig = "config.json"\n'))
    assert "torch_dtype" not in s.model.config and s.model.config["use_parallel_residual"] is False
    assert s.model.arch.n_params == real_model("gpt_neox").num_parameters()


def test_flops_are_omitted_where_layers_are_not_linears_and_attention():
    cfg = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 100}
    a = generic.build(cfg)
    assert a.n_heads == 0 and "no attention heads" in a.flops_gap
    assert generic.build({"model_type": "falcon", **TINY["falcon"]}).flops_gap is None


def validate(path):
    result = CliRunner().invoke(cli, ["validate", str(path)])
    return result.exit_code, result.stderr.splitlines()


ALLOWED = f"(allowed: {', '.join(REGISTRY)}, or any decoder-only causal LM model_type of transformers)"


@pytest.mark.parametrize("model, line", [
    ('model_type = "nope"\nhidden_size = 64',
     '[model] model_type: unsupported model_type "nope": unknown to transformers {version} ' + ALLOWED),
    ('model_type = "bert"\nhidden_size = 64',
     '[model] model_type: unsupported model_type "bert": an encoder-only model (a masked-LM encoder that '
     'transformers can also run as a decoder), not a decoder-only causal LM ' + ALLOWED),
    ('model_type = "t5"', '[model] model_type: unsupported model_type "t5": an encoder-decoder model, not a '
                          'decoder-only causal LM ' + ALLOWED),
    ('model_type = "mllama"', '[model] model_type: unsupported model_type "mllama": a multimodal model (its config '
                              "holds text_config, vision_config); give its language model's config (model_type "
                              "'mllama_text_model') instead " + ALLOWED),
    ('model_type = "falcon"\nhidden_size = 64\nnum_attention_heads = 4',
     "[model]: missing required architecture keys: num_hidden_layers, vocab_size; transformers' FalconConfig "
     "would default them to a full-size model"),
    ('model_type = "falcon"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nvocab_size = 300\n'
     'parallel_attn = "yes"',
     "[model] parallel_attn: FalconConfig rejects it: Field 'parallel_attn' with value 'yes' doesn't match any "
     "type in (bool, NoneType)"),
    ('model_type = "falcon"\nhidden_size = 64\nnum_hidden_layers = 0\nnum_attention_heads = 4\nvocab_size = 300',
     "[model] num_hidden_layers: out of range: 0 (allowed: integer >= 1 and <= 10,000,000)"),
    ('model_type = "falcon"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 5\nvocab_size = 300',
     "[model]: transformers cannot build falcon from this config: `hidden_size` must be divisible by num_heads "
     "(got `hidden_size`: 64 and `num_heads`: 5)."),
    ('model_type = "falcon"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nvocab_size = 300\n'
     'num_heads = 4', "[model] num_heads: does not apply to model_type 'falcon' (FalconConfig has no such field); "
                      "did you mean 'num_kv_heads'?"),
    ('model_type = ["llama"]\nhidden_size = 64', '[model] model_type: unsupported model_type ["llama"]: not a '
                                                  'model_type name ' + ALLOWED),
    ('model_type = {a = 1}', '[model] model_type: unsupported model_type {{"a": 1}}: not a model_type name ' + ALLOWED),
    ('model_type = "falcon"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nvocab_size = 300\n'
     'rope_parameters = {rope_type = "default", rope_theta = 10000.0, when = 1979-05-27}',
     "[model] rope_parameters: rope_parameters.when is a TOML date (1979-05-27), which a model config cannot hold "
     "(allowed: strings, numbers, booleans, arrays and tables of them)"),
], ids=["unknown", "encoder-only", "encoder-decoder", "multimodal", "missing", "rejected-by-config-class",
        "not-positive", "not-buildable", "unknown-key", "type-is-a-list", "type-is-a-table", "date-in-a-table"])
def test_bad_generic_models_exit_2_in_one_line(write_scenario, model, line):
    import transformers

    path = write_scenario(f"[model]\n{model}\n")
    code, lines = validate(path)
    assert code == 2 and len(lines) == 1, lines
    expected = f"error: {path}: {line.format(version=transformers.__version__)}"
    assert lines[0] == expected or (line.startswith("[model] num_heads") and lines[0].startswith(expected)), lines


def test_a_generic_models_own_config_key_can_be_swept(write_scenario, tmp_path):
    # use_parallel_residual is GPTNeoXConfig's own field (not a registry key): accepted inline, so in [sweep] too,
    # given inline or through the config file's model_type; a key the class lacks is still refused by the sweep
    base = {k: v for k, v in TINY["gpt_neox"].items() if k != "use_parallel_residual"}
    sweep = '[sweep]\n"model.use_parallel_residual" = [true, false]\n'
    variants = load_scenario(write_scenario(toml_model("gpt_neox").replace("use_parallel_residual = false\n", "")
                                            + sweep))
    assert [v.model.config["use_parallel_residual"] for v in variants] == [True, False]
    (tmp_path / "neox.json").write_text(json.dumps({"model_type": "gpt_neox", **base}))
    variants = load_scenario(write_scenario('[model]\nconfig = "neox.json"\n' + sweep))
    assert [v.model.config["use_parallel_residual"] for v in variants] == [True, False]
    code, lines = validate(write_scenario(toml_model("gpt_neox") + '[sweep]\n"model.num_kv_heads" = [1, 2]\n'))
    assert code == 2 and len(lines) == 1 and "[sweep] model.num_kv_heads: unknown key" in lines[0], lines


def test_custom_code_config_file_is_refused(write_scenario, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", **TINY["falcon"], "auto_map": {
        "AutoModelForCausalLM": "modeling_falcon.FalconForCausalLM"}}))
    assert validate(write_scenario('[model]\nconfig = "config.json"\n')) == (2, [
        f"error: {tmp_path / 's.toml'}: [model] config: config.json: needs custom code (auto_map: "
        "AutoModelForCausalLM -> modeling_falcon.FalconForCausalLM); peftprof never runs remote code"])


def test_no_peft_default_asks_for_target_modules(write_scenario):
    path = write_scenario(toml_model("starcoder2"))
    code, lines = validate(path)
    assert code == 2 and lines == [f"error: {path}: [peft] target_modules: peft has no default for starcoder2 "
                                   "(allowed: q_proj, k_proj, v_proj, o_proj, c_fc, c_proj)"]


def test_registry_scenarios_never_import_transformers(tmp_path):
    """The analytic estimate of a registry family, and `peftprof --help`, stay free of torch/transformers."""
    path = tmp_path / "s.toml"
    path.write_text('[model]\npreset = "tiny-llama"\n')
    code = ("import sys; from peftprof.scenario import load_scenario; from peftprof.estimate import estimate; "
            f"estimate(load_scenario({str(path)!r})[0], device='cpu'); import peftprof.cli; "
            "print(sorted(m for m in ('transformers', 'torch', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpointing_a_class_without_it_exits_2_in_one_line(write_scenario, monkeypatch, tmp_path):
    """openai-gpt's transformers class has supports_gradient_checkpointing = False: the loader refuses it, so
    `validate` says so before any estimator runs."""
    monkeypatch.setattr(trace_mod, "CACHE_DIR", tmp_path / "cache")
    path = write_scenario('[model]\nmodel_type = "openai-gpt"\nn_embd = 64\nn_layer = 2\nn_head = 4\nvocab_size = 300\n'
                          '[peft]\ntarget_modules = ["c_attn"]\n[training]\ngradient_checkpointing = "full"\n')
    assert not family("openai-gpt").checkpointing
    line = (f"error: {path}: [training] gradient_checkpointing: transformers' openai-gpt model does not support "
            "gradient checkpointing (allowed: none)")
    assert validate(path) == (2, [line])
    result = CliRunner().invoke(cli, ["estimate", str(path), "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.splitlines() == [line]


# more model types: Conv1D layers (openai-gpt), alibi without positions (bloom), parallel attention (gptj,
# codegen, phi), multi-query c_attn (gpt_bigcode), nested non-modal sub-configs (dbrx's attn_config/ffn_config)
MORE = {
    "openai-gpt": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, rotary_dim=8),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300),
    "phi": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300, intermediate_size=96),
    "cohere": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300, intermediate_size=96,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "dbrx": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=128,
                 attn_config=dict(rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=96, moe_num_experts=4)),
}


@pytest.mark.parametrize("model_type", sorted(MORE))
def test_more_model_types_are_read_off_their_module_tree(model_type):
    a = generic.build({"model_type": model_type, **MORE[model_type]})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**MORE[model_type]))
    assert a.n_params == model.num_parameters() and a.n_layers == 2 and a.hidden_size == 64
    # the per-layer sum (linears, their biases, the other layer parameters) times the layers, plus what lies
    # outside the layers, is every parameter once
    assert a.uniform_layers and Arch.n_params.fget(a) + sum(p.numel for p in a.model_params) == a.n_params
    assert a.layer_linears and all(s.in_features > 0 and s.out_features > 0 for s in a.layer_linears)
    if model_type == "openai-gpt":  # Conv1D stores (in, out): c_attn 64 -> 3 x 64
        assert (a.layer_linears[0].path, a.layer_linears[0].in_features, a.layer_linears[0].out_features) == (
            "attn.c_attn", 64, 192)
    if model_type == "dbrx":  # experts as 2-D parameters (E * ffn, hidden), not linears: flops.py cannot count them
        assert "ffn.experts.mlp.w1" in a.flops_gap
    else:
        assert a.flops_gap is None
    if model_type == "bloom":  # alibi: no learned positions, no position bound
        assert a.max_positions == generic.NO_POSITION_LIMIT


@pytest.mark.parametrize("model_type", ["falcon", "bloom"])
def test_sdpa_flag_matches_what_transformers_accepts(model_type):
    keys = TINY.get(model_type) or MORE[model_type]
    with torch.device("meta"):
        try:
            AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**keys), attn_implementation="sdpa")
            accepted = True
        except ValueError as e:
            assert "scaled_dot_product_attention" in str(e) or "sdpa" in str(e).lower()
            accepted = False
    assert accepted == family(model_type).sdpa == (model_type == "falcon")
