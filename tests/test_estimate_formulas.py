"""Activation, logits and FLOP terms against numbers counted by hand; fit's search; the estimate's shape."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftprof.catalog import gpu
from peftprof.cli import cli
from peftprof.estimate import activations as act
from peftprof.estimate import estimate
from peftprof.estimate.flops import flops_per_step
from peftprof.fit import largest_fitting
from peftprof.results import CATEGORIES
from peftprof.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
QUICK = '''[model]
preset = "tiny-llama"
[precision]
weights = "fp32"
[peft]
r = 8
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 128
'''


@pytest.fixture
def tiny(write_scenario):
    (s,) = load_scenario(write_scenario(QUICK))
    return s


def test_activation_bytes_per_layer_by_hand(tiny):
    # tiny llama fp32, b*s = T = 256 tokens, h = 256, 4 heads x 64, intermediate 688, LoRA r=8 on q,v, SDPA:
    #   each RMSNorm: fp32 input 4*T*h = 262,144 + rsqrt 4*T = 1,024          -> 2 x 263,168
    #   q/v LoRA (fp32, no dropout): lora_A saves x itself 4*T*h = 262,144 (shared) + A-outputs 2 x 4*T*8 = 16,384
    #   SDPA: q, k, v, output 4 x 4*T*h = 1,048,576 + logsumexp 4*b*heads*s = 4,096
    #   MLP: SiLU input, act*up's two factors 3 x 4*T*688 = 2,113,536
    # total 3,971,072
    assert act.activation_bytes_per_layer(tiny) == 3_971_072


def test_logits_bytes_by_hand(tiny):
    # T x vocab = 256 x 32,000; fp32 model: the held logits 4 B + log_softmax output 4 + nll_loss's input
    # gradient 4 + log_softmax's input gradient 4 = 16 B per element = 131,072,000
    assert act.logits_bytes(tiny) == 131_072_000


def test_checkpointing_keeps_layer_inputs(write_scenario):
    (s,) = load_scenario(write_scenario(QUICK + 'gradient_checkpointing = "full"\n'))
    # a checkpointed layer keeps its fp32 input: 4 * 256 * 256 = 262,144 per layer
    assert act.checkpoint_bytes_per_layer(s) == 262_144
    # 4 layers + model-level (final norm 263,168 + rotary cos/sin, (1, s, head_dim) each as position_ids is
    # (1, s): 2 * 4 * 128 * 64 = 65,536)
    assert act.activation_bytes(s) == 4 * 262_144 + 263_168 + 65_536


def test_model_level_and_mlp_backward_terms_by_hand(write_scenario, tiny):
    # tiny llama fp32, T = 256, h = 256, intermediate 688. LoRA on q,v: down_proj has no adapter and a frozen
    # fp32 base saves nothing, so its backward adds the input gradient 4*T*688 = 704,512; the act*up backward
    # holds three of them; both beside the residual stream's gradient 4*T*h = 262,144 (traced)
    assert act.mlp_backward_moments(tiny) == [(0, 0, 704_512 + 262_144), (0, 0, 3 * 704_512 + 262_144)]
    # final RMSNorm: fp32 input 4*T*h = 262,144 + rsqrt 4*T = 1,024; full fine-tuning also saves weight*normed's
    # normed input (262,144)
    assert act.final_norm_saved_bytes(tiny) == 263_168
    full_text = QUICK.replace('r = 8\ntarget_modules = ["q_proj", "v_proj"]', 'method = "full"')
    (full,) = load_scenario(write_scenario(full_text +
                                           'gradient_checkpointing = "full"\nattention = "eager"\n'))
    assert act.final_norm_saved_bytes(full) == 525_312
    # checkpointed eager layers keep the b x 1 x s x s additive mask, 4*2*128*128 = 131,072, beside the final
    # norm, the rotary cos/sin (1 x s x head_dim each: 2*4*128*64 = 65,536) and lm_head's saved input (full
    # fine-tuning trains its weight: the final norm's fp32 output, 4*T*h = 262,144)
    assert act.model_activation_bytes(full) == 525_312 + 131_072 + 65_536 + 262_144
    # prefix tuning (20 virtual tokens, SDPA): layer 0's input norm saves nothing (263,168 less); every layer's
    # SDPA call saves its own fp32 copy of the explicit mask, b x s x (s + 20) = 4*2*128*148 = 151,552
    prefix_text = QUICK.replace('r = 8\ntarget_modules = ["q_proj", "v_proj"]',
                                'method = "prefix_tuning"\nnum_virtual_tokens = 20')
    (prefix,) = load_scenario(write_scenario(prefix_text, name="prefix.toml"))
    assert act.first_layer_unsaved_bytes(prefix) == 263_168
    assert act.model_activation_bytes(prefix) == 263_168 + 65_536
    assert act.layer_saves(prefix)["prefix_mask"] == 151_552


def _quanto_backward_transient_bytes(compute, in_f, out_f) -> int:
    """Peak of the storages made during the backward of one frozen optimum-quanto qint4 linear (1 token, so the
    input gradient is negligible), seen by a tracker that re-enters itself inside quanto's __torch_dispatch__
    (where quanto dequantizes on plain tensors)."""
    import torch
    from optimum.quanto import freeze, qint4, quantize

    from peftprof.run.track import MemoryTracker

    class SeeingTracker(MemoryTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            wrapper = next((t for t in types if hasattr(t, "__tensor_flatten__")), None)
            if wrapper is None:
                return super().__torch_dispatch__(func, types, args, kwargs)
            with self:
                return wrapper.__torch_dispatch__(func, types, args, kwargs or {})

    m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(compute)
    quantize(m, weights=qint4)
    freeze(m)
    m.requires_grad_(False)
    x = torch.randn(1, in_f, dtype=compute, requires_grad=True)
    y = m(x)
    grad = torch.ones_like(y)
    tracker = SeeingTracker()
    with tracker:
        tracker.phase = "backward"
        y.backward(grad)
    return tracker.classify([]).peak_bytes


@pytest.mark.parametrize("dtype,in_f,out_f", [("float32", 512, 1024),     # plain layout: 5n
                                              ("bfloat16", 160, 512),     # group 32, plain layout: 3n
                                              ("bfloat16", 512, 1024),    # tinygemm: 3.5n > 2*in^2 + 2n + n/8
                                              ("bfloat16", 1024, 256)])   # tinygemm: the bf16 identity dominates
def test_quanto_dequantize_bytes_measured(dtype, in_f, out_f):
    import torch

    compute = getattr(torch, dtype)
    predicted = act.quanto_dequantize_bytes(in_f, out_f, compute.itemsize)
    # the input gradient (in_f values) may be alive with the dequantized weight at the end
    assert predicted <= _quanto_backward_transient_bytes(compute, in_f, out_f) <= predicted + in_f * compute.itemsize


def test_flops_by_hand(tiny):
    # per token: frozen matmuls 2 x (4 layers x 790,528 + lm_head 8,192,000) = 22,708,224; LoRA 2 x 32,768 = 65,536;
    # attention 4 x s 128 x 4 heads x 64 x 4 layers = 524,288. Forward 23,298,048; backward: input grads
    # 22,773,760 + LoRA weight grads 65,536 + attention 2 x 524,288 = 23,887,872. x 256 tokens:
    assert flops_per_step(tiny) == 256 * (23_298_048 + 23_887_872)


def test_estimate_parts_add_up_and_gpu_fields(tiny):
    e = estimate(tiny, device="cuda", gpu=gpu("T4"))
    assert set(e["breakdown"]) == set(CATEGORIES)
    assert sum(e["breakdown"].values()) == e["peak_bytes"]
    assert e["reserved_bytes"] >= e["peak_bytes"] and e["device_bytes"] > e["reserved_bytes"]
    assert e["fits"] and e["headroom_bytes"] == gpu("T4").memory_bytes - e["device_bytes"]
    assert e["predicted_tokens_per_s"] == pytest.approx(256 / (e["flops_per_step"] / (65e12 * 0.35)))
    cpu = estimate(tiny, device="cpu")
    assert cpu["breakdown"]["overhead"] == 0 and "reserved_bytes" not in cpu


def test_largest_fitting_is_the_boundary(tiny):
    t4 = gpu("T4")
    value, est = largest_fitting(tiny, t4, axis="batch_size", headroom=0.1,
                                 estimate_fn=lambda s: estimate(s, device="cuda"))
    budget = t4.memory_bytes * 0.9
    assert est["device_bytes"] <= budget
    import dataclasses

    bigger = dataclasses.replace(tiny, training=dataclasses.replace(tiny.training, batch_size=value + 1))
    assert estimate(bigger, device="cuda")["device_bytes"] > budget


def test_fit_command_exit_codes(write_scenario):
    ok = CliRunner().invoke(cli, ["fit", str(write_scenario(QUICK)), "--gpu", "T4", "--axis", "seq_len"])
    assert ok.exit_code == 0 and "seq_len = 2048 fits T4" in ok.output  # capped by max_position_embeddings
    big = write_scenario('[model]\npreset = "llama-2-70b"\n[precision]\nweights = "bf16"\n', name="big.toml")
    no = CliRunner().invoke(cli, ["fit", str(big), "--gpu", "T4"])
    assert no.exit_code == 1 and "does not fit T4 even at batch_size = 1" in no.output


def test_estimate_json_shape():
    out = CliRunner().invoke(cli, ["estimate", str(ROOT / "scenarios" / "qlora-7b.toml"), "--format", "json",
                                   "--gpu", "RTX-4090"]).output
    (rec,) = json.loads(out)
    assert {"variant", "scenario", "estimate"} <= set(rec)
    e = rec["estimate"]
    assert {"method", "device", "peak_bytes", "breakdown", "n_params", "n_trainable_params", "flops_per_step",
            "tokens_per_step", "gpu", "fits", "predicted_tokens_per_s"} <= set(e)
    assert e["method"] == "analytic" and e["device"] == "cuda" and e["n_params"] == 6_738_415_616
    csv = CliRunner().invoke(cli, ["estimate", str(ROOT / "scenarios" / "qlora-7b.toml"), "--format", "csv"]).output
    assert csv.splitlines()[0].startswith("variant,peak GiB,weights,quant_constants")


# --- issue #13: autocast dtype rules (peftprof/estimate/autocast.py) -------------------------------------------

AMP_LLAMA = '''[model]
model_type = "llama"
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 160
vocab_size = 1000
[precision]
weights = "fp32"
autocast = "bf16"
[peft]
r = 8
target_modules = ["q_proj", "v_proj"]
[training]
batch_size = 2
seq_len = 32
[run]
device = "cpu"
'''


def _saved_by_layer(s) -> dict[int, int]:
    """Measured: bytes of the distinct storages (not parameters) autograd saves inside each decoder layer during
    the step's autocast forward (torch.autograd.graph.saved_tensors_hooks), by the layer running at the time."""
    import torch

    from peftprof.run.build import build
    from peftprof.run.step import autocast_context, synthetic_batch

    built = build(s, "cpu")
    built.model.train()
    layers = list(built.model.base_model.model.model.layers)
    current, seen = [], {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.append(i))
        layer.register_forward_hook(lambda m, a, o: (current.pop(), None)[1])
    params = {p.untyped_storage().data_ptr() for p in built.model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if current and st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), (current[-1], st.nbytes()))
        return t

    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(s, "cpu"):
        built.model(input_ids=ids, labels=ids)
    out: dict[int, int] = {}
    for layer, nbytes in seen.values():
        out[layer] = out.get(layer, 0) + nbytes
    return out


