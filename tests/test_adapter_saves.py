"""The analytic estimator on modules_to_save, cat's combined adapter, LoHa, LoKr, VeRA and OFT
(estimate/adapter_saves.py): counts and dtypes by hand and against peft's model, peaks against the fake-tensor
trace (which equals the CPU runner to the byte) and a few against the runner itself, and the refusals."""

import pytest
import torch

from peftprof.estimate import AnalyticUnsupported, estimate
from peftprof.estimate import adapter_saves as aps
from peftprof.estimate import memory as mem
from peftprof.scenario import load_scenario

# hidden 64, GQA 4/2 heads (k/v out 32), MLP 160, vocab 500: every width distinct enough to catch a swapped term
ARCH = ('[model]\nmodel_type = "llama"\nhidden_size = {h}\nnum_hidden_layers = {layers}\nnum_attention_heads = 4\n'
        'num_key_value_heads = 2\nintermediate_size = {inter}\nvocab_size = 500\n')


def scenario(write_scenario, peft: str, weights: str = "fp32", training: str = "", h: int = 64, layers: int = 2,
             inter: int = 160, batch: int = 2, seq: int = 32):
    text = (ARCH.format(h=h, layers=layers, inter=inter) + f'[precision]\nweights = "{weights}"\n[peft]\n{peft}\n'
            f'[training]\nbatch_size = {batch}\nseq_len = {seq}\n{training}\n[run]\nsteps = 1\nwarmup_steps = 1\n')
    (s,) = load_scenario(write_scenario(text))
    return s


def check_against_trace(s, rel: float = 0.001) -> None:
    """The analytic peak within `rel` of the trace's, the persistent categories equal (weights: the base model's
    known 64-128 B offset, the same without these options)."""
    from peftprof.trace import trace_peak

    traced = trace_peak(s)
    analytic = estimate(s, device="cpu")
    assert abs(analytic["peak_bytes"] / traced["peak_bytes"] - 1) < rel, (analytic["breakdown"], traced["breakdown"])
    for cat in ("trainable", "optimizer"):
        assert analytic["breakdown"][cat] == traced["breakdown"][cat], cat
    assert 0 <= traced["breakdown"]["weights"] - analytic["breakdown"]["weights"] <= 128
    assert analytic["n_trainable_params"] == traced["n_trainable_params"]


# --- modules_to_save -----------------------------------------------------------------------------------------------

def test_modules_to_save_counts_and_dtypes_by_hand(write_scenario):
    """LoRA r=4 on q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers: 2 x (4*64 + 64*4 + 4*64 + 32*4) = 1792;
    embed_tokens and lm_head copies 500 x 64 = 32000 each, in the model's dtype (bf16: 2 B; nf4: fp32, upcast by
    prepare_model_for_kbit_training), against peft's own model."""
    from peftprof.run.build import adapt, base_model

    for weights, width in (("bf16", 2), ("nf4", 4)):
        s = scenario(write_scenario, 'r = 4\ntarget_modules = ["q_proj", "v_proj"]\n'
                     'modules_to_save = ["embed_tokens", "lm_head"]', weights=weights)
        assert sorted(mem.trainable_tensors(s)) == sorted([256, 256, 256, 128] * 2 + [32000, 32000])
        assert mem.trainable_param_bytes(s) == 1792 * 4 + 2 * 32000 * width
        assert mem.gradient_bytes(s) == mem.trainable_param_bytes(s)
        # AdamW: two states like each parameter, a fp32 step per tensor (10 tensors)
        assert mem.optimizer_state_bytes(s)[0] == 2 * mem.trainable_param_bytes(s) + 4 * 10
        if weights == "bf16":
            torch.manual_seed(0)
            model = adapt(base_model(s, "cpu"), s)
            params = [p for p in model.parameters() if p.requires_grad]
            assert sorted(p.numel() for p in params) == sorted(mem.trainable_tensors(s))
            assert sum(p.numel() * p.element_size() for p in params) == mem.trainable_param_bytes(s)


