"""`[model] hub`: config.json from a Hugging Face cache laid out like the real one, and from a local stand-in
for the hub's HTTP API (no network): only config.json is fetched, offline mode and errors give one line."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from peftprof import hub
from peftprof.arch import build_arch, family_fields, resolve_keys
from peftprof.catalog import model_presets

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Qwen/Qwen3-8B config.json as published (keys that change no tensor size included)
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
            "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936}


def put_in_cache(root, repo_id: str, config, *, commit: str = COMMIT, ref: str = "main"):
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, blobs/<etag>, snapshots/<commit>/config.json
    -> ../../blobs/<etag>}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    blob = repo / "blobs" / hashlib.sha1(text.encode()).hexdigest()  # git's blob id stands in for the etag
    blob.write_text(text)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").symlink_to(f"../../blobs/{blob.name}")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-home" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return root


def test_qwen3_8b_from_the_cache_equals_the_preset(hf_cache):
    put_in_cache(hf_cache, "Qwen/Qwen3-8B", QWEN3_8B)
    config, path = hub.hub_config("Qwen/Qwen3-8B")
    assert path == hf_cache / "models--Qwen--Qwen3-8B" / "snapshots" / COMMIT / "config.json"
    fields = family_fields(config)
    arch = build_arch(resolve_keys(fields.pop("model_type"), fields))
    preset = dict(model_presets()["qwen3-8b"])
    assert arch.n_params == build_arch(resolve_keys(preset.pop("model_type"), preset)).n_params == 8_190_735_360


def test_hf_hub_cache_wins_over_hf_home_and_revisions_resolve(hf_cache, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    with pytest.raises(hub.HubError, match="no config.json in the local Hugging Face cache"):
        hub.hub_config("Qwen/Qwen3-8B")
    put_in_cache(other, "Qwen/Qwen3-8B", QWEN3_8B)
    put_in_cache(other, "Qwen/Qwen3-8B", {**QWEN3_8B, "num_hidden_layers": 2}, commit="f" * 40, ref="v2")
    assert hub.hub_config("Qwen/Qwen3-8B")[0]["num_hidden_layers"] == 36
    assert hub.hub_config("Qwen/Qwen3-8B", revision="v2")[0]["num_hidden_layers"] == 2
    assert hub.hub_config("Qwen/Qwen3-8B", revision="f" * 40)[0]["num_hidden_layers"] == 2


def test_offline_with_nothing_cached_names_the_model_and_how_to_supply_it(hf_cache):
    with pytest.raises(hub.HubError) as err:
        hub.hub_config("meta-llama/Llama-3.1-8B")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("meta-llama/Llama-3.1-8B: no config.json in the local Hugging Face cache (")
    assert "HF_HUB_OFFLINE is set" in msg and 'config = "path/to/config.json"' in msg
    with pytest.raises(hub.HubError, match=r"at revision 'v9'"):
        hub.hub_config("meta-llama/Llama-3.1-8B", revision="v9")


@pytest.mark.parametrize("config, message", [
    ({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
      "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}},
     r"needs custom code \(auto_map: AutoModelForCausalLM -> modeling_x.XForCausalLM\); peftprof never runs remote"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768},
     r"bert is not a decoder-only causal LM \(architectures: BertForMaskedLM\)"),
    ({"model_type": "t5", "is_encoder_decoder": True, "architectures": ["T5ForConditionalGeneration"]},
     "t5 is an encoder-decoder model, not a decoder-only causal LM"),
    ({"model_type": "not_a_model", "architectures": ["XForCausalLM"]}, "model_type 'not_a_model' is unknown to"),
    ({"hidden_size": 64}, "config.json has no model_type"),
    ("{not json", "config.json is not valid JSON"),
    ([1, 2], "config.json must hold a JSON object"),
])
def test_configs_that_cannot_be_profiled_are_refused_in_one_line(hf_cache, config, message):
    put_in_cache(hf_cache, "org/model", config if isinstance(config, (dict, str)) else json.dumps(config))
    with pytest.raises(hub.HubError, match=message) as err:
        hub.hub_config("org/model")
    assert str(err.value).startswith("org/model: ") and "\n" not in str(err.value)


def test_a_decoder_outside_the_registry_passes_for_the_trace(hf_cache):
    put_in_cache(hf_cache, "allenai/OLMo-2-1124-7B", {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"],
                                                       "hidden_size": 4096})
    config, _ = hub.hub_config("allenai/OLMo-2-1124-7B")
    assert config["model_type"] == "olmo2"


def test_gemma3_multimodal_config_becomes_its_text_model(hf_cache):
    put_in_cache(hf_cache, "google/gemma-3-12b-it", {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                        "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"}})
    config, _ = hub.hub_config("google/gemma-3-12b-it")
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262_208 and config["head_dim"] == 256
    fields = family_fields(config)
    assert build_arch(resolve_keys(fields.pop("model_type"), fields)).n_params == 11_766_034_176


@pytest.mark.parametrize("repo_id", ["Qwen3-8B", "a/b/c", "", "org/na me", 7])
def test_malformed_ids_are_refused_before_any_lookup(hf_cache, repo_id):
    with pytest.raises(hub.HubError, match=r"is not a hub model id \(allowed: \"org/name\""):
        hub.hub_config(repo_id)


class _FakeHub(BaseHTTPRequestHandler):
    """The two requests hf_hub_download makes for one file (HEAD for metadata, GET for the bytes), answering
    like huggingface.co: X-Error-Code for gated / missing repos, X-Repo-Commit and ETag for a file."""

    routes: dict = {}
    seen: list = []

    def _answer(self, body: bool):
        self.seen.append((self.command, self.path))
        repo = "/".join(self.path.strip("/").split("/")[:2])
        kind = self.routes.get(repo, "RepoNotFound")
        if kind in ("GatedRepo", "RepoNotFound"):
            self.send_response(403 if kind == "GatedRepo" else 404)
            self.send_header("X-Error-Code", kind)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not self.path.endswith("/config.json"):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(kind).encode()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + "c" * 40 + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(hf_cache, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    _FakeHub.routes, _FakeHub.seen = {}, []
    yield _FakeHub
    server.shutdown()
    server.server_close()
    thread.join()


def test_online_fetches_config_json_only_into_the_cache(fake_hub, hf_cache):
    fake_hub.routes["Qwen/Qwen3-8B"] = QWEN3_8B
    config, path = hub.hub_config("Qwen/Qwen3-8B")
    assert config["hidden_size"] == 4096 and path.is_relative_to(hf_cache)
    # file requests (huggingface_hub may also GET its own /api/... metadata): config.json, nothing else
    assert {p for _, p in fake_hub.seen if "/resolve/" in p} == {"/Qwen/Qwen3-8B/resolve/main/config.json"}
    assert (hf_cache / "models--Qwen--Qwen3-8B" / "refs" / "main").read_text() == COMMIT


@pytest.mark.parametrize("route, message", [
    ("GatedRepo", r"org/gated is gated: accept its license on huggingface.co and log in \(`hf auth login`, or set "
                  r"HF_TOKEN\), or give the file: config = "),
    ("RepoNotFound", r"no model org/gated on the hub \(or it is private"),
])
def test_gated_and_missing_repos_say_what_to_do(fake_hub, route, message):
    fake_hub.routes["org/gated"] = route
    with pytest.raises(hub.HubError, match=message) as err:
        hub.hub_config("org/gated")
    assert "\n" not in str(err.value)


def test_unreachable_hub_falls_back_to_the_cache_and_else_says_so(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    put_in_cache(hf_cache, "Qwen/Qwen3-8B", QWEN3_8B)
    assert hub.hub_config("Qwen/Qwen3-8B")[0]["num_hidden_layers"] == 36
    with pytest.raises(hub.HubError, match=r"no config.json in the local Hugging Face cache .* and the hub cannot be "
                                           r"reached: download it"):
        hub.hub_config("mistralai/Mixtral-8x7B-v0.1")


# --- `[model] hub` in scenario files ----------------------------------------------------------------------------
# Qwen3-8B's published config.json with the sizes cut down (the trace of 36 layers at hidden 4096 would take a
# minute): the keys, nulls and types stay as published
QWEN3_TINY = {**QWEN3_8B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300}


# a custom architecture (transformers has no such model_type): it would need trust_remote_code
CUSTOM = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "hidden_size": 64,
          "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}


def _validate(path):
    from click.testing import CliRunner

    from peftprof.cli import cli

    result = CliRunner().invoke(cli, ["validate", str(path)])
    return result.exit_code, result.stderr.splitlines()


def test_hub_model_loads_and_estimate_answers_through_the_trace(hf_cache, write_scenario, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from peftprof.cli import cli
    from peftprof.scenario import load_scenario

    monkeypatch.setenv("PEFTPROF_CACHE", str(tmp_path / "trace-cache"))
    put_in_cache(hf_cache, "Qwen/Qwen3-8B", QWEN3_TINY)
    path = write_scenario('[model]\nhub = "Qwen/Qwen3-8B"\n[training]\nbatch_size = 1\nseq_len = 16\n')
    (s,) = load_scenario(path)
    assert (s.model.hub, s.model.revision, s.model.preset, s.model.config_file) == ("Qwen/Qwen3-8B", None, None, None)
    assert s.model.arch.model_type == "qwen3" and s.model.arch.head_dim == 32
    assert s.model.config["sliding_window"] is None  # the published null is passed on (no window), not 4096
    assert s.to_dict()["model"]["hub"] == "Qwen/Qwen3-8B" and "revision" not in s.to_dict()["model"]
    result = CliRunner().invoke(cli, ["estimate", str(path), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["estimate"]["method"] == "analytic" and row["estimate"]["peak_bytes"] > 0
    assert row["scenario"]["model"]["hub"] == "Qwen/Qwen3-8B"
    assert row["estimate"]["n_params"] == s.model.arch.n_params
    assert "note:" not in result.stderr  # qwen3 is modelled analytically: no fallback to the trace


def test_hub_revision_is_recorded_and_changes_the_settings_key(hf_cache, write_scenario):
    from peftprof.scenario import load_scenario

    put_in_cache(hf_cache, "Qwen/Qwen3-8B", QWEN3_TINY)
    put_in_cache(hf_cache, "Qwen/Qwen3-8B", {**QWEN3_TINY, "num_hidden_layers": 3}, commit="f" * 40, ref="v2")
    (main,) = load_scenario(write_scenario('[model]\nhub = "Qwen/Qwen3-8B"\n', name="a.toml"))
    (v2,) = load_scenario(write_scenario('[model]\nhub = "Qwen/Qwen3-8B"\nrevision = "v2"\n', name="b.toml"))
    assert (main.model.arch.n_layers, v2.model.arch.n_layers) == (2, 3)
    assert v2.model.revision == "v2" and v2.to_dict()["model"]["revision"] == "v2"
    assert main.settings_key() != v2.settings_key()


@pytest.mark.parametrize("config, message", [
    (None, "Qwen/Qwen3-8B: no config.json in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
           "download it (`hf download Qwen/Qwen3-8B config.json`) or give the file: config = \"path/to/config.json\""),
    (CUSTOM, "Qwen/Qwen3-8B: needs custom code (auto_map: AutoModelForCausalLM -> modeling_x.XForCausalLM); peftprof never "
     "runs remote code"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768},
     "Qwen/Qwen3-8B: bert is not a decoder-only causal LM (architectures: BertForMaskedLM)"),
], ids=["offline-nothing-cached", "custom-code", "encoder-only"])
def test_hub_models_that_cannot_be_profiled_exit_2_in_one_line(hf_cache, write_scenario, config, message):
    if config is not None:
        put_in_cache(hf_cache, "Qwen/Qwen3-8B", config)
    path = write_scenario('[model]\nhub = "Qwen/Qwen3-8B"\n')
    code, lines = _validate(path)
    assert (code, lines) == (2, [f"error: {path}: [model] hub: {message.format(cache=hf_cache)}"])


@pytest.mark.parametrize("config, message", [
    (CUSTOM, "needs custom code (auto_map: AutoModelForCausalLM -> modeling_x.XForCausalLM); peftprof never runs "
             "remote code"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768},
     "bert is not a decoder-only causal LM (architectures: BertForMaskedLM)"),
    ({"model_type": "t5", "is_encoder_decoder": True}, "t5 is an encoder-decoder model, not a decoder-only causal LM"),
], ids=["custom-code", "encoder-only", "encoder-decoder"])
def test_config_files_are_refused_like_hub_configs(write_scenario, tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = write_scenario('[model]\nconfig = "config.json"\n')
    assert _validate(path) == (2, [f"error: {path}: [model] config: config.json: {message}"])


def test_a_multimodal_config_file_is_read_as_its_text_model(write_scenario, tmp_path):
    from peftprof.scenario import load_scenario

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                        "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 300,
                        "final_logit_softcapping": None, "attn_logit_softcapping": None}}))
    (s,) = load_scenario(write_scenario('[model]\nconfig = "config.json"\n'))
    assert s.model.arch.model_type == "gemma3_text" and s.model.arch.attn_softcap is None


@pytest.mark.parametrize("model, line", [
    ('preset = "tiny-llama"\nhub = "Qwen/Qwen3-8B"',
     "[model] hub: give only one of preset, config and hub (got preset and hub)"),
    ('config = "c.json"\nhub = "Qwen/Qwen3-8B"', "[model] hub: give only one of preset, config and hub "
                                                  "(got config and hub)"),
    ('preset = "tiny-llama"\nrevision = "main"',
     "[model] revision: applies only with hub (the revision of a hub model) (allowed: hub = \"org/name\")"),
    ('hub = "Qwen3-8B"', "[model] hub: 'Qwen3-8B' is not a hub model id (allowed: \"org/name\", e.g. "
                         "\"Qwen/Qwen3-8B\")"),
    ('hub = "Qwen/Qwen3-8B"\nmodel_type = "llama"', "[model] model_type: \"llama\" differs from the hub's \"qwen3\""),
])
def test_hub_key_combinations_are_checked(hf_cache, write_scenario, model, line):
    put_in_cache(hf_cache, "Qwen/Qwen3-8B", QWEN3_TINY)
    path = write_scenario(f"[model]\n{model}\n")
    assert _validate(path) == (2, [f"error: {path}: {line}"])


def test_a_registry_family_that_also_publishes_auto_map_loads(hf_cache, write_scenario):
    """microsoft/Phi-3.5-mini-instruct's config.json names its own configuration_phi3.py / modeling_phi3.py in
    auto_map; phi3 is a registry family, built from transformers' classes: nothing of the auto_map runs."""
    from peftprof.scenario import load_scenario

    put_in_cache(hf_cache, "microsoft/Phi-3.5-mini-instruct", {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "vocab_size": 32064,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}})
    (s,) = load_scenario(write_scenario('[model]\nhub = "microsoft/Phi-3.5-mini-instruct"\n[peft]\n'
                                        'target_modules = ["qkv_proj"]\n'))
    assert s.model.arch.model_type == "phi3" and "auto_map" not in s.model.config