def test_autocast_layer_saves_by_hand_and_measured(write_scenario):
    (s,) = load_scenario(write_scenario(AMP_LLAMA))
    # llama h=64, 4 heads x 16 (q 64, k/v 32 wide), intermediate 160, T = 2 x 32 = 64 tokens, fp32 weights under
    # bf16 autocast (2 B), LoRA r=8 on q, v:
    #   2 RMSNorms (fp32 input 4*T*64 + rsqrt 4*T)                                 2 x 16,640 = 33,280
    #   frozen weights' bf16 casts saved by their mm: q 64x64, k, v 64x32, o 64x64, gate, up, down 64x160
    #     2 * (4,096 + 2,048 + 2,048 + 4,096 + 3 x 10,240)                                     = 86,016
    #   LoRA q: lora_A's bf16 input 2*T*64 + A output 2*T*8 + cached A/B casts 2*8*(64+64) = 8,192 + 1,024 + 2,048
    #   LoRA v: 8,192 + 1,024 + 2*8*(64+32) = 1,536                                                = 22,016
    #   SDPA in bf16: q 2*T*64, k, v 2*T*32, output 2*T*64, fp32 logsumexp 4*2*4*32      = 24,576 + 1,024
    #   MLP in bf16: SiLU input, act*up's two factors 3 x 2*T*160                                  = 61,440
    # total 228,352
    assert act.activation_bytes_per_layer(s) == 228_352
    measured = _saved_by_layer(s)
    assert measured[1] == 228_352
    # layer 0: its input needs no gradient (no checkpointing), so q, k and v save no weight cast:
    # 2 * 64 * (64 + 32 + 32) = 16,384 fewer, nor does its first norm (16,640). Measured, layer 0 also lacks
    # lora_A's weight casts 2 x 2*8*64 (no gradient reaches them) and holds the rotary cos/sin, 2 x 4*32*16
    # (1 x 32 x 16 fp32, broadcast over the batch, first saved here)
    assert act.first_layer_unsaved_bytes(s) == 16_384 + 16_640
    assert measured[0] == 228_352 - 16_384 - 16_640 - 2 * 2 * 8 * 64 + 2 * 4 * 32 * 16


