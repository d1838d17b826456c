"""Activation, logits and temporary memory: the tensors autograd saves for backward, per decoder layer.

Each layer is modelled as the set of distinct tensors its ops save (autograd derivatives.yaml), keyed by
name so a tensor saved by two ops counts once. Bytes throughout.
"""

from __future__ import annotations

import functools

from ..arch import LinearSpec
from ..settings import BYTES_PER_ELEMENT, Scenario, matches_target
from . import adapter_saves, gpt2_saves, lora_layer, peft_methods
from . import autocast as amp
from . import xlora as xlora_model
from .memory import embedding_gradient_bytes, quantized_linears, quanto_group_size
from .moe import moe_backward_moments, router_logits_bytes
from .rotary import (
    GEMMA_NORMS,
    normed_bytes,
    rotary_layer_saves,
    sliding_layer_ids,
    sliding_window_mask_bytes,
    window_active,
)
from .widths import (
    ADAPTER_BYTES_PER_ELEMENT,
    FP32,
    activation_bytes_per_element,
    adapter_dropout_mask_bytes_per_element,
    compute_bytes_per_element,
    dropout_mask_bytes_per_element,
    trainable_bytes_per_element,
)


def tokens_per_micro_batch(s: Scenario) -> int:
    """b * s; prompt tuning prepends num_virtual_tokens to every sequence (peft PeftModelForCausalLM)."""
    extra = s.peft.num_virtual_tokens if s.peft.method == "prompt_tuning" else 0
    return s.training.batch_size * (s.training.seq_len + extra)


def _linear_saves(s: Scenario, spec: LinearSpec, in_key: str, out_key: str, T: int, act: int,
                  device: str = "cpu", in_dtype: str = "") -> dict[str, int]:
    """Tensors saved around one linear layer (frozen or trainable base, LoRA or IA3 adapter)."""
    if amp.enabled(s):
        return _autocast_linear_saves(s, spec, in_key, T, device, in_dtype)
    saved: dict[str, int] = {}
    m, p = s.peft, s.precision
    if m.method == "full" or p.weights in ("int8", "int4"):
        # F.linear saves its input for the weight gradient; bitsandbytes MatMul8bitFp keeps ctx.A;
        # optimum-quanto's QuantizedLinearFunction saves (input, weight) (tensor/function.py)
        saved[in_key] = act * T * spec.in_features
    targeted = m.method in ("lora", "ia3") and any(matches_target(spec.path, t) for t in m.targets(s.model.arch))
    if not targeted:
        return saved
    tag = spec.path
    if m.method == "lora":
        # peft/tuners/lora/layer.py: x cast to the fp32 adapter dtype, dropout, lora_A, lora_B
        adapter = ADAPTER_BYTES_PER_ELEMENT
        if m.dropout > 0:
            saved[f"{tag}.dropout_out"] = adapter * T * spec.in_features
            saved[f"{tag}.dropout_mask"] = adapter_dropout_mask_bytes_per_element(device) * T * spec.in_features
        elif act == adapter:
            saved[in_key] = act * T * spec.in_features  # the cast is a no-op: lora_A saves x itself
        else:
            saved[f"{tag}.x_fp32"] = adapter * T * spec.in_features
        saved[f"{tag}.lora_A_out"] = adapter * T * m.r
    else:
        # peft/tuners/ia3/layer.py: feed-forward modules scale the input (saves x), others the output
        if any(matches_target(spec.path, t) for t in m.feedforward_targets(s.model.arch)):
            if act == ADAPTER_BYTES_PER_ELEMENT:
                saved[in_key] = act * T * spec.in_features
            else:  # x.to(fp32 adapter dtype) before the scaling: the mul saves that copy
                saved[f"{tag}.x_fp32"] = ADAPTER_BYTES_PER_ELEMENT * T * spec.in_features
        else:
            saved[f"{tag}.base_out"] = act * T * spec.out_features
    return saved


def _targeted(s: Scenario, spec: LinearSpec) -> bool:
    m = s.peft
    return m.method in ("lora", "ia3") and any(matches_target(spec.path, t) for t in m.targets(s.model.arch))


def _is_feedforward(s: Scenario, spec: LinearSpec) -> bool:
    return any(matches_target(spec.path, t) for t in s.peft.feedforward_targets(s.model.arch))


