"""gpt2's decoder-layer details for the analytic estimator (transformers models/gpt2/modeling_gpt2.py; read by
activations.py): what its MLP activation saves for each `activation_function` (transformers activations.py
ACT2CLS), the dtype of LayerNorm's saved mean/rstd, and SDPA's math path under attention dropout. Each rule is
checked against the fake-tensor trace (equal to the CPU measurement) in tests/test_gpt2_activations.py.
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario
from . import autocast as amp
from .widths import FP32, activation_bytes_per_element

# activation_function -> (tensors of c_fc's output shape its autograd nodes save besides its own output, whether its
# output is saved too, the moments of its backward as (its saved tensors already freed, intermediate-size gradients
# alive, bytes per element of other transients)). Ops per transformers activations.py, saved tensors per torch
# autograd derivatives.yaml (a product by a python float saves nothing, mul.Tensor both factors, pow, erf, gelu,
# silu, softplus, hardtanh, leaky_relu, hardswish, mish `self`, tanh, sigmoid, relu, sqrt `result`). A node's
# moment: its incoming gradient and what it returns (mul.Tensor: one per factor); erf's backward,
# 2/sqrt(pi) * exp(-x^2) * grad (FunctionsManual), keeps its four C++ temporaries and the result alive together.
ONE = ((0, 2, 0),)  # a one-output last node: its incoming gradient and its result
MUL = ((0, 3, 0),)  # a mul.Tensor last node: its incoming gradient and one per factor
ACT_SAVES: dict[str, tuple[int, bool, tuple[tuple[int, int, int], ...]]] = {
    # NewGELU / GELUTanh python / AccurateGELU: 0.5*x*(1+tanh(c*(x+0.044715*pow(x,3)))): pow saves x, tanh its
    # output, the last mul 0.5*x and 1+tanh
    "gelu_new": (4, False, MUL), "gelu_python_tanh": (4, False, MUL), "gelu_accurate": (4, False, MUL),
    # FastGELU 0.5*x*(1+tanh(x*0.7978845608*(1+0.044715*x*x))): (0.044715x)*x saves both, (0.797x)*(1+..) both,
    # tanh its output, the last mul 0.5*x and 1+tanh
    "gelu_fast": (7, False, MUL),
    # GELUActivation(use_gelu_python) x*0.5*(1+erf(x/sqrt(2))): erf saves x/sqrt(2), the last mul both factors
    "gelu_python": (3, False, ((0, 3, 0), (2, 7, 0))),  # erf: the last mul's 2 saves freed
    "quick_gelu": (2, False, MUL),  # x * sigmoid(1.702x): sigmoid saves its output, the mul x and it
    # one aten op saving its input (F.gelu, gelu approximate="tanh", F.silu, hardswish, leaky_relu, F.mish,
    # ReLU6 = hardtanh, PReLU: input and the 1-element weight)
    "gelu": (1, False, ONE), "gelu_pytorch_tanh": (1, False, ONE), "silu": (1, False, ONE), "swish": (1, False, ONE),
    "hardswish": (1, False, ONE), "leaky_relu": (1, False, ONE), "mish": (1, False, ONE), "relu6": (1, False, ONE),
    "prelu": (1, False, MUL),  # _prelu_kernel_backward: input and weight gradients, both input-sized
    "relu": (0, True, ONE), "sigmoid": (0, True, ONE), "tanh": (0, True, ONE),  # one op saving its output
    "relu2": (1, False, ((0, 4, 0),)),  # square(relu(x)): relu saves its output r, square (pow 2) saves r;
    # pow_backward grad * (2 * r.pow(1)): three temporaries
    "sqrtsoftplus": (1, True, MUL),  # sqrt(softplus(x)): softplus saves x, sqrt its output;
    # sqrt's backward grad / (2 * result): two temporaries
    "laplace": (1, False, ((0, 6, 0),)),  # 0.5*(1+erf((x-mu)/(sigma*sqrt 2))): erf saves its input
    "gelu_10": (2, False, ((0, 2, 2),)),  # clip(gelu(x), -10, 10): gelu saves x, clamp the gelu output;
    # clamp_backward: where((x >= min).logical_and_(x <= max), grad, 0): two 1-byte masks
}
# python-tanh GELUs: on CUDA under autocast pow is on the fp32 list, so tanh's output and 1+tanh are fp32
TANH_GELUS = ("gelu_new", "gelu_python_tanh", "gelu_accurate")


def activation_gap(s: Scenario) -> str | None:
    """Why the gpt2 analytic model cannot answer for this activation (None: it can)."""
    act = s.model.arch.hidden_act
    if s.model.arch.model_type == "gpt2" and act not in ACT_SAVES:
        return (f"the analytic estimator does not model gpt2's activation_function {act!r} (modelled: "
                f"{', '.join(sorted(ACT_SAVES))})")
    return None


def act_saved_bytes(s: Scenario, device: str, T: int) -> int:
    """Bytes the MLP activation saves besides its output (ACT_SAVES), in the c_fc output's dtype: the linear
    output dtype (estimate/autocast.py), except for the python-tanh GELUs on CUDA under autocast."""
    a = s.model.arch
    n, _, _ = ACT_SAVES[a.hidden_act]
    if a.hidden_act in TANH_GELUS:  # 4 tensors: x, tanh, 0.5*x, 1+tanh (autocast.py gelu_saved_bytes_per_element)
        return amp.gelu_saved_bytes_per_element(s, device) * T * a.intermediate_size
    return n * amp.linear_output_bytes(s) * T * a.intermediate_size


def act_saves_output(s: Scenario) -> bool:
    """The activation saves its own output, c_proj's input (relu, sigmoid, tanh, sqrtsoftplus)."""
    return ACT_SAVES[s.model.arch.hidden_act][1]