def test_autocast_logits_and_lm_head_by_hand(write_scenario):
    base = AMP_LLAMA.replace('seq_len = 32', 'seq_len = 16')
    (fp32,) = load_scenario(write_scenario(base, name="a.toml"))
    (bf16,) = load_scenario(write_scenario(base.replace('weights = "fp32"', 'weights = "bf16"'), name="b.toml"))
    (mixed,) = load_scenario(write_scenario(base.replace('weights = "fp32"', 'weights = "bf16"')
                                            .replace('autocast = "bf16"', 'autocast = "fp16"'), name="c.toml"))
    (plain,) = load_scenario(write_scenario(base.replace('weights = "fp32"', 'weights = "bf16"')
                                            .replace('autocast = "bf16"\n', ''), name="d.toml"))
    n = 2 * 16 * 1000  # T x vocab
    # the step holds fp32 logits under autocast (Accelerate's convert_outputs_to_fp32) + 3 fp32 loss tensors
    assert act.logits_bytes(fp32) == act.logits_bytes(bf16) == 16 * n == 512_000
    assert act.logits_bytes(plain) == (2 + 12) * n  # without autocast a bf16 model holds bf16 logits
    assert act.held_logits_bytes(bf16) == 4 * n
    # lm_head (1000 x 64) is cast per call unless it has the autocast dtype already
    assert act.lm_head_saved_bytes(fp32) == act.lm_head_saved_bytes(mixed) == 2 * 1000 * 64
    assert act.lm_head_saved_bytes(bf16) == act.lm_head_saved_bytes(plain) == 0


