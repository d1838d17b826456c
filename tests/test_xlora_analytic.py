"""The analytic X-LoRA model (peftprof/estimate/xlora.py) against the trace, which equals the CPU runner to the byte
for X-LoRA (tests/test_xlora.py), and its counts against numbers computed by hand."""

import pytest

from peftprof.estimate import AnalyticUnsupported, estimate
from peftprof.estimate import xlora as xm
from peftprof.estimate.flops import flops_per_step
from peftprof.scenario import load_scenario


def scenario(write_scenario, *, model="llama", kv=2, vocab=500, inter=160, layers=2, weights="fp32", peft="",
             batch=2, seq=32, extra_precision=""):
    if model == "llama":
        arch = (f'[model]\nmodel_type = "llama"\nhidden_size = 64\nnum_hidden_layers = {layers}\n'
                f'num_attention_heads = 4\nnum_key_value_heads = {kv}\nintermediate_size = {inter}\n'
                f'vocab_size = {vocab}\n')
    elif model == "gpt2":
        arch = (f'[model]\nmodel_type = "gpt2"\nn_embd = 64\nn_layer = {layers}\nn_head = 4\nvocab_size = {vocab}\n'
                'n_positions = 256\n')
    else:
        arch = (f'[model]\nmodel_type = "opt"\nhidden_size = 64\nnum_hidden_layers = {layers}\n'
                f'num_attention_heads = 4\nffn_dim = 128\nvocab_size = {vocab}\n')
    text = (f'{arch}[precision]\nweights = "{weights}"\n{extra_precision}[peft]\nmethod = "xlora"\nr = 4\n{peft}\n'
            f'[training]\nbatch_size = {batch}\nseq_len = {seq}\n[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 1\n')
    (s,) = load_scenario(write_scenario(text))
    return s


def test_counts_and_flops_by_hand(write_scenario):
    """hidden 64, 2 layers, GQA (v_proj out 32), MLP 160, vocab 500, q_proj/v_proj, K = 2, r = 4, tokens 2 x 32.
    Experts: 2 layers x 4 x ((64 + 64) + (64 + 32)) x K 2 = 3,584 fp32 values, 14,336 B. Classifier (depth 1):
    W 64 x 2 and b 2. FLOPs per token: base 2 x (2 x 43,008 linear weights + lm_head 32,000) = 236,032; experts
    2 x 3,584 = 7,168; attention 4 x 32 x 4 heads x 16 x 2 layers = 16,384; classifier 2 x 130 = 260. Scaling pass
    236,032 + 7,168 + 16,384 = 259,584; real forward + 260; backward: input gradients 243,460, the classifier's
    weight gradient 260, attention 32,768: 795,916 per token, x 64 tokens = 50,938,624."""
    s = scenario(write_scenario, peft="num_adapters = 2")
    assert xm.classifier_tensors(s.peft, s.model.arch) == (128, 2)
    assert xm.expert_bytes(s) == 14_336
    assert xm.adapted_linear_count(s.peft, s.model.arch) == 4
    assert flops_per_step(s) == 50_938_624
    out = estimate(s, device="cpu")
    assert out["n_trainable_params"] == 130 and out["flops_per_step"] == 50_938_624


# each row makes a different moment the peak (the trace's own peak phase is checked too)
CASES = {
    # the start of backward (logits dominate): GQA fp32, q/v, depth 1
    "backward_start": (dict(peft="num_adapters = 2"), "backward"),
    # down_proj's last expert in the forward: fp16, all-linear, dropout, small vocab
    "expert_forward": (dict(kv=4, vocab=32, inter=256, weights="fp16", batch=2, seq=64,
                            peft='num_adapters = 2\nxlora_depth = 2\nxlora_size = 16\ndropout = 0.1\n'
                                 'target_modules = "all-linear"'), "forward"),
    # down_proj's experts' backward: fp32, K = 4, depth 3, per-layer gates, 3 layers (MHA)
    "expert_backward": (dict(kv=4, vocab=32, inter=256, layers=3, batch=2, seq=64,
                             peft='num_adapters = 4\nxlora_depth = 3\nxlora_size = 128\nlayerwise_scalings = true\n'
                                  'target_modules = "all-linear"'), "backward"),
    # the optimizer step: a bf16 classifier larger than the step's activations
    "optimizer": (dict(vocab=32, inter=256, layers=1, weights="bf16", batch=1, seq=16,
                       peft="num_adapters = 3\nxlora_depth = 3\nxlora_size = 128"), "optimizer"),
    # gpt2 (Conv1D c_attn), bf16, per-layer gates, dropout
    "gpt2": (dict(model="gpt2", weights="bf16", peft="num_adapters = 3\nxlora_depth = 2\nxlora_size = 16\n"
                                                     "layerwise_scalings = true\ndropout = 0.1"), "backward"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_matches_the_trace(write_scenario, case):
    """Peak within 1% and every category within 1% of the peak, against the trace (= the CPU runner for X-LoRA)."""
    from peftprof.trace import trace_peak

    kw, phase = CASES[case]
    s = scenario(write_scenario, **kw)
    traced, out = trace_peak(s), estimate(s, device="cpu")
    assert traced["peak_phase"] == phase  # (the row tests the moment it names)
    assert out["peak_phase"] == phase
    assert abs(out["peak_bytes"] - traced["peak_bytes"]) <= 0.01 * traced["peak_bytes"]
    for cat, value in traced["breakdown"].items():
        assert abs(out["breakdown"][cat] - value) <= 0.01 * traced["peak_bytes"], (cat, out["breakdown"], traced)


def test_scaling_pass_moment_against_the_trace(write_scenario, monkeypatch):
    """The scaling pass's highest moment (persistent state + `scaling_pass_moment`) against the trace's, split at
    the classifier's call as in tests/test_xlora.py: bf16, 3 layers, vocab 2000 (hidden states and logits)."""
    from conftest import trace_marking_xlora_classifier

    from peftprof.estimate import step_moments
    from peftprof.timeline import _replay

    s = scenario(write_scenario, weights="bf16", layers=3, vocab=2000, peft="num_adapters = 2")
    _, tracker, marks = trace_marking_xlora_classifier(monkeypatch, s)
    totals, _, phases = _replay(tracker)
    traced = max(totals[phases.index("forward"):marks[-1]])
    persistent, _, _ = step_moments(s, device="cpu")
    ((_, moment),) = xm.scaling_pass_moment(s, 0)
    analytic = sum(persistent.values()) + sum(moment.values())
    assert abs(analytic - traced) <= 0.002 * traced, (analytic, traced)


def test_what_is_not_modelled_is_refused(write_scenario):
    """Autocast and families other than llama and gpt2 are not checked: the trace answers, the analytic refuses."""
    s = scenario(write_scenario, peft="num_adapters = 2", extra_precision='autocast = "bf16"\n')
    with pytest.raises(AnalyticUnsupported, match="X-LoRA under autocast"):
        estimate(s, device="cpu")
    s = scenario(write_scenario, model="opt", peft="num_adapters = 2")
    with pytest.raises(AnalyticUnsupported, match="X-LoRA on llama, gpt2 only"):
        estimate(s, device="cpu")