@pytest.mark.parametrize(("saved", "weights", "lora", "training"), [
    ('["lm_head"]', "fp32", 'target_modules = "all-linear"\ndropout = 0.1', ""),
    ('["embed_tokens"]', "bf16", 'target_modules = "all-linear"\ndropout = 0.1', ""),
    ('["embed_tokens", "lm_head"]', "nf4", 'target_modules = ["q_proj", "v_proj"]', 'gradient_checkpointing = "full"'),
    ('["embed_tokens", "lm_head"]', "bf16", 'target_modules = "all-linear"\ndropout = 0.1', ""),
])
def test_modules_to_save_against_trace(write_scenario, saved, weights, lora, training):
    s = scenario(write_scenario, f'r = 8\n{lora}\nmodules_to_save = {saved}', weights=weights, training=training)
    assert aps.analytic_gap(s) is None
    check_against_trace(s)


def test_trained_lm_head_and_embedding_activations_by_hand(write_scenario):
    """Against plain LoRA, fp32, batch 2 x 32 tokens, hidden 64, 1 layer: a trained lm_head saves its input (the
    final norm's output, 2*32*64*4 = 16384 B); a trained embedding makes layer 0's first norm save its fp32 input
    and rsqrt (16384 + 2*32*4 = 16640 B). Both measured on the trace (tests/test_adapter_saves.py grid)."""
    from peftprof.estimate import activations as act

    plain = scenario(write_scenario, 'r = 4\ntarget_modules = ["q_proj", "v_proj"]', layers=1)
    head = scenario(write_scenario, 'r = 4\ntarget_modules = ["q_proj", "v_proj"]\nmodules_to_save = ["lm_head"]',
                    layers=1)
    emb = scenario(write_scenario, 'r = 4\ntarget_modules = ["q_proj", "v_proj"]\nmodules_to_save = ["embed_tokens"]',
                   layers=1)
    assert act.activation_bytes(head) - act.activation_bytes(plain) == 16384
    assert act.activation_bytes(emb) - act.activation_bytes(plain) == 16640
    # lm_head's gradient comes before the layers' backward, the embedding's after
    assert aps.saved_module_gradient_bytes(head) == (32000 * 4, 0)
    assert aps.saved_module_gradient_bytes(emb) == (0, 32000 * 4)


def test_modules_to_save_and_cat_against_the_runner(write_scenario):
    """Two measured CPU runs: the analytic peak within 0.1% of the runner's."""
    from peftprof.run.runner import run_variant

    for peft, weights in (('r = 8\ntarget_modules = "all-linear"\nmodules_to_save = ["embed_tokens", "lm_head"]',
                           "bf16"),
                          ('r = 4\nnum_adapters = 3\ncombination = "cat"\ntarget_modules = "all-linear"\ndropout = 0.1',
                           "bf16")):
        s = scenario(write_scenario, peft, weights=weights)
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", rec.get("error")
        analytic = estimate(s, device="cpu")
        assert abs(analytic["peak_bytes"] / rec["measured"]["peak_bytes"] - 1) < 0.001
        assert analytic["breakdown"]["trainable"] == rec["measured"]["breakdown"]["trainable"]


# --- cat ------------------------------------------------------------------------------------------------------------

def test_cat_adapter_dtype_and_saves_by_hand(write_scenario):
    """K = 3 adapters of r = 4: a rank-12 combined adapter in the base's dtype (bf16 on bf16, the compute dtype on
    nf4, fp32 on fp32); one q_proj (64 -> 64) without dropout on bf16 saves x itself (no cast: 2*32*64*2 B) and
    lora_A's bf16 output (2*32*12*2 B)."""
    from peftprof.estimate import activations as act

    peft = 'r = 4\nnum_adapters = 3\ncombination = "cat"\ntarget_modules = ["q_proj"]'
    assert [aps.adapter_bytes_per_element(scenario(write_scenario, peft, weights=w)) for w in ("bf16", "nf4", "fp32")] \
        == [2, 2, 4]
    s = scenario(write_scenario, peft, weights="bf16")
    saves = act.layer_saves(s)
    assert saves["self_attn.q_proj.lora_A_out"] == 2 * 32 * 12 * 2
    assert saves["x1"] == 2 * 32 * 64 * 2 and "self_attn.q_proj.x_fp32" not in saves
    assert mem.trainable_param_bytes(s) == 2 * 2 * (12 * 64 + 64 * 12)


@pytest.mark.parametrize(("weights", "dropout", "training"), [
    ("fp32", 0.1, ""), ("bf16", 0.0, 'gradient_checkpointing = "full"'), ("nf4", 0.1, ""), ("nf4", 0.0, "")])