def _autocast_linear_saves(s: Scenario, spec: LinearSpec, in_key: str, T: int, device: str,
                           in_dtype: str) -> dict[str, int]:
    """Under autocast (estimate/autocast.py rules; each checked against the CPU runner, tests/test_autocast.py):
    a float base's mm saves the cast copy of its frozen weight (per call) and, when trained, of its input (per
    call: q, k and v cast the same input three times); bitsandbytes int8 keeps its input as given (ctx.A);
    LoRA casts x to fp32 (peft lora/layer.py), then autocast casts it to the autocast dtype for lora_A (a fresh
    copy per adapter, saved) and the cached casts of A and B are saved; dropout masks stay fp32 on CPU; IA3
    saves the base output (in the linear output dtype) or its fp32-cast input (peft ia3/layer.py)."""
    saved: dict[str, int] = {}
    m, p = s.peft, s.precision
    ac = amp.autocast_bytes(s)
    tag = spec.path
    if m.method == "full" or p.weights in ("int8", "int4"):
        cast = amp.input_cast_bytes(s, in_dtype) if m.method == "full" else 0
        if cast:
            saved[f"{tag}.x_cast"] = cast * T * spec.in_features
        else:
            saved[in_key] = BYTES_PER_ELEMENT[in_dtype] * T * spec.in_features
    w_cast = amp.frozen_weight_cast_bytes(s)
    if w_cast:
        saved[f"{tag}.w_cast"] = w_cast * spec.n_weight_params
    if not _targeted(s, spec):
        return saved
    if m.method == "lora":
        saved[f"{tag}.a_in"] = ac * T * spec.in_features
        if m.dropout > 0:
            saved[f"{tag}.dropout_mask"] = adapter_dropout_mask_bytes_per_element(device) * T * spec.in_features
        saved[f"{tag}.lora_A_out"] = ac * T * m.r
        saved[f"{tag}.lora_casts"] = ac * m.r * (spec.in_features + spec.out_features)
    elif _is_feedforward(s, spec):
        if in_dtype == amp.FP32_NAME:
            saved[in_key] = FP32 * T * spec.in_features
        else:
            saved[f"{tag}.x_fp32"] = ADAPTER_BYTES_PER_ELEMENT * T * spec.in_features
    else:
        saved[f"{tag}.base_out"] = amp.linear_output_bytes(s) * T * spec.out_features
    return saved


def activation_bytes_per_layer(s: Scenario, device: str = "cpu") -> int:
    return sum(layer_saves(s, device).values())


MLP_KEYS = ("post_attention_layernorm", "ln_2", "final_layer_norm", "x2", "gate", "act_out", "up", "mlp_mid",
            "gelu", "relu_out", "mlp.", "fc1", "fc2", "down", "resid_drop2", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "moe.")


def mlp_saved_bytes(s: Scenario, device: str = "cpu") -> int:
    """The part of a layer's saved tensors that belongs to its second half (norm 2 and the MLP)."""
    return sum(v for k, v in layer_saves(s, device).items() if k.startswith(MLP_KEYS))


def layer_saves(s: Scenario, device: str = "cpu") -> dict[str, int]:
    return dict(_layer_saves(s.model.arch, s.precision, s.peft, s.training, device))


@functools.lru_cache(maxsize=4096)  # sweeps re-ask for the same layer many times
def _layer_saves(arch, precision, peft, training, device) -> tuple:
    s = _Shim(arch, precision, peft, training)
    return tuple(_compute_layer_saves(s, device).items())


class _Shim:
    """The parts of a Scenario the per-layer model reads (hashable pieces, for the cache)."""

    def __init__(self, arch, precision, peft, training):
        self.model = type("M", (), {"arch": arch})()
        self.precision, self.peft, self.training = precision, peft, training


