"""X-LoRA (peft XLoraModel, tuners/xlora/; https://huggingface.co/papers/2402.07148): the analytic memory model.

K frozen LoRA experts of rank r (fp32, peft's autocast_adapter_dtype) on target_modules, gated per token by a
trained classifier in the model's dtype (classifier.py: `self.dtype = next(model.parameters()).dtype`). Each step
runs a no-grad scaling pass first (model.py `_pre_forward`), then the classifier on its last hidden state, then the
real forward. memory.py, activations.py and estimate/__init__.py call the hooks here; every function returns 0 / an
empty answer unless the method is xlora. Bytes throughout (element counts where the name says so). Checked against
the trace, which equals the CPU runner to the byte (tests/test_xlora.py, tests/test_xlora_analytic.py).
"""

from __future__ import annotations

from ..settings import Scenario, matches_target
from .widths import ADAPTER_BYTES_PER_ELEMENT, FP32, activation_bytes_per_element


def is_xlora(s: Scenario) -> bool:
    return s.peft.method == "xlora"


def expert_linears(m, a) -> tuple:
    """The linears (per decoder layer and model-level) that carry the K experts: target_modules as peft receives
    them (settings.PeftSettings.targets; its targeted_linears covers the ADAPTER_METHODS only)."""
    names = m.targets(a)
    return tuple(sp for sp in a.layer_linears + a.model_linears if any(matches_target(sp.path, t) for t in names))


def adapted_linear_count(m, a) -> int:
    """peft's n_layers (xlora/model.py convert_layers_to_xlora): every swapped LoRA linear, over all layers."""
    return sum(a.n_layers if sp in a.layer_linears else 1 for sp in expert_linears(m, a))


def classifier_tensors(m, a) -> tuple[int, ...]:
    """Element counts of the classifier's trainable tensors (xlora/classifier.py XLoraClassifier.__init__): depth 1
    one Linear(hidden -> K, K x n_adapted with layerwise gates); deeper Linear(hidden -> size), depth - 2
    Linear(size -> size), Linear(size -> K or K n_adapted); every one a weight and a bias. `hidden` is the width of
    the last hidden state (Arch.embed_dim: OPT's word_embed_proj_dim, run/xlora.py xlora_config)."""
    out = m.num_adapters * (adapted_linear_count(m, a) if m.layerwise_scalings else 1)
    widths = [a.embed_dim] + [m.xlora_size] * (m.xlora_depth - 1) + [out]
    tensors: list[int] = []
    for i, o in zip(widths, widths[1:], strict=False):
        tensors += [i * o, o]
    return tuple(tensors)


def classifier_bytes_per_element(s: Scenario) -> int:
    """The classifier's dtype, the model's first parameter's (classifier.py: no upcast; bf16 on a bf16 model)."""
    return activation_bytes_per_element(s)


def expert_bytes(s: Scenario) -> int:
    """The K frozen experts: lora_A r x in and lora_B out x r per adapted linear, fp32 (peft
    autocast_adapter_dtype; run/xlora.py expert_params counts the same values)."""
    if not is_xlora(s):
        return 0
    m, a = s.peft, s.model.arch
    per_expert = sum(m.r * (sp.in_features + sp.out_features) * (a.n_layers if sp in a.layer_linears else 1)
                     for sp in expert_linears(m, a))
    return m.num_adapters * per_expert * ADAPTER_BYTES_PER_ELEMENT


def gate_bytes(s: Scenario, T: int) -> int:
    """The softmaxed gates, batch x seq x n_adapted x K in the classifier's dtype (classifier.py forward: softmax
    saves its output; every adapted linear's `x * gate` saves a view of it)."""
    m, a = s.peft, s.model.arch
    return classifier_bytes_per_element(s) * T * adapted_linear_count(m, a) * m.num_adapters


def linear_saves(s: Scenario, spec, saved: dict[str, int], in_key: str, T: int, act: int,
                 device: str) -> dict[str, int]:
    """Tensors one adapted linear saves for backward (xlora/layer.py XLoraLinearLayer.forward): x cast once to the
    experts' fp32 (`x = x.to(lora_A.weight.dtype)`: the input itself on an fp32 stream), then per expert
    `x * gate` (mul saves x for the gate's gradient and the gate view: the gates, counted once per model), and
    with dropout one mask per expert (CPU: fp32, its input's dtype). The frozen lora_A/lora_B save nothing."""
    if not is_xlora(s) or not any(matches_target(spec.path, t) for t in s.peft.targets(s.model.arch)):
        return saved
    from .widths import adapter_dropout_mask_bytes_per_element

    out = dict(saved)
    if act == ADAPTER_BYTES_PER_ELEMENT:
        out[in_key] = act * T * spec.in_features
    else:
        out[f"{spec.path}.x_fp32"] = ADAPTER_BYTES_PER_ELEMENT * T * spec.in_features
    if s.peft.dropout > 0:
        out[f"{spec.path}.dropout_mask"] = (s.peft.num_adapters * adapter_dropout_mask_bytes_per_element(device)
                                            * T * spec.in_features)
    return out