def test_cat_against_trace(write_scenario, weights, dropout, training):
    s = scenario(write_scenario, f'r = 4\nnum_adapters = 2\ncombination = "cat"\ntarget_modules = "all-linear"\n'
                 f'dropout = {dropout}', weights=weights, training=training)
    check_against_trace(s)


# --- LoHa, LoKr, VeRA, OFT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["loha", "lokr", "vera", "oft"])
@pytest.mark.parametrize(("weights", "targets", "training"), [
    ("fp32", '["q_proj", "v_proj"]', ""),
    ("bf16", '"all-linear"', ""),
    ("fp32", '["gate_proj", "k_proj"]', 'gradient_checkpointing = "full"'),
])
def test_methods_against_trace(write_scenario, method, weights, targets, training):
    extra = "\ndropout = 0.1" if method == "vera" else ""
    s = scenario(write_scenario, f'method = "{method}"\nr = 4\ntarget_modules = {targets}{extra}', weights=weights,
                 training=training, seq=64)
    check_against_trace(s, rel=0.005)


def test_delta_weight_backward_moment(write_scenario):
    """Few tokens, wide layers: the peak is inside the backward of down_proj's delta weight (256 x 512 fp32,
    524288 B): LoHa holds 5 such tensors there, LoKr 3 (measured on the trace); the analytic peak follows it
    (within 1%: the rest of that moment is modelled more coarsely)."""
    from peftprof.trace import trace_peak

    for method, copies in (("loha", 5), ("lokr", 3)):
        s = scenario(write_scenario, f'method = "{method}"\nr = 4\ntarget_modules = ["q_proj", "o_proj", "down_proj"]',
                     weights="bf16", training='gradient_checkpointing = "full"', h=256, layers=1, inter=512, batch=1)
        assert aps.DELTA_BACKWARD_COPIES[method] == copies
        traced, analytic = trace_peak(s), estimate(s, device="cpu")
        assert traced["breakdown"]["temporaries"] > copies * 4 * 256 * 512
        assert abs(analytic["peak_bytes"] / traced["peak_bytes"] - 1) < 0.01


def test_frozen_buffers_by_hand(write_scenario):
    """VeRA: vera_A r x max(in) and vera_B max(out) x r, fp32: 4 * (64 + 64) * 4 B for q/v; OFT r = 4 blocks of
    b = 16: rows and cols int64 of 16*15/2 each, per adapted linear: 2 layers x 2 x 2*8*120 B."""
    vera = scenario(write_scenario, 'method = "vera"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]')
    oft = scenario(write_scenario, 'method = "oft"\nr = 4\ntarget_modules = ["q_proj", "v_proj"]')
    assert aps.frozen_buffer_bytes(vera) == 4 * (64 + 64) * 4
    assert aps.frozen_buffer_bytes(oft) == 2 * 2 * 2 * 8 * 120


# --- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("peft", "precision", "words"), [
    ('r = 4\nmodules_to_save = ["norm"]', 'weights = "fp32"', "modules_to_save norm"),
    ('r = 4\nmodules_to_save = ["lm_head"]', 'weights = "bf16"\nautocast = "bf16"', "under autocast"),
    ('method = "loha"\nr = 4', 'weights = "bf16"\nautocast = "bf16"', "loha under autocast"),
    ('method = "lokr"\nr = 4\nmodules_to_save = ["lm_head"]', 'weights = "fp32"', "modules_to_save with lokr"),
    ('method = "vera"\nr = 4', 'weights = "bf16"\n[training]\ngradient_checkpointing = "full"',
     "vera with gradient checkpointing on bf16"),
])
def test_refused_with_its_reason(write_scenario, peft, precision, words):
    text = ARCH.format(h=64, layers=2, inter=160) + f"[precision]\n{precision}\n[peft]\n{peft}\n"
    (s,) = load_scenario(write_scenario(text))
    with pytest.raises(AnalyticUnsupported, match=words):
        estimate(s, device="cpu")


def test_tied_embeddings_refused(write_scenario):
    text = ARCH.format(h=64, layers=2, inter=160) + 'tie_word_embeddings = true\n[precision]\nweights = "fp32"\n' \
        '[peft]\nr = 4\nmodules_to_save = ["lm_head"]\n'
    (s,) = load_scenario(write_scenario(text))
    assert "tied embeddings" in aps.analytic_gap(s)