def act_backward_moments(s: Scenario) -> tuple[tuple[int, int, int], ...]:
    """The activation's backward moments (ACT_SAVES): (its saved tensors freed, intermediate-size gradients,
    bytes per element of other transients)."""
    return ACT_SAVES[s.model.arch.hidden_act][2]


def layernorm_stats_bytes(s: Scenario, device: str) -> int:
    """Bytes per row of LayerNorm's saved mean and rstd (together). CUDA: fp32 (the accumulate type). CPU
    (aten/native/layer_norm.cpp layer_norm_cpu): `param_scalar_type(input, mixed_type)`, fp32 for a half
    input with fp32 weights, else the input's dtype: bf16/fp16 models save 2-byte statistics (traced)."""
    if device == "cuda":
        return 2 * FP32
    stream = amp.stream_dtype(s)
    return 2 * (BYTES_PER_ELEMENT[stream] if stream == amp.hidden_dtype(s) else FP32)


def sdpa_math_path(s: Scenario, device: str) -> bool:
    """gpt2's attention dropout sends SDPA on CPU down its math path (aten/native/transformers/attention.cpp
    _scaled_dot_product_attention_math: matmul, softmax, dropout, matmul), whatever the dtype."""
    return s.training.attention == "sdpa" and device != "cuda" and s.model.arch.attn_dropout


def first_layer_prefix_unsaved_bytes(s: Scenario, saves: dict[str, int]) -> int:
    """Prefix tuning on gpt2: layer 0's query needs no gradient (frozen embeddings and c_attn), so q @ k^T (eager,
    and SDPA's math path) does not save the key (derivatives.yaml matmul: k is saved for q's gradient); the
    prefix-extended key needs one (traced on CPU)."""
    if s.model.arch.model_type != "gpt2" or s.peft.method != "prefix_tuning":
        return 0
    return saves.get("k", 0)


def sdpa_math_fp32(s: Scenario, device: str) -> bool:
    """gpt2's attention dropout sends SDPA on CPU down its math path, which computes half inputs in fp32
    (aten/native/transformers/attention.cpp _scaled_dot_product_attention_math: query/key/value
    `.to(at::kFloat)`): q, k, v, softmax, dropout mask and dropped probabilities are fp32 even without autocast
    (traced: a bf16 model saves six fp32 b x heads x s x s tensors per layer)."""
    return sdpa_math_path(s, device) and amp.attention_bytes(s) < FP32


def recompute_shared_bytes(s: Scenario, saves: dict[str, int], device: str) -> int:
    """What a checkpointed gpt2 block's recomputation does not allocate again: ln_1 saves its input, the
    block's checkpointed input itself (torch.utils.checkpoint keeps it; traced on CPU), except on CUDA under
    autocast, where layer_norm (fp32 list) saves an fp32 copy."""
    if s.model.arch.model_type != "gpt2" or (device == "cuda" and amp.enabled(s)):
        return 0
    return saves.get("ln_1.in", 0)


def recompute_peak_bytes(s: Scenario, saves: dict[str, int], T: int, lora_c_proj: bool) -> int:
    """Beyond the recomputed block's saved tensors: its largest moment while torch.utils.checkpoint recomputes
    a gpt2 block's forward inside backward (traced on CPU), at the MLP's c_proj:
    - the block's python locals that nothing saves: attn_output, ln_2's output and the activation's output
      (modeling_gpt2.py GPT2Block/GPT2MLP forward), unless a linear saves them (keys x2, mlp_mid);
    - c_proj's forward: with LoRA (peft lora/layer.py `result + lora_B(lora_A(x)) * scaling`) the base output,
      lora_B's fp32 output and its scaled copy, before the dropout's mask exists; else its output and the
      dropout's output beside the mask (the recomputation stops once that last saved tensor exists);
    - the residual stream's gradient (b*s*hidden) from the block above."""
    a = s.model.arch
    h = T * a.hidden_size
    out = amp.linear_output_bytes(s)
    locals_ = out * h  # attn_output (resid_dropout's output)
    if "x2" not in saves:
        locals_ += BYTES_PER_ELEMENT[amp.norm_output_dtype(s, "cpu")] * h
    if "mlp_mid" not in saves:
        locals_ += out * T * a.intermediate_size
    if lora_c_proj:
        c_proj = out * h + 2 * FP32 * h - saves.get("resid_drop2", 0)
    else:
        c_proj = 2 * out * h
    return locals_ + c_proj + amp.stream_bytes(s) * h