# tiiuae/falcon-7b's config.json as published (sizes shrunk): a model_type outside the registry, built by
# transformers' own FalconForCausalLM through the generic path (families/generic.py)
FALCON_TINY = {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
               "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
               "hidden_size": 64, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
               "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 4,
               "num_hidden_layers": 2, "parallel_attn": True, "torch_dtype": "bfloat16",
               "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 300}


def test_a_hub_model_outside_the_registry_loads_through_the_generic_path(hf_cache, write_scenario):
    from transformers import AutoModelForCausalLM, FalconConfig

    from peftprof.scenario import load_scenario

    put_in_cache(hf_cache, "tiiuae/falcon-7b", FALCON_TINY)
    (s,) = load_scenario(write_scenario('[model]\nhub = "tiiuae/falcon-7b"\n'))
    a = s.model.arch
    assert s.model.hub == "tiiuae/falcon-7b" and "architectures" not in s.model.config
    keys = {k: v for k, v in FALCON_TINY.items() if k not in ("architectures", "torch_dtype", "transformers_version",
                                                              "use_cache", "model_type")}
    real = AutoModelForCausalLM.from_config(FalconConfig(**keys))
    assert a.n_params == real.num_parameters()
    # multi_query: one kv head; query_key_value 64 -> (4 + 2) x 16 (modeling_falcon.py FalconAttention)
    assert (a.n_kv_heads, a.layer_linears[0].path, a.layer_linears[0].out_features) == (
        1, "self_attention.query_key_value", 96)
    assert s.peft.targets(a) == ("query_key_value",)  # peft's default for falcon


def test_a_hub_model_outside_the_registry_without_its_sizes_exits_2(hf_cache, write_scenario):
    put_in_cache(hf_cache, "tiiuae/falcon-7b", {k: v for k, v in FALCON_TINY.items() if k != "vocab_size"})
    path = write_scenario('[model]\nhub = "tiiuae/falcon-7b"\n')
    assert _validate(path) == (2, [f"error: {path}: [model]: missing required architecture keys: vocab_size (in "
                                   "tiiuae/falcon-7b config.json); transformers' FalconConfig would default them to a "
                                   "full-size model"])
