"""Scenario loading: defaults, sweeps, not-applicable keys, and a corpus of malformed files."""

import re
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.errors import UserError
from peftprof.estimate.alloc_conf import ALLOWED as ALLOC_CONF_ALLOWED
from peftprof.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
MALFORMED = sorted((ROOT / "tests" / "malformed").glob("*.toml"))
# files that cannot carry an "# expect:" comment
EXPECT_WITHOUT_COMMENT = {"01-empty.toml": "empty scenario", "03-binary.toml": "is not UTF-8 text"}


def exact_errors(path: Path) -> list[str]:
    """The file's leading "# error: " comments: every line `validate` prints, in order, after "error: FILE: "."""
    if path.name in EXPECT_WITHOUT_COMMENT:
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        if line.startswith("# error: "):
            lines.append(line[len("# error: "):])
    return lines


def expected_message(path: Path) -> str:
    if path.name in EXPECT_WITHOUT_COMMENT:
        return EXPECT_WITHOUT_COMMENT[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# expect: ", "# error: ")), path
    return first.split(": ", 1)[1]


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
    exact = exact_errors(path)
    if exact:
        assert result.stderr.splitlines() == [f"error: {path}: {line}" for line in exact]


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
    assert err.value.lines() == [
        f"{p}: [run] steps_per_epoch: unknown key (allowed: device, steps, warmup_steps, seed, cuda_alloc_conf)"]


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
    p = write_scenario('[model]\npreset = "tiny-llama"\n[sweep]\n'
                       '"peft.target_modules" = [["q_proj", "v_proj"], "all-linear"]\n')
    a, b = load_scenario(p)
    assert a.name.endswith("[peft.target_modules=q_proj,v_proj]")
    assert b.peft.targets(b.model.arch) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_inline_keys_override_preset_and_sweep_model_keys(write_scenario):
    p = write_scenario('[model]\npreset = "llama-2-7b"\nnum_hidden_layers = 2\n'
                       '[sweep]\n"model.hidden_size" = [256, 512]\n')
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
    assert err.value.lines() == [f"{p}: [peft] num_virtual_tokens: num_virtual_tokens + seq_len must be <= "
                                 "max_position_embeddings 2048: 20 + 2040 > 2048 (allowed: <= 8 at seq_len 2040)"]


def test_all_shipped_scenarios_load():
    files = sorted((ROOT / "scenarios").glob("*.toml"))
    assert len(files) >= 10
    result = CliRunner().invoke(cli, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    for f in files:
        variants = load_scenario(f)
        assert variants and all(v.description for v in variants)


def validate(*paths):
    result = CliRunner().invoke(cli, ["validate", *map(str, paths)])
    return result.exit_code, result.stderr.splitlines()


def test_long_values_and_keys_are_cut_in_error_lines(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "' + "a" * 3_000_000 + '"}')
    p = tmp_path / "s.toml"
    p.write_text(f'"{"k" * 300}" = 1\n[model]\nconfig = "config.json"\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [
        f"error: {p}: {'k' * 80}… (300 characters): unknown section or key "
        "(allowed: name, description, model, precision, peft, training, run, distributed, inference, sweep)",
        f"error: {p}: [model] config: unsupported model_type \"{'a' * 80}…\" (3,000,000 characters): unknown to "
        f"transformers {transformers.__version__} (allowed: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, "
        "phi3, gpt2, opt, mixtral, qwen2_moe, qwen3_moe, vit, resnet, or any decoder-only causal LM model_type of "
        "transformers)"]


def test_error_lines_escape_control_characters(write_scenario):
    p = write_scenario('[model]\npreset = "tiny\\u001b[2J\\nllama"\n[run]\n"x\\u0007y" = 1\n')
    code, lines = validate(p)
    assert (code, len(lines)) == (2, 2)
    assert lines[0].startswith(f'error: {p}: [model] preset: unknown preset "tiny\\u001b[2J\\nllama"; did you mean '
                               "'tiny-llama'? (allowed: tiny-llama, ")
    assert lines[1] == (f'error: {p}: [run] x\\u0007y: unknown key (allowed: device, steps, warmup_steps, seed, '
                        'cuda_alloc_conf)')


def test_huge_every_k_is_a_message_not_a_traceback(write_scenario):
    p = write_scenario(f'[model]\npreset = "tiny-llama"\n[training]\ngradient_checkpointing = "every_{"9" * 5000}"\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [f"error: {p}: [training] gradient_checkpointing: every_{'9' * 74}… (5,006 characters): "
                     "the model has only 4 layers (allowed: every_1 .. every_4)"]


def test_too_big_sweep_does_not_hide_the_other_problems(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[peft]\nalpha = 0\n[sweep]\n'
                       f'"peft.r" = {list(range(1, 201))}\n"training.batch_size" = {list(range(1, 101))}\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [f"error: {p}: [sweep]: expands to 20,000 variants (allowed: at most 10,000)",
                     f"error: {p}: [peft] alpha: out of range: 0 (allowed: number > 0 and <= 1,000,000)"]


def test_sweep_problems_are_reported_with_the_problems_of_other_files(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[model]\npreset = "tiny-llama"\n[training]\nseq_len = 0\n[sweep]\n"peft.r" = []\n')
    b.write_text('[model]\npreset = "tiny-llama"\n[run]\nsteps = 0\n')
    code, lines = validate(a, b)
    assert code == 2
    assert lines == [f"error: {a}: [sweep] peft.r: must be a non-empty list of values, got []",
                     f"error: {a}: [training] seq_len: out of range: 0 (allowed: integer >= 1 and <= 10,000,000)",
                     f"error: {b}: [run] steps: out of range: 0 (allowed: integer >= 1 and <= 100,000)"]


def test_not_applicable_keys_are_not_judged_while_the_sweep_is_bad(write_scenario):
    # double_quant applies to the nf4 variants of the intended sweep; with the axis broken it is not judged
    p = write_scenario('[model]\npreset = "tiny-llama"\n[precision]\ndouble_quant = true\n'
                       '[sweep]\n"precision.weights" = "nf4"\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [f'error: {p}: [sweep] precision.weights: must be a non-empty list of values, got "nf4"']


def test_two_files_cannot_give_a_variant_the_same_name(tmp_path):
    (tmp_path / "d").mkdir()
    files = {name: tmp_path / name for name in ("a.toml", "d/a.toml", "v.toml", "w.toml", "x.toml")}
    files["a.toml"].write_text('[model]\npreset = "tiny-llama"\n')
    files["d/a.toml"].write_text('[model]\npreset = "tiny-llama"\n')  # same stem: the same default name
    files["v.toml"].write_text('name = "v"\n[model]\npreset = "tiny-llama"\n[sweep]\n"peft.r" = [4, 8]\n')
    files["w.toml"].write_text('name = "v[peft.r=8]"\n[model]\npreset = "tiny-llama"\n')
    # the same results file (v.jsonl) with other variant names is fine: runs merge into it
    files["x.toml"].write_text('name = "v"\n[model]\npreset = "tiny-llama"\n[sweep]\n"peft.r" = [16]\n')
    code, lines = validate(*files.values(), tmp_path / "d" / ".." / "v.toml")
    assert code == 2
    f = {k: str(v) for k, v in files.items()}
    assert lines == [
        f'error: {f["d/a.toml"]}: name: variant "a" is also a variant of {f["a.toml"]} (allowed: a name of its own)',
        f'error: {f["w.toml"]}: name: variant "v[peft.r=8]" is also a variant of {f["v.toml"]} '
        "(allowed: a name of its own)",
        f"error: {tmp_path / 'd' / '..' / 'v.toml'}: the same file is given twice"]
    assert validate(files["a.toml"], files["v.toml"], files["x.toml"]) == (0, [])


def test_name_from_a_long_file_name_is_checked(tmp_path):
    p = tmp_path / ("x" * 150 + ".toml")
    p.write_text('[model]\npreset = "tiny-llama"\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [f"error: {p}: name: not set, and the file name used instead is 150 characters long; it names "
                     "the results file <name>.jsonl (allowed: at most 100 characters)"]


def test_names_at_the_bounds_and_multiline_descriptions_load(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(f'name = "{"n" * 100}"\ndescription = """two\n\tlines"""\n[model]\npreset = "tiny-llama"\n')
    (s,) = load_scenario(p)
    assert (len(s.name), s.description) == (100, "two\n\tlines")
    p.write_text(f'name = "{"名" * 66}ab"\n[model]\npreset = "tiny-llama"\n')  # 200 bytes in UTF-8
    (s,) = load_scenario(p)
    assert len(s.name.encode()) == 200


def test_repeated_sweep_values_do_not_hide_keys_that_apply_to_no_variant(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[precision]\ndouble_quant = true\n'
                       '[sweep]\n"precision.weights" = ["bf16", "bf16"]\n')
    code, lines = validate(p)
    assert code == 2
    assert lines == [f'error: {p}: [sweep] precision.weights: the value "bf16" is listed twice '
                     "(allowed: each value once)",
                     f"error: {p}: [precision] double_quant: applies only to fp4 and nf4 weights, not bf16"]


# --- issue #13: [precision] autocast ---------------------------------------------------------------------------


def test_autocast_defaults_to_none_and_keeps_earlier_settings_keys(write_scenario):
    """Files without the key mean what they meant: autocast "none", and the same settings key as before the
    key existed (6c49f78356435f7e: this scenario's key computed by the code of commit 2091bea), so results
    measured then are still recognised as measured."""
    (s,) = load_scenario(write_scenario('[model]\npreset = "tiny-llama"\n[precision]\nweights = "fp32"\n'
                                        '[peft]\nmethod = "full"\n', name="five.toml"))
    assert s.precision.autocast == "none"
    assert s.to_dict()["precision"]["autocast"] == "none"
    assert s.settings_key() == "6c49f78356435f7e"


def test_autocast_is_a_sweep_axis_with_its_own_settings_keys(write_scenario):
    p = write_scenario('name = "amp"\n[model]\npreset = "tiny-llama"\n[precision]\nweights = "fp32"\n'
                       '[peft]\nmethod = "full"\n[sweep]\n"precision.autocast" = ["none", "bf16", "fp16"]\n')
    variants = load_scenario(p)
    assert [v.name for v in variants] == ["amp[precision.autocast=none]", "amp[precision.autocast=bf16]",
                                          "amp[precision.autocast=fp16]"]
    assert [v.precision.autocast for v in variants] == ["none", "bf16", "fp16"]
    assert len({v.settings_key() for v in variants}) == 3


@pytest.mark.parametrize("precision,method", [
    ('weights = "fp32"\nautocast = "fp16"', "full"),  # the classic AMP setup
    ('weights = "bf16"\nautocast = "fp16"', "lora"),  # fp16 autocast of bf16 weights
    ('weights = "bf16"\nautocast = "fp16"', "full"),  # bf16 gradients: the scaler unscales them (measured)
    ('weights = "fp16"\nautocast = "bf16"', "full"),
    ('weights = "nf4"\ndouble_quant = true\ncompute_dtype = "bf16"\nautocast = "bf16"', "lora"),  # QLoRA
    ('weights = "fp32"\nautocast = "fp16"', "prefix_tuning"),
    ('weights = "bf16"\nautocast = "bf16"', "prompt_tuning"),
])
def test_autocast_combinations_that_train_are_accepted(write_scenario, precision, method):
    (s,) = load_scenario(write_scenario(f'[model]\npreset = "tiny-llama"\n[precision]\n{precision}\n'
                                        f'[peft]\nmethod = "{method}"\n'))
    assert s.precision.autocast in ("bf16", "fp16")
    assert s.not_applicable == ()


# --- [run] cuda_alloc_conf, [model] hub -------------------------------------------------------------------------


def test_cuda_alloc_conf_defaults_to_empty_and_keeps_earlier_settings_keys(write_scenario):
    """Unset, the key is "" (torch's defaults) and stays out of the settings key, as autocast "none" does: the
    same file keeps the key it had before either setting existed; set, it makes a variant of its own."""
    text = '[model]\npreset = "tiny-llama"\n[precision]\nweights = "fp32"\n[peft]\nmethod = "full"\n'
    (s,) = load_scenario(write_scenario(text, name="five.toml"))
    assert s.run.cuda_alloc_conf == "" and s.to_dict()["run"]["cuda_alloc_conf"] == ""
    assert "hub" not in s.to_dict()["model"] and "revision" not in s.to_dict()["model"]
    assert s.settings_key() == "6c49f78356435f7e"
    p = write_scenario(text.replace('name = ', '') + '[sweep]\n"run.cuda_alloc_conf" = ["", "expandable_segments:True"]\n',
                       name="conf.toml")
    default, expandable = load_scenario(p)
    assert expandable.run.cuda_alloc_conf == "expandable_segments:True"
    assert default.settings_key() != expandable.settings_key()


def test_bad_cuda_alloc_conf_in_a_sweep_names_its_variant(write_scenario):
    p = write_scenario('[model]\npreset = "tiny-llama"\n[sweep]\n'
                       '"run.cuda_alloc_conf" = ["expandable_segments:True", "max_split_size_mb:10"]\n')
    code, lines = validate(p)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {p}: [run] cuda_alloc_conf: max_split_size_mb: too small, must be >= 20 "
                               "(MiB), got 10 (allowed: comma-separated key:value pairs: expandable_segments:")
    assert lines[0].endswith("(in variant s[run.cuda_alloc_conf=max_split_size_mb:10])")
    p = write_scenario('[model]\npreset = "tiny-llama"\n[run]\ncuda_alloc_conf = 1\n', name="int.toml")
    assert validate(p) == (2, [f"error: {p}: [run] cuda_alloc_conf: must be a string, got 1 (allowed: "
                               f"{ALLOC_CONF_ALLOWED})"])