def classifier_saved_bytes(s: Scenario, device: str = "cpu") -> int:
    """What the classifier saves (classifier.py forward, nn.Sequential): the first Linear's input, the scaling
    pass's last hidden state (model dtype, T x embed_dim); deeper, per hidden block ReLU's output, dropout's mask
    (p = 0.2; CPU: its input's dtype) and output (the next Linear's input); the softmaxed gates (`gate_bytes`)."""
    if not is_xlora(s):
        return 0
    from .activations import tokens_per_micro_batch
    from .widths import dropout_mask_bytes_per_element

    m, a = s.peft, s.model.arch
    T = tokens_per_micro_batch(s)
    c = classifier_bytes_per_element(s)
    mask = dropout_mask_bytes_per_element(s, device)
    hidden = (m.xlora_depth - 1) * (2 * c + mask) * T * m.xlora_size
    return c * T * a.embed_dim + hidden + gate_bytes(s, T)


def scaling_pass_moment(s: Scenario, grads_live: int) -> list[tuple[str, dict[str, int]]]:
    """The scaling pass (model.py _pre_forward, under no_grad, output_hidden_states=True, labels passed on): at
    its loss every hidden state (n_layers + 1, T x hidden, the last one the final norm's output), the logits and
    the loss's fp32 copies (transformers loss_utils.py ForCausalLMLoss: upcast unless fp32, log_softmax) are alive;
    nothing is saved for backward; the last step's gates are still held. A forward moment of the step
    (estimate/__init__.py step_moments). Traced on CPU (tests/test_xlora_analytic.py)."""
    if not is_xlora(s):
        return []
    from .activations import tokens_per_micro_batch

    a = s.model.arch
    T = tokens_per_micro_batch(s)
    act = activation_bytes_per_element(s)
    hidden = (a.n_layers + 1) * act * T * a.hidden_size
    logits = T * a.vocab_size * (act + (0 if act == FP32 else FP32) + FP32)
    # peft keeps the last step's gates on the model (internal_xlora_scalings) until the classifier replaces them
    return [("forward", {"gradients": grads_live, "activations": hidden + gate_bytes(s, T), "logits": logits,
                         "temporaries": 0})]



FIRST_NORMS = ("input_layernorm.", "self_attn_layer_norm.", "ln_1.")  # (as activations.FIRST_NORMS)


def first_layer_unsaved_bytes(s: Scenario, saves: dict[str, int]) -> int:
    """Layer 0's first norm saves nothing: its input, the frozen embeddings' output, needs no gradient (as for
    LoRA). Unlike LoRA, the adapted linears there still save their input and dropout masks: `x * gate` needs a
    gradient through the trained gate. Traced (tests/test_xlora_analytic.py)."""
    if not is_xlora(s) or s.training.checkpoint_every:
        return 0
    return sum(v for key, v in saves.items() if key.startswith(FIRST_NORMS))


def _last_layer_specs(s: Scenario, saves: dict[str, int]):
    """(spec, index of its last saved key or None) for each adapted linear of a decoder layer, in forward order."""
    m, a = s.peft, s.model.arch
    keys = list(saves)
    out = []
    for spec in a.layer_linears:
        if not any(matches_target(spec.path, t) for t in m.targets(a)):
            continue
        mine = [i for i, k in enumerate(keys) if k.startswith(spec.path + ".")]
        out.append((spec, mine[-1] if mine else None))
    return out


def expert_forward_transient_bytes(s: Scenario, spec, T: int) -> int:
    """Transients of the last expert of one adapted linear (xlora/layer.py XLoraLinearLayer.forward), fp32 (the
    experts' dtype): x_mod = x * gate (T x in), then the larger of dropout's output with lora_A's (T x r), lora_A's
    with lora_B's (T x out), and lora_B's with `* scaling`; beside the base output (T x out, model dtype)."""
    i, o, r = spec.in_features, spec.out_features, s.peft.r
    drop = i if s.peft.dropout > 0 else 0
    return FP32 * T * (i + max(drop + r, r + o, 2 * o)) + activation_bytes_per_element(s) * T * o