def _compute_layer_saves(s, device: str) -> dict[str, int]:
    """Bytes saved for backward by one decoder layer without checkpointing.

    llama family (transformers modeling_llama.py): RMSNorm computes in fp32 and saves its fp32 input and
    rsqrt; SDPA saves q, k, v, output and fp32 logsumexp (GQA without repeat when there is no mask,
    integrations/sdpa_attention.py); eager saves q, k, fp32 softmax output, its cast and v; SiLU/GELU saves
    its input, the gate*up product saves both factors. gpt2/opt: LayerNorm saves its input plus fp32
    mean/rstd; dropout saves a 1-byte mask (resid/attn/mlp dropouts of those configs).
    """
    a = s.model.arch
    act = activation_bytes_per_element(s)
    b = s.training.batch_size
    T = tokens_per_micro_batch(s)
    s_q = T // b
    s_kv = s_q + (s.peft.num_virtual_tokens if s.peft.method == "prefix_tuning" else 0)
    T_kv = b * s_kv
    q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    saved: dict[str, int] = {}
    full = s.peft.method == "full"
    lin = {spec.path.rsplit(".", 1)[-1] if a.model_type != "gpt2" else spec.path: spec for spec in a.layer_linears}

    def norm(tag: str, width: int = a.hidden_size, rows: int = T, weight: int = a.hidden_size) -> None:
        if a.norm == "rms":
            saved[f"{tag}.in_fp32"] = FP32 * T * width
            saved[f"{tag}.rsqrt"] = FP32 * rows
            if a.model_type in GEMMA_NORMS:  # normed * (1 + w.float()) saves the fp32 (1 + w)
                saved[f"{tag}.one_plus_w"] = FP32 * weight
            if full:  # weight * normalized saves the normalized tensor for the weight's gradient
                saved[f"{tag}.normed"] = normed_bytes(s) * T * width
        else:
            saved[f"{tag}.in"] = amp.layernorm_saved_input_bytes(s, device) * T * a.hidden_size
            # (gpt2: mean/rstd in the input's dtype on CPU, gpt2_saves.layernorm_stats_bytes)
            saved[f"{tag}.mean_rstd"] = (gpt2_saves.layernorm_stats_bytes(s, device) if a.model_type == "gpt2"
                                         else 2 * FP32) * T

    # dtypes of the linears' inputs (estimate/autocast.py; all the hidden dtype without autocast)
    lin_out_dtype = amp.linear_output_dtype(s)
    in_dtypes = {"x1": amp.norm_output_dtype(s, device), "x2": amp.norm_output_dtype(s, device),
                 "o_in": s.precision.autocast if amp.enabled(s) else lin_out_dtype, "mlp_mid": lin_out_dtype,
                 "relu_out": lin_out_dtype}
    lin_out = BYTES_PER_ELEMENT[lin_out_dtype]

    def linear(name: str, in_key: str, out_key: str) -> None:
        plain = _linear_saves(s, lin[name], in_key, out_key, T, act, device, in_dtypes[in_key])
        out = peft_methods.linear_saves(s, lin[name], plain, in_key, T, act, device)
        out = xlora_model.linear_saves(s, lin[name], out, in_key, T, act, device)  # X-LoRA's x * gate (xlora.py)
        if in_key == "o_in" and "attn_out" in saved and a.model_type != "phi3":
            # SDPA's CPU kernels return the output laid out as (b, s, heads, head_dim): the transpose and
            # reshape before o_proj are views of the saved attn_out, no copy (measured on CPU; not so for phi3,
            # whose q, k, v are strided slices of the fused qkv output)
            out.pop("o_in", None)
        saved.update(out)

    # CPU dropout masks take their input's dtype (dropout_mask_bytes_per_element): the linear outputs here
    mask = dropout_mask_bytes_per_element(s, device) if device == "cuda" or not amp.enabled(s) else lin_out
    att = amp.attention_bytes(s)

    def attention(k_repeat: bool) -> None:
        k_size = q_dim if k_repeat else kv_dim
        if s.peft.method == "prefix_tuning":
            if s.training.attention == "sdpa" and not gpt2_saves.sdpa_math_path(s, device):
                # the prefix makes q and kv lengths differ, so transformers passes SDPA an explicit mask
                # (masking_utils sdpa_mask: no is_causal shortcut), which torch converts to a float mask in the
                # query dtype (convert_boolean_attn_mask) in every layer's call, and the kernel saves: b x s x s_kv
                saved["prefix_mask"] = act * T * s_kv
            if k_repeat and s.training.attention == "sdpa" and not a.sliding_window:
                # the cache keeps the prefix-extended k and v beside the repeated copies SDPA saves (measured; not
                # with eager attention, nor in a sliding-window family's cache, e.g. mistral's)
                saved["kv_cache"] = 2 * att * T_kv * kv_dim
        saved["q"] = att * T * q_dim
        saved["k"] = att * T_kv * k_size
        saved["v"] = att * T_kv * k_size
        probs = b * a.n_heads * s_q * s_kv
        if a.attn_dropout and (s.training.attention == "eager" or device != "cuda"):
            # attention dropout in training: eager, and SDPA on CPU (its math fallback) save the softmax
            # output, the dropout mask and the dropped probabilities (+ scaled q/k copies: the keys above)
            soft, drop, drop_mask = amp.attention_dropout_bytes(s, device, mask)
            if not amp.enabled(s) and gpt2_saves.sdpa_math_fp32(s, device):  # SDPA's CPU math path: all fp32
                soft = drop = drop_mask = FP32
            if soft != att:  # the CPU math path's fp32 copies of q, k, v (see attention_dropout_bytes)
                saved["q"], saved["k"], saved["v"] = (soft * saved[k] // att for k in ("q", "k", "v"))
            saved["softmax"] = soft * probs
            saved["attn_dropout_mask"] = drop_mask * probs
            saved["dropped_probs"] = drop * probs
            if a.model_type == "gpt2" and s.training.attention == "sdpa" and b == 1 and soft == att:
                # gpt2 splits q, k, v from one c_attn output (modeling_gpt2.py); the math path saves scaled
                # copies of q and k (the keys above) and, for probs @ v, v folded to (b*heads, s, head_dim):
                # with b = 1 that reshape is a view that keeps the whole q|k|v storage alive, with b > 1 a
                # copy (the v above); half inputs go to fp32 copies instead (gpt2_saves.sdpa_math_fp32). Measured on CPU.
                saved["qkv_rest"] = att * T * (q_dim + 2 * kv_dim) - saved["v"]
            return
        if s.training.attention == "sdpa":
            saved["attn_out"] = att * T * q_dim
            saved["attn_lse"] = FP32 * b * a.n_heads * s_q
            if a.model_type == "phi3" and s.peft.method != "prefix_tuning":
                # phi3 slices q, k, v from one qkv_proj output (modeling_phi3.py): v stays a view of it, and
                # SDPA saves v as given, so the whole fused output stays alive (measured on CPU)
                saved["v"] = BYTES_PER_ELEMENT[lin_out_dtype] * T * (q_dim + 2 * kv_dim)
        else:
            saved["softmax_fp32"] = FP32 * probs
            if att != FP32:
                saved["probs"] = att * probs
            if a.attn_softcap:  # gemma2: tanh(scores / cap) * cap, tanh saves its output (modeling_gemma2.py)
                saved["softcap_tanh"] = att * probs

    if a.model_type == "gpt2":
        norm("ln_1")
        linear("attn.c_attn", "x1", "qkv")
        attention(False)
        linear("attn.c_proj", "o_in", "o_out")
        saved["resid_drop1"] = mask * T * a.hidden_size
        norm("ln_2")
        linear("mlp.c_fc", "x2", "fc")
        # the activation's saved tensors (gpt2_saves.ACT_SAVES: gelu_new's x, tanh, 0.5*x and 1+tanh); its output,
        # c_proj's input, counts once whether the activation (relu) or c_proj (mlp_mid below) saves it. Traced.
        gap = gpt2_saves.activation_gap(s)
        if gap:
            from . import AnalyticUnsupported

            raise AnalyticUnsupported(f"{gap}; --method trace answers")
        saved["gelu"] = gpt2_saves.act_saved_bytes(s, device, T)  # (named for the default gelu_new: any activation)
        if gpt2_saves.act_saves_output(s):
            saved["mlp_mid"] = lin_out * T * a.intermediate_size
        linear("mlp.c_proj", "mlp_mid", "mlp_out")
        saved["resid_drop2"] = mask * T * a.hidden_size
    elif a.model_type == "opt":
        norm("self_attn_layer_norm")
        for n in ("q_proj", "k_proj", "v_proj"):
            linear(n, "x1", n)
        attention(False)
        linear("out_proj", "o_in", "o_out")
        saved["resid_drop1"] = mask * T * a.hidden_size
        norm("final_layer_norm")
        linear("fc1", "x2", "fc1")
        saved["relu_out"] = lin_out * T * a.intermediate_size  # relu saves its output
        linear("fc2", "relu_out", "fc2")
        saved["resid_drop2"] = mask * T * a.hidden_size
    else:
        rotary_layer_saves(s, saved, norm, linear, attention, lin_out, T, device)
    return saved


def checkpoint_bytes_per_layer(s: Scenario, device: str = "cpu") -> int:
    """A checkpointed layer keeps only its input hidden states (torch.utils.checkpoint, non-reentrant)...
    except on int8 bases: bitsandbytes' MatMul8bitFp keeps its input as a ctx attribute (ctx.A), which
    checkpointing's saved-tensor hooks never see, so each int8 linear's input stays alive (measured)."""
    a = s.model.arch
    T = tokens_per_micro_batch(s)
    kept = amp.stream_bytes(s) * T * a.hidden_size  # the hidden dtype without autocast
    if s.precision.weights == "int8":
        # distinct inputs: attention input (q/k/v share it), o_proj's, MLP input (shared), down/fc2's, each in
        # its own dtype (estimate/autocast.py; all the hidden dtype without autocast)
        norm_out = BYTES_PER_ELEMENT[amp.norm_output_dtype(s, device)]
        kept += T * (2 * norm_out * a.hidden_size + amp.attention_bytes(s) * a.n_heads * a.head_dim
                     + amp.linear_output_bytes(s) * a.intermediate_size)
    return kept


def model_activation_bytes(s: Scenario, device: str = "cpu") -> int:
    """Saved outside the decoder layers: the final norm's input (as in `norm` above) and, for rotary models,
    the cos/sin tables every layer's rotary muls save (transformers LlamaRotaryEmbedding, shared by layers)."""
    a = s.model.arch
    act = activation_bytes_per_element(s)
    T = tokens_per_micro_batch(s)
    total = final_norm_saved_bytes(s, device) + lm_head_saved_bytes(s)
    total += xlora_model.classifier_saved_bytes(s, device)  # X-LoRA's classifier and gates (xlora.py)
    if a.n_experts:
        total += router_logits_bytes(s, T)
    prefix = s.peft.method == "prefix_tuning"
    if a.n_position_embeddings == 0 and not (prefix and a.n_layers == 1):
        # (prefix tuning: layer 0's rotary muls act on frozen q/k that need no gradient and save nothing)
        # (cos and sin follow position_ids, (1, s) when the batch gives none: broadcast over the batch)
        total += 2 * act * (T // s.training.batch_size) * a.head_dim

    total += gpt2_saves.model_level_bytes(s, T)  # (gpt2: position ids, the wte output held as a leaf)
    if a.resid_dropout and (s.training.checkpoint_every or s.peft.method in ("full", "prompt_tuning")):
        # embedding dropout (gpt2 embd_pdrop, opt dropout) saves its mask when the embeddings' output needs a
        # gradient (trained embeddings or prompt; checkpointing's enable_input_require_grads); measured on CPU
        total += dropout_mask_bytes_per_element(s, device) * T * a.hidden_size
    if s.training.checkpoint_every and s.training.attention == "eager":
        # eager attention gets an additive b x 1 x s x s_kv mask in the hidden dtype (transformers
        # masking_utils.py eager_mask); torch.utils.checkpoint keeps every input of a checkpointed layer,
        # the mask included, until that layer's backward (measured on CPU)
        b = s.training.batch_size
        k = s.training.checkpoint_every
        ckpt_full_layers = set(range(0, a.n_layers, k)) - set(sliding_layer_ids(a) if window_active(s, T) else ())
        if ckpt_full_layers:  # (layers with a sliding window take their own mask instead: below)
            total += activation_bytes_per_element(s) * b * (T // b) * (T // b)
    return total + sliding_window_mask_bytes(s, T)


def final_norm_saved_bytes(s: Scenario, device: str = "cpu") -> int:
    """The final norm's saved tensors (as in `norm` above): its backward runs before any decoder layer's, so
    they are gone by then (autograd runs nodes in reverse creation order; measured on CPU)."""
    a = s.model.arch
    T = tokens_per_micro_batch(s)
    if not a.final_norm:
        return 0
    if a.norm == "rms":  # full fine-tuning: weight * normed also saves normed, as in `norm`
        normed = normed_bytes(s) * T * a.hidden_size if s.peft.method == "full" else 0
        one_plus_w = FP32 * a.hidden_size if a.model_type in GEMMA_NORMS else 0  # as in `norm`
        return FP32 * T * a.hidden_size + FP32 * T + normed + one_plus_w
    stats = gpt2_saves.layernorm_stats_bytes(s, device) if a.model_type == "gpt2" else 2 * FP32  # as in `norm`
    return activation_bytes_per_element(s) * T * a.hidden_size + stats * T


def lm_head_saved_bytes(s: Scenario) -> int:
    """Under autocast lm_head's mm saves the per-call cast of its weight (vocab x embed_dim in the autocast
    dtype, unless lm_head already has it: estimate/autocast.py lm_head_cast_bytes) and, when trained (full),
    the cast of its input. Its backward runs first, so these are gone before any layer's (as the final norm's)."""
    a = s.model.arch
    total = amp.lm_head_cast_bytes(s) * a.vocab_size * a.embed_dim
    total += adapter_saves.trained_lm_head_saved_bytes(s)  # modules_to_save = ["lm_head"] (estimate/adapter_saves.py)
    if s.peft.method == "full":
        if amp.enabled(s):  # the input's cast, or the input itself when it has the autocast dtype (traced)
            norm_out = amp.norm_output_dtype(s, "cpu")
            total += (amp.input_cast_bytes(s, norm_out) or BYTES_PER_ELEMENT[norm_out]) * tokens_per_micro_batch(s) \
                * a.embed_dim
        else:  # F.linear saves its input, the final norm's output, for the trained weight (measured on CPU)
            total += activation_bytes_per_element(s) * tokens_per_micro_batch(s) * a.embed_dim
    return total


def activation_bytes(s: Scenario, device: str = "cpu") -> int:
    """Saved activations at the start of backward: every k-th layer checkpointed (k = checkpoint_every)
    keeps only its input, the others everything, plus the model-level tensors."""
    n = s.model.arch.n_layers
    k = s.training.checkpoint_every
    per_layer = activation_bytes_per_layer(s, device)
    n_ckpt = len(range(0, n, k)) if k else 0
    return n_ckpt * checkpoint_bytes_per_layer(s) + (n - n_ckpt) * per_layer + model_activation_bytes(s, device) - \
        first_layer_unsaved_bytes(s, device)


FIRST_NORMS = ("input_layernorm.", "self_attn_layer_norm.", "ln_1.")  # each family's norm before attention
QK_NORMS = ("self_attn.q_norm.", "self_attn.k_norm.")
FIRST_INPUTS = tuple(f"self_attn.{n}." for n in ("q_proj", "k_proj", "v_proj", "qkv_proj")) + ("attn.c_attn.",)


def first_layer_unsaved_bytes(s: Scenario, device: str = "cpu") -> int:
    """Prefix tuning: before layer 0's attention nothing requires a gradient (frozen embeddings, norm and
    projections; the trainable prefix enters as past keys/values), so autograd records no node there and that
    norm and the q/k/v projections save nothing (only the attention onwards does). Measured on CPU."""
    if s.training.checkpoint_every or adapter_saves.embedding_trained(s):  # (a trained embedding copy: adapter_saves)
        return 0
    total = 0
    m, a = s.peft, s.model.arch
    saves = layer_saves(s, device)
    if m.method == "prefix_tuning":
        total = sum(v for key, v in saves.items() if key.startswith(FIRST_NORMS + QK_NORMS) or key == "x1")
        total += gpt2_saves.first_layer_prefix_unsaved_bytes(s, saves)  # (gpt2: layer 0's key)
    elif m.method in adapter_saves.ADAPTER_METHODS:
        # the same holds for the first norm of LoRA/IA3 (frozen embeddings, no gradient into the layer's input:
        # the adapters' own saves of its output stay), and for q_norm/k_norm on an untargeted projection
        total = sum(v for key, v in saves.items() if key.startswith(FIRST_NORMS))
        # LoRA dropout on that input saves no mask either (its output, lora_A's input, stays)
        total += sum(v for key, v in saves.items() if key.endswith(".dropout_mask") and key.startswith(FIRST_INPUTS))
        if a.qk_norm:
            specs = {spec.name: spec for spec in a.layer_linears}
            for proj, tag in (("q_proj", "self_attn.q_norm."), ("k_proj", "self_attn.k_norm.")):
                if not _targeted(s, specs[proj]):
                    total += sum(v for key, v in saves.items() if key.startswith(tag))
        total += lora_layer.first_layer_unsaved_bytes(s, saves)
    total += peft_methods.first_layer_unsaved_bytes(s, layer_saves(s, device))  # DoRA (estimate/peft_methods.py)
    total += adapter_saves.first_layer_unsaved_bytes(s, saves)  # LoHa, LoKr, OFT (estimate/adapter_saves.py)
    total += xlora_model.first_layer_unsaved_bytes(s, saves)  # X-LoRA (estimate/xlora.py)
    return total + _first_layer_unsaved_casts(s, device)


ATTENTION_SAVES = ("q", "k", "v", "attn_out", "attn_lse", "softmax_fp32", "probs", "softcap_tanh", "softmax",
                   "attn_dropout_mask", "dropped_probs")  # the keys `attention` above saves


LAYER_LINEAR_GROUPS = {  # each family's decoder-layer linears in forward order, grouped by shared input
    "gpt2": (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    "opt": (("q_proj", "k_proj", "v_proj"), ("out_proj",), ("fc1",), ("fc2",)),
    "llama": (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
}


def _first_layer_unsaved_casts(s: Scenario, device: str) -> int:
    """Under autocast a frozen base's mm saves its weight's cast only when its input needs a gradient. Without
    checkpointing (no enable_input_require_grads) the embeddings need none, so layer 0's linears save nothing
    up to the first trainable point: the first group holding an adapter (LoRA and IA3 output scaling act after
    the base; IA3 feed-forward scaling before it, so that base saves), or the attention for prefix tuning
    (autograd derivatives.yaml mm; measured on CPU). Full fine-tuning and prompt tuning train what comes first."""
    m = s.peft
    if not amp.frozen_weight_cast_bytes(s) or m.method not in ("lora", "ia3", "prefix_tuning"):
        return 0
    a = s.model.arch
    groups = LAYER_LINEAR_GROUPS.get(a.model_type, LAYER_LINEAR_GROUPS["llama"])
    saves = layer_saves(s, device)
    specs = {spec.path.rsplit(".", 1)[-1] if a.model_type != "gpt2" else spec.path: spec for spec in a.layer_linears}
    unsaved = 0
    for group in groups:
        members = [specs[n] for n in group if n in specs]  # (a family with other names: no correction there)
        unsaved += sum(saves.get(f"{spec.path}.w_cast", 0) for spec in members
                       if not (m.method == "ia3" and _targeted(s, spec) and _is_feedforward(s, spec)))
        if m.method == "prefix_tuning" or any(_targeted(s, spec) for spec in members):
            break
    return unsaved


def layer_backward_peak(s: Scenario, grads: int, grads_live: int, device: str = "cpu") -> dict[str, int]:
    """The largest moment inside a decoder layer's backward, scanning layers from last to first. At layer
    i: gradients of lm_head and of layers above i (full fine-tuning: per-layer parameter gradients
    accumulate as backward goes down; the untied embedding's comes last), saved tensors of layers 0..i
    (those above were freed), the model's logits held by the outputs, and as temporaries the recomputed
    layer i when checkpointed plus the start of its backward."""
    a = s.model.arch
    n, k = a.n_layers, s.training.checkpoint_every
    full = s.peft.method == "full"
    per_layer_grad = 0
    if full:
        # linears, norms and the other layer parameters (q/k norms, router, expert stacks)
        per_layer_grad = a.layer_param_count * trainable_bytes_per_element(s)
    if full:
        top_grads = grads - n * per_layer_grad - embedding_gradient_bytes(s)
        if a.model_type == "gpt2":  # wpe's gradient (learned positions, an embedding) comes last, as wte's (traced)
            top_grads -= a.n_position_embeddings * a.hidden_size * trainable_bytes_per_element(s)
    elif s.peft.method in adapter_saves.ADAPTER_METHODS:  # adapters in every layer: gradients arrive layer by layer
        top_saved, bottom_saved = adapter_saves.saved_module_gradient_bytes(s)  # modules_to_save: first and last
        per_layer_grad = (grads - top_saved - bottom_saved) // n
        top_grads = grads - n * per_layer_grad - bottom_saved
    else:  # prompt/prefix: the one trainable tensor gets its gradient after every layer's backward
        top_grads = 0
    per_layer, ckpt = activation_bytes_per_layer(s, device), checkpoint_bytes_per_layer(s)
    recomputed = per_layer - gpt2_saves.recompute_shared_bytes(s, layer_saves(s, device), device)  # (gpt2: ln_1.in)
    recomputed -= lora_layer.rms_input_is_checkpoint_bytes(s, device)
    held = [ckpt if k and i % k == 0 else per_layer for i in range(n)]
    held[0] -= first_layer_unsaved_bytes(s, device)
    common = {"logits": held_logits_bytes(s), "temporaries": 0}
    best: dict[str, int] = {}
    below = sum(held)
    mlp = mlp_saved_bytes(s, device)
    model_level = model_activation_bytes(s, device) - final_norm_saved_bytes(s, device) - lm_head_saved_bytes(s)
    mlp_moments, attn_temps = mlp_backward_moments(s, device), attention_backward_temporary_bytes(s)
    for i in range(n - 1, -1, -1):
        one_step = s.training.grad_accum_steps == 1
        g = top_grads + (n - 1 - i) * per_layer_grad if one_step else grads
        ckpt_i = bool(k) and i % k == 0
        # the layer's MLP backward (first): the layer saved (recomputed if checkpointed) less what is freed
        cands = [{**common, "gradients": max(g + (layer_grads if one_step else 0), grads_live),
                  "activations": below + model_level - (0 if ckpt_i else freed),
                  "temporaries": (recomputed - freed if ckpt_i else 0) + temps}
                 for freed, layer_grads, temps in mlp_moments]
        if ckpt_i and a.model_type == "gpt2":  # the recomputed forward's c_proj (gpt2_saves.recompute_peak_bytes)
            cands.append({**common, "gradients": max(g, grads_live), "activations": below + model_level,
                          "temporaries": recomputed + gpt2_saves.recompute_peak_bytes(
                              s, layer_saves(s, device), tokens_per_micro_batch(s), _gpt2_lora_c_proj(s))})
        if ckpt_i:  # the recomputed forward's own moments (lora_layer.recompute_forward_peak_bytes)
            cands.append({**common, "gradients": max(g, grads_live), "activations": below + model_level,
                          "temporaries": lora_layer.recompute_forward_peak_bytes(s, device)})
        # inside attention's backward: the layer's MLP part is freed
        cands.append({**common, "gradients": max(g, grads_live),
                      "activations": below - (0 if ckpt_i else mlp) + model_level,
                      "temporaries": (recomputed - mlp if ckpt_i else 0) + attn_temps})
        cands += adapter_saves.layer_backward_moments(  # LoHa/LoKr/VeRA/OFT branches' backward (adapter_saves.py)
            s, device, common={**common, "gradients": max(g, grads_live)}, below=below + model_level,
            recomputed=recomputed if ckpt_i else 0)
        for cand in cands:
            if sum(cand.values()) > sum(best.values()):
                best = cand
        below -= held[i]
    if lora_layer.recompute_forward_peak_bytes(s, device) or (s.peft.method == "lora" and not s.training.checkpoint_every
                                                   and lora_layer.final_rms_backward_bytes(s)):
        # the final RMSNorm's backward, all activations still saved: its fp32 gradient chain through the
        # mul/rsqrt/mean/pow of modeling_llama.py LlamaRMSNorm, five b*s*hidden fp32 tensors at once (traced)
        cand = {"gradients": grads_live, "activations": activation_bytes(s, device), "logits": held_logits_bytes(s),
                "temporaries": lora_layer.final_rms_backward_bytes(s)}
        if sum(cand.values()) > sum(best.values()):
            best = cand
    for cand in adapter_saves.lm_head_backward_moments(s, device, grads_live):  # a trained lm_head copy (adapter_saves)
        if sum(cand.values()) > sum(best.values()):
            best = cand
    return best


def _gpt2_lora_c_proj(s: Scenario) -> bool:
    down = next(spec for spec in s.model.arch.layer_linears if spec.path == "mlp.c_proj")
    return s.peft.method == "lora" and _targeted(s, down)


def logits_bytes(s: Scenario) -> int:
    """Logits and the loss's copies at their peak, the start of backward (transformers loss_utils.py
    ForCausalLMLoss upcasts to fp32; cross_entropy = log_softmax + nll_loss): the model's logits in the
    lm_head output dtype (kept by the output object), the fp32 log_softmax output, nll_loss's fp32 input
    gradient and log_softmax's fp32 input gradient. An fp32 model needs no separate upcast."""
    a = s.model.arch
    n = tokens_per_micro_batch(s) * a.vocab_size
    # gemma2's final soft-capping, tanh(logits / cap) * cap (modeling_gemma2.py): tanh saves its output
    # (under autocast tanh's output stays in the autocast dtype of lm_head's output: measured)
    softcap = 0
    if a.final_softcap:
        softcap = amp.autocast_bytes(s) if amp.enabled(s) else amp.held_logits_bytes_per_element(s)
    return n * (amp.held_logits_bytes_per_element(s) + 3 * FP32 + softcap)


def held_logits_bytes(s: Scenario) -> int:
    """The model's logits, kept by the output object through backward (transformers' no_trainer loop:
    `outputs = model(**batch); outputs.loss.backward()`)."""
    return tokens_per_micro_batch(s) * s.model.arch.vocab_size * amp.held_logits_bytes_per_element(s)


def dequantized_weight_bytes(s: Scenario) -> int:
    """The transients of dequantizing the largest quantized weight while its matmul runs: bitsandbytes
    dequantize_4bit / MatMul8bitFp give one weight in the compute dtype; optimum-quanto (int4) see
    `quanto_dequantize_bytes`."""
    if not s.precision.is_quantized:
        return 0
    compute = compute_bytes_per_element(s)
    if s.precision.weights == "int4":
        return max(quanto_dequantize_bytes(spec.in_features, spec.out_features, compute)
                   for spec in quantized_linears(s.model.arch))
    return compute * max(spec.n_weight_params for spec in quantized_linears(s.model.arch))


QUANTO_TINYGEMM_GROUP = 128  # optimum-quanto tensor/weights/qbits.py WeightQBitsTensor.create: the CPU tinygemm layout
BF16 = 2


def quanto_dequantize_bytes(in_features: int, out_features: int, compute: int) -> int:
    """Peak transients of one optimum-quanto qint4 weight's dequantization (tensor/qtensor.py qfallback: every
    matmul the backward runs on it, and the forward's outside the tinygemm layout). Measured on CPU with the
    tracker seeing into quanto's ops (n = in x out):
    - plain layout (tensor/qbits.py QBitsDequantizer.forward): unpacked codes, one uint8 each, alive while
      `scale * data` makes the weight in the compute dtype: (1 + compute) * n;
    - tinygemm layout (bf16 scales and group 128, WeightQBitsTensor.create): tinygemm/packed.py unpack
      multiplies an in x in bf16 identity by the packed weight (_weight_int4pack_mm_for_cpu, bf16 in x out
      output, with an (in/32, out, 2) bf16 identity scale/shift: n/8 B), then tinygemm/qbits.py
      weight_qbits_tensor recomputes a bf16 shift per group (n/64 B), repacks the codes (n/2 B) and dequantizes
      as above (unpacked n, bf16 2n): the larger of 2*in^2 + 2n + n/8 and 3.5n + n/64."""
    n = in_features * out_features
    if compute == BF16 and quanto_group_size(in_features, out_features) == QUANTO_TINYGEMM_GROUP:
        return max(BF16 * in_features * in_features + BF16 * n + n // 8, n // 2 + n + BF16 * n + n // 64)
    return (1 + compute) * n


DOWN_PROJECTIONS = ("down_proj", "mlp.c_proj", "fc2")  # the MLP's last linear: llama family, gpt2, opt


def mlp_backward_moments(s: Scenario, device: str = "cpu") -> list[tuple[int, int, int]]:
    """The largest moments of one layer's MLP backward, as (saved bytes already freed, gradient bytes of the
    layer already made, temporaries). Autograd runs nodes in reverse creation order (torch/csrc/autograd
    engine.cpp: ready queue by sequence number) and frees a node's saved tensors once it has run:
    1. the down projection's base backward: the gradient of its input (b*s*intermediate) and a dequantized
       weight for quantized bases. A LoRA branch on it (peft lora/layer.py: result + lora_B(lora_A(x)), made
       after the base) has run first: its saved tensors are freed, its gradients made, and its input gradient
       waits for the base's to be summed (2 x b*s*intermediate).
    2. gated MLPs (llama family): the backward of act(gate) * up holds the incoming gradient and the
       gradients of both factors (derivatives.yaml mul.Tensor), 3 x b*s*intermediate, the down projection's
       saved tensors all freed.
    Measured on CPU."""
    a = s.model.arch
    if a.n_experts:
        return moe_backward_moments(s, layer_saves(s, device), tokens_per_micro_batch(s))
    grad = amp.linear_output_bytes(s) * tokens_per_micro_batch(s) * a.intermediate_size
    down = next(spec for spec in a.layer_linears if spec.path.endswith(DOWN_PROJECTIONS))
    saves = layer_saves(s, device)
    m = s.peft
    lora = m.method == "lora" and any(matches_target(down.path, t) for t in m.targets(a))
    base_saves_input = m.method == "full" or s.precision.weights in ("int8", "int4")
    lora_saves = sum(v for key, v in saves.items() if key.startswith(down.path + "."))
    if lora and not base_saves_input and not amp.enabled(s):
        lora_saves += saves.get("mlp_mid", 0)  # lora_A saved x itself (fp32 hidden stream, no dropout)
    if lora:
        layer_grads = m.r * (down.in_features + down.out_features) * ADAPTER_BYTES_PER_ELEMENT
    elif m.method == "full":  # the weight's gradient comes with the input's (F.linear backward)
        layer_grads = (down.n_weight_params + (down.out_features if down.bias else 0)) * trainable_bytes_per_element(s)
    else:
        layer_grads = 0
    moments = [(lora_saves if lora else 0, layer_grads, (2 if lora else 1) * grad + dequantized_weight_bytes(s))]
    compute = compute_bytes_per_element(s)
    if lora and s.precision.weights in ("nf4", "fp4") and not amp.enabled(s) and compute != amp.linear_output_bytes(s):
        # bitsandbytes MatMul4Bit's backward runs in the compute dtype (bnb autograd/_functions.py): the incoming
        # gradient's cast (b*s*hidden) and the base's input gradient before its cast back, beside the LoRA branch's
        T = tokens_per_micro_batch(s)
        moments[0] = (lora_saves, layer_grads, grad + compute * T * (a.intermediate_size + a.hidden_size)
                      + dequantized_weight_bytes(s))
    if a.model_type not in ("gpt2", "opt"):
        moments.append((lora_saves + saves.get("mlp_mid", 0) * (not lora or base_saves_input), layer_grads, 3 * grad))
        # the residual stream's gradient (b*s*hidden) waits beside the MLP's backward for the layer's residual add
        # (modeling_llama.py `hidden_states = residual + hidden_states`; traced)
        resid = amp.stream_bytes(s) * tokens_per_micro_batch(s) * a.hidden_size
        moments = [(freed, grads_made, temps + resid) for freed, grads_made, temps in moments]
    if a.model_type == "gpt2":  # (gpt2_saves.mlp_backward_moments)
        ia3_ff = m.method == "ia3" and _targeted(s, down) and _is_feedforward(s, down)
        return gpt2_saves.mlp_backward_moments(s, saves, tokens_per_micro_batch(s), lora, ia3_ff, layer_grads,
                                               dequantized_weight_bytes(s))
    return moments


def attention_backward_temporary_bytes(s: Scenario) -> int:
    """Transients inside attention's backward (the MLP's saved tensors already freed). Eager: the gradient
    of the probabilities and softmax's fp32 input gradient, both b*heads*s*s_kv; SDPA: the q, k, v
    gradients. Measured on CPU."""
    a = s.model.arch
    act = amp.attention_bytes(s)  # the hidden dtype without autocast
    b = s.training.batch_size
    T = tokens_per_micro_batch(s)
    s_kv = T // b + (s.peft.num_virtual_tokens if s.peft.method == "prefix_tuning" else 0)
    if s.training.attention == "eager":
        return (act + FP32) * b * a.n_heads * (T // b) * s_kv + dequantized_weight_bytes(s)
    return act * (T * a.n_heads * a.head_dim + 2 * b * s_kv * a.n_kv_heads * a.head_dim) + dequantized_weight_bytes(s)


