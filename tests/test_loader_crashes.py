"""Variants the loader used to accept and on which peft or torch then raised during the real step (found by
fuzzing `peftprof run` / `estimate --method trace`): the loader refuses each class with one line
(rules_peft.py _check_library_failures), and each failure it prevents is reproduced here by building past the
loader with dataclasses.replace. If a peft or torch release fixes one, its reproduction fails: lift the rule."""

from dataclasses import replace

import pytest
import torch

from peftprof.errors import UserError
from peftprof.run.build import build
from peftprof.run.step import model_inputs, synthetic_batch, train_step
from peftprof.scenario import load_scenario

LLAMA = ('model_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 2\n'
         'num_key_value_heads = 2\nintermediate_size = 128\nvocab_size = 100')
GPT2 = 'model_type = "gpt2"\nn_embd = 64\nn_layer = 1\nn_head = 2\nvocab_size = 100'
OPT = 'model_type = "opt"\nhidden_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 2\nffn_dim = 128\nvocab_size = 100'


class _NoProbe:
    def set_phase(self, name):
        pass

    def mark_gradients(self, grads):
        pass


def _text(model: str, precision: str, peft: str) -> str:
    return (f'[model]\n{model}\n[precision]\n{precision}\n[peft]\n{peft}\n[training]\nbatch_size = 1\n'
            'seq_len = 16\n[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 1\n')


def _load(write_scenario, model: str, precision: str, peft: str):
    (s,) = load_scenario(write_scenario(_text(model, precision, peft)))
    return s