def mlp_backward_moments(s: Scenario, saves: dict[str, int], T: int, lora: bool, ia3_ff: bool, layer_grads: int,
                         dequantized: int) -> list[tuple[int, int, int]]:
    """The largest moments of a gpt2 MLP's backward (modeling_gpt2.py GPT2MLP: c_fc, act, c_proj, dropout), as
    activations.mlp_backward_moments: (saved bytes freed, gradient bytes of the layer made, temporaries). The
    dropout after c_proj runs its backward first (its mask freed); the residual stream's gradient (b*s*hidden)
    waits for the block's first half and, through c_proj's backward, so does c_proj's output gradient.
    1. LoRA on c_proj (peft lora/layer.py; its branch, made after the base, runs first): inside lora_A's
       backward, both adapter gradients made, the fp32 gradient of lora_A's input beside its saved input;
    2. c_proj's base backward: the gradient of its input; with LoRA also the branch's, and when lora_A got x
       itself (fp32, no dropout) the branch's gradient is a view that autograd cannot accumulate into in place
       (torch/csrc/autograd/input_buffer.cpp), so the sum, made once the base's node is done, is a third;
    IA3 scaling c_proj's input: inside its mul's backward;
    3. inside the activation's backward (act_backward_moments): c_proj's saved tensors freed (not the activation's
       own output where it saves it: relu), the incoming gradient and what the node returns.
    Traced on CPU."""
    a, m = s.model.arch, s.peft
    grad = amp.linear_output_bytes(s) * T * a.intermediate_size
    around = amp.stream_bytes(s) * T * a.hidden_size + amp.linear_output_bytes(s) * T * a.hidden_size
    drop = saves.get("resid_drop2", 0)
    c_proj = sum(v for key, v in saves.items() if key.startswith("mlp.c_proj."))
    mid = 0 if act_saves_output(s) else saves.get("mlp_mid", 0)
    x_itself = lora and not amp.enabled(s) and m.dropout == 0 and "mlp.c_proj.x_fp32" not in saves
    if lora:
        moments = [(drop + saves.get("mlp.c_proj.lora_A_out", 0), layer_grads, FP32 * T * (a.intermediate_size + m.r)
                    + around),
                   (drop + c_proj + (mid if x_itself else 0), layer_grads, 2 * grad + around + dequantized)]
        if x_itself:  # the sum, made once the base's node is done (its output gradient freed)
            moments.append((drop + c_proj + mid, layer_grads, 3 * grad + amp.stream_bytes(s) * T * a.hidden_size))
    else:
        moments = [(drop, layer_grads, grad + around + dequantized)]
    if ia3_ff:  # x.to(fp32) * ia3 (peft ia3/layer.py): its incoming fp32 gradient and both factors' (full-size)
        moments.append((drop, layer_grads, 3 * FP32 * T * a.intermediate_size + amp.stream_bytes(s) * T * a.hidden_size))
    per_save = act_saved_bytes(s, "cpu", T) // max(1, ACT_SAVES[a.hidden_act][0])
    return moments + [(drop + c_proj + mid + freed * per_save, layer_grads,
                       n_grads * grad + extra * T * a.intermediate_size + amp.stream_bytes(s) * T * a.hidden_size)
                      for freed, n_grads, extra in act_backward_moments(s)]


INT64 = 8


def model_level_bytes(s: Scenario, T: int) -> int:
    """gpt2's saved tensors outside its blocks, besides the final norm's and the embedding dropout's mask (traced):
    - the int64 arange of s made in the forward (modeling_gpt2.py cache_position, position_ids a view of it): saved
      by a trained wpe (derivatives.yaml embedding saves indices; wte's are the batch's input_ids) and kept by
      torch.utils.checkpoint as an input of every checkpointed block;
    - with checkpointing and a frozen wte, its output: enable_input_require_grads (transformers modeling_utils.py)
      makes it a leaf that requires grad, held by its AccumulateGrad node through backward; it is not layer 0's
      input (positions added, dropout), nor, with prompt tuning, has it the virtual tokens."""
    a, m, t = s.model.arch, s.peft, s.training
    if a.model_type != "gpt2":
        return 0
    total = INT64 * (T // t.batch_size) if m.method == "full" or t.checkpoint_every else 0
    if t.checkpoint_every and m.method != "full":
        total += activation_bytes_per_element(s) * t.batch_size * t.seq_len * a.hidden_size
    return total