def test_cuda_autocast_policy_follows_torch_cuda_op_lists(write_scenario):
    """The CUDA fp32 list has layer_norm, pow and softmax; the CPU one does not (torch's python-visible mirror of
    aten/src/ATen/autocast_mode.cpp). gpt2 under bf16 autocast: its LayerNorm saves an fp32 input on CUDA and its
    tanh-GELU keeps tanh's output and 1+tanh in fp32 (2 x 2 + 2 x 4 B per element) where the CPU keeps all four
    in bf16 (4 x 2 B)."""
    import torch

    from peftprof.estimate import autocast as amp

    # read as text: importing it needs torch's test dependencies
    source = (Path(torch.__file__).parent / "testing" / "_internal" / "autocast_test_lists.py").read_text()
    cuda_src, cpu_src = source.split("class AutocastCPUTestLists")
    cuda_src = cuda_src.split("class AutocastTestLists")[1]
    for op in ('("layer_norm"', '("pow"', '("softmax"'):
        assert op in cuda_src and op not in cpu_src, op
    assert '("linear"' in cuda_src and '("linear"' in cpu_src  # lower precision on both
    (s,) = load_scenario(write_scenario('[model]\npreset = "gpt2"\n[precision]\nweights = "fp32"\nautocast = "bf16"\n'
                                        '[training]\nseq_len = 64\n'))
    assert amp.gelu_saved_bytes_per_element(s, "cpu") == 8
    assert amp.gelu_saved_bytes_per_element(s, "cuda") == 12
    assert amp.layernorm_saved_input_bytes(s, "cuda") == 4
    assert amp.norm_output_dtype(s, "cuda") == "fp32"
    saves_cpu, saves_cuda = act.layer_saves(s, "cpu"), act.layer_saves(s, "cuda")
    T, inter = 64, 3072
    assert saves_cuda["gelu"] - saves_cpu["gelu"] == 4 * T * inter
