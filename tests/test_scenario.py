"""Scenario loading: defaults, sweeps, not-applicable keys, and a corpus of malformed files."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.errors import UserError
from peftprof.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
MALFORMED = sorted((ROOT / "tests" / "malformed").glob("*.toml"))
# files that cannot carry an "# expect:" comment
EXPECT_WITHOUT_COMMENT = {"01-empty.toml": "empty scenario", "03-binary.toml": "is not UTF-8 text"}


def expected_message(path: Path) -> str:
    if path.name in EXPECT_WITHOUT_COMMENT:
        return EXPECT_WITHOUT_COMMENT[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: "):]


def test_corpus_is_large_enough():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.name)
def test_malformed_scenario_exits_2_with_located_message(path):
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {path}" in result.output  # every line names the file
    assert expected_message(path) in result.output


def test_huge_file_is_rejected(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text("#" * (11 * 1024 * 1024))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert "the limit is 1,048,576" in result.output


def test_missing_file_and_directory(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.toml"), str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'nope.toml'}: no such file" in result.output
    assert f"error: {tmp_path}: is a directory, not a file" in result.output


def test_every_problem_of_a_file_is_reported_at_once():
    path = ROOT / "tests" / "malformed" / "40-many-problems.toml"
    with pytest.raises(UserError) as err:
        load_scenario(path)
    text = "\n".join(err.value.lines())
    assert "[peft] alpha: out of range: 0" in text
    assert "[peft] r: out of range: 0" in text
    assert "[training] optimizer: unknown value \"adam\"; did you mean 'adamw'?" in text
    assert len(err.value.lines()) == 3


def test_unknown_key_lists_valid_ones(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[run]\nsteps_per_epoch = 3\n')
    with pytest.raises(UserError) as err:
        load_scenario(p)
    assert err.value.lines() == [f"{p}: [run] steps_per_epoch: unknown key (allowed: device, steps, warmup_steps, seed)"]


def test_five_line_scenario_gets_defaults(write_scenario):
    (s,) = load_scenario(write_scenario('[model]\npreset = "tiny-llama"\n', name="five.toml"))
    assert s.name == "five"
    assert (s.precision.weights, s.precision.compute_dtype) == ("bf16", "bf16")
    assert (s.peft.method, s.peft.r, s.peft.alpha) == ("lora", 8, 16)
    assert s.peft.targets(s.model.arch) == ("q_proj", "v_proj")
    assert (s.training.batch_size, s.training.seq_len, s.training.optimizer) == (1, 512, "adamw")
    assert (s.run.device, s.run.steps) == ("auto", 5)


def test_settings_are_frozen(write_scenario):
    (s,) = load_scenario(write_scenario('[model]\npreset = "tiny-llama"\n'))
    with pytest.raises(AttributeError):
        s.training.batch_size = 3
    with pytest.raises(TypeError):
        s.model.config["hidden_size"] = 3


def test_sweep_names_and_not_applicable(write_scenario):
    p = write_scenario('''
name = "qlora"
[model]
preset = "tiny-llama"
[precision]
double_quant = true
compute_dtype = "bf16"
[sweep]
"precision.weights" = ["bf16", "nf4"]
"peft.r" = [8, 16]
''')
    variants = load_scenario(p)
    assert [v.name for v in variants] == [
        "qlora[precision.weights=bf16,peft.r=8]", "qlora[precision.weights=bf16,peft.r=16]",
        "qlora[precision.weights=nf4,peft.r=8]", "qlora[precision.weights=nf4,peft.r=16]"]
    assert variants[0].not_applicable == ("precision.double_quant",)
    assert variants[0].precision.double_quant is False
    assert variants[2].not_applicable == () and variants[2].precision.double_quant is True
    assert variants[3].peft.r == 16


def test_sweep_of_a_list_valued_key(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[sweep]\n"peft.target_modules" = [["q_proj", "v_proj"], "all-linear"]\n')
    a, b = load_scenario(p)
    assert a.name.endswith("[peft.target_modules=q_proj,v_proj]")
    assert b.peft.targets(b.model.arch) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_inline_keys_override_preset_and_sweep_model_keys(write_scenario):
    p = write_scenario('[model]\npreset = "llama-2-7b"\nnum_hidden_layers = 2\n[sweep]\n"model.hidden_size" = [256, 512]\n')
    a, b = load_scenario(p)
    assert a.model.arch.n_layers == 2 and a.model.arch.hidden_size == 256 and b.model.arch.hidden_size == 512
    assert a.model.arch.intermediate_size == 11008


def test_config_json_relative_to_scenario(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(
        '{"model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,'
        ' "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1000, "torch_dtype": "bfloat16",'
        ' "architectures": ["Qwen2ForCausalLM"], "auto_map": {"AutoModel": "evil.Model"}}')
    (tmp_path / "s.toml").write_text('[model]\nconfig = "cfg/config.json"\n[training]\nseq_len = 64\n')
    (s,) = load_scenario(tmp_path / "s.toml")
    assert s.model.config_file == "cfg/config.json"
    assert "auto_map" not in s.model.config  # nothing from a config can make us run code
    assert s.model.arch.n_kv_heads == 2 and s.model.arch.layer_linears[0].bias  # qwen2's qkv bias


def test_key_not_applicable_to_any_variant_is_an_error(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[peft]\nr = 8\n[sweep]\n"peft.method" = ["ia3", "full"]\n')
    with pytest.raises(UserError) as err:
        load_scenario(p)
    assert re.search(r"\[peft\] r: does not apply to method (ia3|full)", err.value.lines()[0])


def test_problem_in_some_variants_names_them(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[sweep]\n"training.seq_len" = [128, 4096]\n')
    with pytest.raises(UserError) as err:
        load_scenario(p)
    (line,) = err.value.lines()
    assert line.endswith("(in variant s[training.seq_len=4096])")


def test_prompt_tuning_counts_virtual_tokens_against_max_positions(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[peft]\nmethod = "prompt_tuning"\n'
                       'num_virtual_tokens = 20\n[training]\nseq_len = 2040\n')
    with pytest.raises(UserError) as err:
        load_scenario(p)
    assert "2040 + 20 virtual tokens exceeds" in err.value.lines()[0]


def test_all_shipped_scenarios_load():
    files = sorted((ROOT / "scenarios").glob("*.toml"))
    assert len(files) >= 10
    result = CliRunner().invoke(cli, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    for f in files:
        variants = load_scenario(f)
        assert variants and all(v.description for v in variants)