def expert_backward_transient_bytes(s: Scenario, spec, T: int) -> int:
    """Transients of one adapted linear's expert backward (K >= 2), fp32: lora_A's input gradient (T x in), the
    `x * gate` backward's two products (x's gradient and gate's before its sum over in) and x's gradient accumulated
    over the experts before (T x in each), beside the incoming gradient (T x out, model dtype), the gate's
    gradient (T x K, classifier dtype) and its fp32 sum (T). Traced on CPU."""
    c = classifier_bytes_per_element(s)
    return 4 * FP32 * T * spec.in_features + activation_bytes_per_element(s) * T * spec.out_features \
        + c * T * s.peft.num_adapters + FP32 * T


def step_moments(s: Scenario, device: str, grads_live: int) -> list[tuple[str, dict[str, int]]]:
    """X-LoRA's candidate moments of the step (estimate/__init__.py step_moments adds them): the scaling pass
    (`scaling_pass_moment`), and for each adapted linear of the last decoder layer its last expert's forward
    (saved tensors so far, the hidden states held unsaved: peft_methods._forward_stream_bytes, and
    `expert_forward_transient_bytes`) and its experts' backward (all saved tensors but those of the ops after
    it in the layer, the logits held, `expert_backward_transient_bytes`). The classifier's gradients come last
    (it runs before every layer): none are alive inside the layers' backward in a single micro-batch."""
    if not is_xlora(s) or s.training.checkpoint_every:
        return []
    from . import activations as act_mod
    from .peft_methods import _forward_stream_bytes

    a = s.model.arch
    T = act_mod.tokens_per_micro_batch(s)
    saves = act_mod.layer_saves(s, device)
    values = list(saves.values())
    per_layer = sum(values)
    model_level = act_mod.model_activation_bytes(s, device) - act_mod.final_norm_saved_bytes(s, device) \
        - act_mod.lm_head_saved_bytes(s)
    below = (a.n_layers - 1) * per_layer + model_level - act_mod.first_layer_unsaved_bytes(s, device)
    stream = activation_bytes_per_element(s)
    moments = scaling_pass_moment(s, grads_live)
    specs = _last_layer_specs(s, saves)
    for n, (spec, last) in enumerate(specs):
        is_last = n == len(specs) - 1 and spec == a.layer_linears[-1]
        if last is None and not is_last:
            continue  # (its saves are the shared input: the moment is below the last linear's)
        upto = per_layer if last is None else sum(values[:last + 1])
        held = _forward_stream_bytes(s, spec, T, stream)
        if spec.path == "mlp.c_proj" and stream != FP32 and "mlp_mid" not in saves:
            held += stream * T * spec.in_features  # gpt2's down projection: its input, the activation's output
        moments.append(("forward", {"gradients": grads_live, "activations": below + upto, "logits": 0,
                                    "temporaries": held + expert_forward_transient_bytes(s, spec, T)}))
        after = 0 if last is None else sum(values[last + 1:])  # (saved by the ops after it: their backward ran)
        # the second expert's backward (reverse order) is the largest: the last two dropout masks are freed by then
        after += 2 * saves.get(f"{spec.path}.dropout_mask", 0) // s.peft.num_adapters
        moments.append(("backward", {"gradients": grads_live, "activations": below + per_layer - after,
                                     "logits": act_mod.held_logits_bytes(s),
                                     "temporaries": expert_backward_transient_bytes(s, spec, T)}))
    return moments


XLORA_ANALYTIC_FAMILIES = ("llama", "gpt2")  # checked against the trace (tests/test_xlora_analytic.py)


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic estimator does not answer for this X-LoRA variant (None: it does). Checked against the
    trace on llama (MHA and GQA) and gpt2 without autocast; other families and autocast are not."""
    if not is_xlora(s):
        return None
    if s.model.arch.model_type not in XLORA_ANALYTIC_FAMILIES:
        return f"the analytic estimator models X-LoRA on {', '.join(XLORA_ANALYTIC_FAMILIES)} only"
    if s.precision.autocast != "none":
        return "the analytic estimator does not model X-LoRA under autocast"
    return None


def expert_flops_per_token(s: Scenario) -> int:
    """Forward FLOPs of the K experts per token: 2 per value of lora_A and lora_B (each expert runs on every token,
    dense gating: xlora/layer.py loops over all active adapters), as estimate/flops.py counts LoRA's."""
    return 2 * expert_bytes(s) // ADAPTER_BYTES_PER_ELEMENT