def _refusal(write_scenario, model: str, precision: str, peft: str) -> str:
    path = write_scenario(_text(model, precision, peft))
    with pytest.raises(UserError) as e:
        load_scenario(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 1, lines
    prefix = f"{path}: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def _step(s) -> None:
    torch.manual_seed(0)
    built = build(s, "cpu")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    train_step(built, s, ids, _NoProbe(), {})


@pytest.mark.parametrize("method", ["loha", "lokr", "oft"])
def test_gpt2_conv1d_refused(write_scenario, method):
    assert _refusal(write_scenario, GPT2, 'weights = "fp32"', f'method = "{method}"\nr = 4') == (
        f"[peft] method: {method} on gpt2 fails in peft 0.21.2: gpt2's attention and MLP layers are transformers "
        f"Conv1D, which peft's {method} does not adapt (measured: TypeError 'Target module ... Conv1D ... not "
        "supported') (allowed: lora, ia3, vera, xlora, prompt_tuning, prefix_tuning, full)")


@pytest.mark.parametrize("method", ["loha", "lokr", "oft"])
def test_gpt2_conv1d_fails_in_peft(write_scenario, method):
    s = _load(write_scenario, GPT2, 'weights = "fp32"', 'method = "lora"\nr = 4')
    with pytest.raises(TypeError, match="Conv1D"):
        build(replace(s, peft=replace(s.peft, method=method)), "cpu")


def test_mixed_halves_on_rotated_projections_refused(write_scenario):
    got = _refusal(write_scenario, LLAMA, 'weights = "bf16"\nautocast = "fp16"',
                   'method = "loha"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]')
    assert got == (
        "[precision] autocast: fp16 autocast of bf16 weights with loha on q_proj: the adapted layers return bf16 "
        "queries/keys, which torch's autocast refuses to concatenate in transformers' rotate_half (measured: "
        "RuntimeError 'Unexpected floating ScalarType in at::autocast::prioritize') (allowed: none | bf16, or "
        "target_modules without q_proj)")
    # all-linear and the default targets (q_proj, v_proj) reach q_proj too; X-LoRA's LoRA experts as well
    for peft in ('method = "vera"\nr = 4\ntarget_modules = "all-linear"', 'method = "oft"\nr = 4',
                 'method = "xlora"\nr = 4\nnum_adapters = 2'):
        for prec in ('weights = "bf16"\nautocast = "fp16"', 'weights = "fp16"\nautocast = "bf16"'):
            assert "rotate_half" in _refusal(write_scenario, LLAMA, prec, peft)
    # the same halves on o_proj and the MLP train (fuzzed and below), and gpt2/opt rotate nothing
    _load(write_scenario, LLAMA, 'weights = "bf16"\nautocast = "fp16"',
          'method = "loha"\nr = 4\ntarget_modules = ["o_proj", "down_proj"]')
    _load(write_scenario, OPT, 'weights = "bf16"\nautocast = "fp16"', 'method = "loha"\nr = 4')


def test_mixed_halves_on_rotated_projections_fail_in_torch(write_scenario):
    s = _load(write_scenario, LLAMA, 'weights = "bf16"\nautocast = "fp16"',
              'method = "loha"\nr = 4\ntarget_modules = ["o_proj"]')
    _step(s)  # what the loader accepts trains, v_proj (not rotated) included
    _step(replace(s, peft=replace(s.peft, target_modules=("v_proj",))))
    q = replace(s, peft=replace(s.peft, target_modules=("q_proj",)))
    with pytest.raises(RuntimeError, match="Unexpected floating ScalarType in at::autocast::prioritize"):
        _step(q)


def test_fp16_parameters_under_fp16_autocast_refused(write_scenario):
    fp16 = 'weights = "fp16"\nautocast = "fp16"'
    assert _refusal(write_scenario, LLAMA, fp16, 'method = "lokr"\nr = 4\nmodules_to_save = ["lm_head"]') == (
        "[precision] autocast: fp16 autocast with modules_to_save on fp16 weights: peft makes those trained "
        "parameters fp16, and fp16 autocast's GradScaler refuses to unscale their gradients (measured: "
        "ValueError 'Attempting to unscale FP16 gradients') (allowed: none | bf16, or fp32 | bf16 weights)")
    got = _refusal(write_scenario, LLAMA, fp16, 'method = "lora"\nr = 4\nnum_adapters = 2\ncombination = "cat"')
    assert got.startswith('[precision] autocast: fp16 autocast with combination = "cat" on fp16 weights: ')
    # a linear merge keeps fp32 adapters: accepted
    _load(write_scenario, LLAMA, fp16, 'method = "lora"\nr = 4\nnum_adapters = 2\ncombination = "linear"')


@pytest.mark.parametrize("peft", ['method = "lora"\nr = 4\nmodules_to_save = ["lm_head"]',
                                  'method = "lora"\nr = 4\nnum_adapters = 2\ncombination = "cat"'])
def test_fp16_parameters_under_fp16_autocast_fail_in_torch(write_scenario, peft):
    s = _load(write_scenario, LLAMA, 'weights = "fp16"\nautocast = "bf16"', peft)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _step(replace(s, precision=replace(s.precision, autocast="fp16")))


def test_opt_xlora_on_fc_refused(write_scenario):
    xlora = 'method = "xlora"\nr = 4\nnum_adapters = 2\n'
    assert _refusal(write_scenario, OPT, 'weights = "fp32"', xlora + 'target_modules = ["fc1", "fc2"]') == (
        "[peft] target_modules: X-LoRA on opt's fc1, fc2 fails in peft 0.21.2: opt runs them on flattened "
        "(tokens, hidden) states, which X-LoRA's per-token gates (batch, seq) do not broadcast to (measured: a "
        "shape broadcast RuntimeError) (allowed: q_proj, k_proj, v_proj, out_proj)")
    assert "fc1, fc2" in _refusal(write_scenario, OPT, 'weights = "fp32"', xlora + 'target_modules = "all-linear"')
    _load(write_scenario, OPT, 'weights = "fp32"', xlora)  # the default q_proj, v_proj: accepted


def test_opt_xlora_on_fc_fails_in_peft(write_scenario):
    s = _load(write_scenario, OPT, 'weights = "fp32"', 'method = "xlora"\nr = 4\nnum_adapters = 2')
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    build(s, "cpu").model(**model_inputs(ids)).loss.backward()  # what the loader accepts runs
    fc = build(replace(s, peft=replace(s.peft, target_modules=("fc1",))), "cpu").model
    with pytest.raises(RuntimeError, match="broadcast"):
        fc(**model_inputs(ids))
