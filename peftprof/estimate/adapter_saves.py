"""Analytic coverage of the PEFT methods and LoRA options other than plain LoRA and DoRA (LoHa, LoKr, VeRA, OFT,
modules_to_save, target_parameters, cat's combined adapter): why the analytic estimator cannot answer, the tensors
one adapted linear saves for backward, and the moments of their backward. peft_methods.py, memory.py and
activations.py call these hooks; each returns the plain answer unchanged where the method or option is off. Bytes.

Modelled (peft 0.21.2, llama-family models on one device, without autocast; each checked against the trace, which
equals the CPU runner, tests/test_adapter_saves.py):
- modules_to_save = embed_tokens and/or lm_head (untied): full trainable copies in the module's dtype, their
  gradients and optimizer states (memory.trainable_tensor_widths), a trained lm_head's saved input, a trained
  embedding's effect on layer 0 (its input then needs a gradient);
- cat's combined adapter: rank K r (peft_methods.combined_rank) in its base layer's float dtype;
- LoHa, LoKr, VeRA, OFT: saved tensors per adapted linear, frozen buffers, and the backward of the adapter branch
  (LoHa/LoKr: several out x in delta-weight gradients; VeRA: tokens x out products).
The rest (other modules, tied embeddings, several ranks, autocast, gpt2/opt, MoE, combinations of these options)
stays with the trace: `analytic_gap` says why.
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario

TRACE_ONLY_METHODS = ("loha", "lokr", "vera", "oft")
ADAPTER_METHODS = ("lora", "ia3", "loha", "lokr", "vera", "oft")
MODELLED_SAVED_MODULES = ("embed_tokens", "lm_head")  # the llama family's names (rules_peft.SAVABLE_DEFAULT)
FP32 = 4


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic estimator cannot answer for this variant's method or LoRA option (None: it can). `s` may
    carry only `peft` (rules_distributed asks before a Scenario exists: then the variant runs on several ranks)."""
    m = s.peft
    if m.method == "lora" and m.combination == "cat":
        why = _cat_gap(s)
        if why:
            from .peft_methods import combined_rank  # (peft_methods.py imports this module)

            return f"the analytic estimator does not model cat's rank-{combined_rank(m)} combined adapter {why}"
    if m.method in TRACE_ONLY_METHODS:
        why = _common_gap(s) or _vera_gap(s) or _layer_names_gap(s)
        if why:
            return f"the analytic estimator does not model {m.method} {why}"
    if m.modules_to_save:
        why = _saved_modules_gap(s) or ("with DoRA" if m.use_dora else None) or (
            f"with {m.method}" if m.method in TRACE_ONLY_METHODS else None)  # (combinations not checked)
        if why:
            return f"the analytic estimator does not model modules_to_save {why}"
    if m.target_parameters:
        return "the analytic estimator does not model target_parameters (LoRA on parameters)"
    return None


def _saved_modules_gap(s) -> str | None:
    m = s.peft
    other = [n for n in m.modules_to_save if n not in MODELLED_SAVED_MODULES]
    if other:
        return f"{', '.join(other)} (only {' and '.join(MODELLED_SAVED_MODULES)} of the llama family)"
    why = _common_gap(s)
    if why:
        return why
    if s.model.arch.tied_embeddings:
        return "with tied embeddings (peft wraps the tied module: not checked)"
    if s.precision.weights in ("int8", "int4"):
        return f"on {s.precision.weights} weights"
    return None


def _layer_names_gap(s) -> str | None:
    """LoHa, LoKr, OFT: the saves and moments below follow the llama family's linears
    (activations.LAYER_LINEAR_GROUPS["llama"]); fused ones (phi3's qkv_proj, gate_up_proj) are not modelled. All four
    without checkpointing: layer 0 saves nothing before its first adapter, which activations.first_layer_unsaved_bytes
    models for LoRA only (it keeps the q/k norms' saves of a LoHa-adapted q_proj out; an o/MLP-only adapter leaves
    layer 0's attention unsaved). Measured on the trace (fuzzer f30741, f10443, f40013: -11% to +10%)."""
    from .activations import LAYER_LINEAR_GROUPS  # (activations.py imports this module)

    known = {n for group in LAYER_LINEAR_GROUPS["llama"] for n in group}
    other = [sp.path.rsplit(".", 1)[-1] for sp in s.model.arch.layer_linears if sp.path.rsplit(".", 1)[-1] not in known]
    if other and s.peft.method != "vera":  # (VeRA's moments do not depend on them: phi3 within 0.3% on the trace)
        return f"on {s.model.arch.model_type} (linears {', '.join(other)})"
    if s.training.checkpoint_every:
        return None
    if s.model.arch.qk_norm:
        return "without gradient checkpointing on a model with q/k norms"
    if not any(_targeted(s, sp) for sp in s.model.arch.layer_linears if sp.path.rsplit(".", 1)[-1] in
               LAYER_LINEAR_GROUPS["llama"][0] + ("qkv_proj",)):
        return "without gradient checkpointing and without an adapter on q_proj, k_proj or v_proj"
    return None


def _common_gap(s) -> str | None:
    """What the newer options were not checked against (the trace answers there)."""
    dist = getattr(s, "distributed", None)
    if dist is None or dist.world_size > 1:
        return "on several ranks (the per-rank terms assume one dtype for all trainable tensors)"
    a = s.model.arch
    if a.model_type in ("gpt2", "opt"):
        return f"on {a.model_type}"
    if a.n_experts:
        return "on mixture-of-experts models"
    if s.precision.autocast != "none":
        return "under autocast"
    if s.inference.enabled:
        return "when serving"
    return None


def _vera_gap(s) -> str | None:
    if s.peft.method == "vera" and s.training.checkpoint_every and s.precision.weights != "fp32":
        # measured on the trace: the recomputed layer's backward holds more than layer_backward_moments counts (up
        # to 8% low on tiny bf16 models, where plain LoRA is 3-5% low)
        return f"with gradient checkpointing on {s.precision.weights} weights"
    return None


def _cat_gap(s) -> str | None:
    why = _common_gap(s)
    if why:
        return why
    if s.precision.weights not in ("fp32", "fp16", "bf16", "nf4", "fp4"):
        return f"on {s.precision.weights} weights"
    if s.peft.use_dora:
        return "with DoRA"
    return None


# --- modules_to_save ---------------------------------------------------------------------------------------------

def _saved(s, name: str) -> bool:
    return s.peft.method in ADAPTER_METHODS and name in s.peft.modules_to_save


def saved_module_tensors(s) -> list[tuple[int, int]]:
    """(elements, bytes per element) of modules_to_save's trained copies: peft deep-copies the module
    (utils/other.py ModulesToSaveWrapper.update, copy.deepcopy), so the copy has the module's dtype: the model's
    float dtype, fp32 on a bitsandbytes model (prepare_model_for_kbit_training upcasts non-quantized parameters
    before get_peft_model, run/build.py adapt); embed_tokens and lm_head are vocab x hidden (no bias in the llama
    family)."""
    from .widths import non_quantized_bytes_per_element

    a = s.model.arch
    width = non_quantized_bytes_per_element(s)
    return [(a.vocab_size * a.embed_dim, width) for n in MODELLED_SAVED_MODULES if _saved(s, n)]


def embedding_trained(s) -> bool:
    """A trained embedding copy makes layer 0's input need a gradient: that layer saves what a checkpointed one
    does (activations.first_layer_unsaved_bytes is 0; measured on the trace: the first norm's fp32 input and rsqrt)."""
    return _saved(s, "embed_tokens")


def saved_module_gradient_bytes(s) -> tuple[int, int]:
    """(before, after) the decoder layers' backward: the trained lm_head's weight gradient comes first (its
    backward runs before any layer's), the embedding's last (autograd runs nodes in reverse creation order)."""
    from .widths import non_quantized_bytes_per_element

    one = s.model.arch.vocab_size * s.model.arch.embed_dim * non_quantized_bytes_per_element(s)
    return one * _saved(s, "lm_head"), one * _saved(s, "embed_tokens")


def trained_lm_head_saved_bytes(s) -> int:
    """A trained lm_head copy's F.linear saves its input, the final norm's output, in the hidden dtype, for the
    weight's gradient (autograd derivatives.yaml mm; as full fine-tuning's lm_head, activations.lm_head_saved_bytes)."""
    if not _saved(s, "lm_head"):
        return 0
    from .activations import tokens_per_micro_batch
    from .widths import activation_bytes_per_element

    return activation_bytes_per_element(s) * tokens_per_micro_batch(s) * s.model.arch.embed_dim


def lm_head_backward_moments(s, device: str, grads_live: int) -> list[dict[str, int]]:
    """The end of a trained lm_head copy's backward (it runs first): its weight gradient and its input's made, the
    gradient of the logits (in their dtype) beside the held logits, and every saved tensor, its own input too (a
    node frees them once it has run; autograd derivatives.yaml mm). Measured on the trace, where this moment is the
    peak when the lm_head gradient outweighs the loss's fp32 logits copies."""
    if not _saved(s, "lm_head"):
        return []
    from . import activations as act_mod  # (activations.py imports this module)
    from .widths import activation_bytes_per_element

    top, _ = saved_module_gradient_bytes(s)
    T = act_mod.tokens_per_micro_batch(s)
    return [{"gradients": max(top, grads_live), "logits": 2 * act_mod.held_logits_bytes(s),
             "activations": act_mod.activation_bytes(s, device),
             "temporaries": activation_bytes_per_element(s) * T * s.model.arch.embed_dim}]


# --- the adapter's dtype ------------------------------------------------------------------------------------------

def adapter_bytes_per_element(s) -> int:
    """fp32 (peft's autocast_adapter_dtype), but cat's combined adapter, which peft creates in its base layer's float
    dtype and add_weighted_adapter fills in place without upcasting (run/build.py _cast_combined_like_peft)."""
    m, p = s.peft, s.precision
    if m.method == "lora" and m.combination == "cat":
        if p.weights in ("fp4", "nf4"):
            return BYTES_PER_ELEMENT[p.compute_dtype]
        return BYTES_PER_ELEMENT.get(p.weights, FP32) if p.weights in ("fp32", "fp16", "bf16") else FP32
    return FP32


def _targeted(s, spec) -> bool:
    from ..settings import matches_target

    return any(matches_target(spec.path, t) for t in s.peft.targets(s.model.arch))


def linear_saves(s: Scenario, spec, saved: dict[str, int], in_key: str, T: int, act: int,
                 device: str) -> dict[str, int]:
    """Tensors one adapted linear saves for backward under this method, given what plain LoRA saves (`saved`);
    `saved` itself where the method is plain LoRA or DoRA (peft_methods.linear_saves adds DoRA's)."""
    m = s.peft
    if m.method == "lora" and m.combination == "cat" and _targeted(s, spec):
        return _cat_linear_saves(s, spec, saved, in_key, T, act, device)
    if m.method in TRACE_ONLY_METHODS and _targeted(s, spec):
        return {**saved, **_method_linear_saves(s, spec, in_key, T, act, device)}
    return saved


def first_layer_unsaved_bytes(s, saves: dict[str, int]) -> int:
    """Without checkpointing layer 0's input needs no gradient (frozen embeddings): up to and including the first
    group of linears holding an adapter (activations.LAYER_LINEAR_GROUPS), LoHa's and LoKr's F.linear(x, delta_weight)
    and OFT's einsum(x, R) do not save their weight-like operand (only x's gradient would need it). Measured on the
    trace."""
    if s.peft.method not in TRACE_ONLY_METHODS or s.training.checkpoint_every:
        return 0
    from .activations import LAYER_LINEAR_GROUPS  # (activations.py imports this module)

    specs = {spec.path.rsplit(".", 1)[-1]: spec for spec in s.model.arch.layer_linears}
    unsaved = 0
    for group in LAYER_LINEAR_GROUPS["llama"]:
        members = [specs[n] for n in group if n in specs]
        unsaved += sum(saves.get(f"{spec.path}.delta_weight", 0) for spec in members)
        if any(_targeted(s, spec) for spec in members):
            break
    return unsaved


IN_KEYS = ("x1", "o_in", "x2", "mlp_mid")  # the input key of each group of activations.LAYER_LINEAR_GROUPS["llama"]
DELTA_BACKWARD_COPIES = {"loha": 5, "lokr": 3}  # out x in fp32 tensors alive inside the delta weight's backward


def layer_backward_moments(s, device: str, *, common: dict[str, int], below: int, recomputed: int) -> list[dict]:
    """Inside the backward of one adapted linear's adapter branch (LoHa, LoKr, VeRA: added after the base output, so
    its backward runs first), one moment per adapted linear of the layer. Measured on the trace:
    - LoHa's HadaWeight.backward (loha/layer.py) holds its incoming gradient (F.linear's weight gradient), that times
      scale, a factor product (w2a @ w2b, then w1a @ w1b), the temp and the next temp: 5 out x in fp32 copies, after
      grad_w1a and grad_w1b are made; LoKr's `kron(w1, w2) * scale` (lokr/layer.py make_kron) the scaled gradient
      and kron's broadcast product: 3;
    - VeRA's `lambda_b * (...)` (vera/layer.py Linear.forward): the mul's backward makes two tokens x out fp32
      gradients (of the product and, before its sum, of lambda_b) beside the product it saved.
    Alive beside them: the gradient of the linear's output (for the base branch, and VeRA's fp32 one: the adapter's
    sum is promoted), of the residual stream, and of the linear's input from a sibling sharing it
    whose backward ran first (q, k, v; gate, up). The layer's tensors saved after the branch (forward order) are
    freed already (autograd runs nodes in reverse creation order), and with LoHa/LoKr the adapter's own input and
    delta weight (F.linear's backward ran). `below`: saved tensors of the layers up to this one and of the model;
    `recomputed`: the checkpointed layer's recomputed saves (temporaries), else 0."""
    m = s.peft
    if m.method not in ("loha", "lokr", "vera", "oft"):
        return []
    from . import autocast as amp
    from .activations import LAYER_LINEAR_GROUPS, layer_saves, tokens_per_micro_batch  # (it imports this module)
    from .widths import activation_bytes_per_element

    saves = layer_saves(s, device)
    if not recomputed and below == _first_layer_below(s, device):
        saves = {k: 0 if k in _first_layer_unsaved_keys(s, saves) else v for k, v in saves.items()}
    keys = list(saves)
    a, T, act = s.model.arch, tokens_per_micro_batch(s), activation_bytes_per_element(s)
    later_sibling = {n for group in LAYER_LINEAR_GROUPS["llama"] for n in group[:-1]}
    out = []
    run_first = 0  # gradients of this layer's adapters later in the forward: their backward ran already
    for spec in reversed(a.layer_linears):
        if _targeted(s, spec):
            run_first += FP32 * _adapter_elements(s, spec)
    for spec in a.layer_linears:
        if not _targeted(s, spec):
            continue
        run_first -= FP32 * _adapter_elements(s, spec)
        here = {**common, "gradients": common["gradients"] + run_first}
        name, n_in, n_out = spec.path.rsplit(".", 1)[-1], spec.in_features, spec.out_features
        if m.method == "oft":
            # the rotation's backward (before the base's input gradient reaches it, oft/layer.py): the Neumann bmm
            # chain's gradients, 5 r x b x b fp32 beside 2 of its saved powers, and the input's gradient (fp32)
            rbb = FP32 * n_in * (n_in // m.r)
            first = keys.index(f"{spec.path}.oft_powers")
            freed = sum(saves[k] for k in keys[first:]) - 2 * rbb + saves.get(f"{spec.path}.x_fp32", 0) \
                + _own_input_freed(s, spec, saves, act)
            out.append({**here, "activations": below - (0 if recomputed else freed),
                        "temporaries": (recomputed - freed if recomputed else 0) + 5 * rbb + FP32 * T * n_in
                        + amp.linear_output_bytes(s) * T * n_out + act * T * a.hidden_size})
            continue
        if m.method == "vera":
            last = keys.index(f"{spec.path}.vera_B_out")
            freed = sum(saves[k] for k in keys[last + 1:])
            big, made = 2 * FP32 * T * n_out, 0
        else:
            freed = sum(saves[k] for k in keys[keys.index(f"{spec.path}.delta_weight"):]) + saves.get(
                f"{spec.path}.x_fp32", 0)
            freed += _own_input_freed(s, spec, saves, act)
            big = DELTA_BACKWARD_COPIES[m.method] * FP32 * n_in * n_out
            made = FP32 * m.r * (n_in + n_out) if m.method == "loha" else 0
        # the output's gradient: the base branch's, in the linear's output dtype, and with VeRA the adapter's fp32 one
        # (still in use; LoHa/LoKr's was freed with F.linear's backward)
        lin_out = amp.linear_output_bytes(s)
        vera_extra = FP32 * T * n_out if m.method == "vera" and lin_out != FP32 else 0
        held = lin_out * T * n_out + vera_extra + act * T * a.hidden_size
        held += act * T * n_in if name in later_sibling else 0
        out.append({**here, "gradients": here["gradients"] + made,
                    "activations": below - (0 if recomputed else freed),
                    "temporaries": (recomputed - freed if recomputed else 0) + big + held})
    return out


def _adapter_elements(s, spec) -> int:
    """Trainable elements of one adapted linear (peft_methods.trainable_tensors' per-linear counts)."""
    from .peft_methods import lokr_tensors

    m, i, o = s.peft, spec.in_features, spec.out_features
    if m.method == "loha":
        return 2 * m.r * (i + o)
    if m.method == "lokr":
        return sum(lokr_tensors(i, o, m.r))
    if m.method == "vera":
        return o + m.r
    return m.r * ((i // m.r) * (i // m.r - 1) // 2)  # OFT


def _first_layer_below(s, device: str) -> int:
    """The `below` activations.peak_backward passes for layer 0 without checkpointing: layer 0's saves (less
    activations.first_layer_unsaved_bytes) and the model-level ones."""
    from . import activations as act_mod  # (activations.py imports this module)

    if s.training.checkpoint_every or not act_mod.first_layer_unsaved_bytes(s, device):
        return -1
    return act_mod.activation_bytes_per_layer(s, device) - act_mod.first_layer_unsaved_bytes(s, device) + (
        act_mod.model_activation_bytes(s, device) - act_mod.final_norm_saved_bytes(s, device)
        - act_mod.lm_head_saved_bytes(s))


def _first_layer_unsaved_keys(s, saves: dict[str, int]) -> set[str]:
    """Layer 0's saves that autograd never made (activations.first_layer_unsaved_bytes, `first_layer_unsaved_bytes`
    here): the first norm's, q/k norms' of an untargeted projection, dropout masks on the q/k/v input, and the
    delta weights up to the first adapted group. Its backward cannot free them (found by the fuzzer: freeing them
    made the activations negative)."""
    from .activations import FIRST_INPUTS, FIRST_NORMS, LAYER_LINEAR_GROUPS

    out = {k for k in saves if k.startswith(FIRST_NORMS) or (k.endswith(".dropout_mask") and k.startswith(FIRST_INPUTS))}
    specs = {spec.path.rsplit(".", 1)[-1]: spec for spec in s.model.arch.layer_linears}
    if s.model.arch.qk_norm:
        for proj, tag in (("q_proj", "self_attn.q_norm."), ("k_proj", "self_attn.k_norm.")):
            if proj in specs and not _targeted(s, specs[proj]):
                out |= {k for k in saves if k.startswith(tag)}
    if s.peft.method in ("loha", "lokr", "oft"):
        for group in LAYER_LINEAR_GROUPS["llama"]:
            members = [specs[n] for n in group if n in specs]
            out |= {f"{sp.path}.delta_weight" for sp in members if f"{sp.path}.delta_weight" in saves}
            if any(_targeted(s, sp) for sp in members):
                break
    return out


def _own_input_freed(s, spec, saves: dict[str, int], act: int) -> int:
    """An fp32 adapter input is x itself (`_input_saves`): freed with the adapter's backward unless an adapter run
    earlier in the forward on the same input (q before k and v; gate before up) still needs it."""
    from .activations import LAYER_LINEAR_GROUPS  # (activations.py imports this module)

    name = spec.path.rsplit(".", 1)[-1]
    groups = LAYER_LINEAR_GROUPS["llama"]
    group = next(g for g in groups if name in g)
    earlier = [sp for sp in s.model.arch.layer_linears if sp.path.rsplit(".", 1)[-1] in group[:group.index(name)]]
    if act != FP32 or any(_targeted(s, sp) for sp in earlier):
        return 0
    return saves.get(IN_KEYS[groups.index(group)], 0)


def _input_saves(tag: str, in_key: str, T: int, n_in: int, act: int) -> dict[str, int]:
    """The adapter's input, cast to its fp32 parameters' dtype first (tuners_utils.py _cast_input_dtype): x itself
    when it is fp32 already, else the cast copy (one per adapted linear)."""
    return {in_key: act * T * n_in} if act == FP32 else {f"{tag}.x_fp32": FP32 * T * n_in}


def _method_linear_saves(s, spec, in_key: str, T: int, act: int, device: str) -> dict[str, int]:
    """What LoHa, LoKr, VeRA and OFT save for one adapted linear (in x out), all in fp32 (the adapter dtype), peft
    0.21.2; autograd saves an operand only when the other operand needs a gradient (derivatives.yaml mm), which
    `first_layer_unsaved_bytes` uses in layer 0:
    - LoHa (loha/layer.py Linear._get_delta_activations): F.linear(x, delta_weight) with delta_weight the out x in
      HadaWeight product (its ctx keeps the four factors, parameters, and the 0-dim scale): x and delta_weight;
    - LoKr (lokr/layer.py get_delta_weight): delta_weight = kron(w1, w2) * scale, then as LoHa; kron's product keeps
      w2 (w2_a @ w2_b, b x d, when decomposed; w1 is a parameter);
    - VeRA (vera/layer.py Linear.forward): lambda_b * F.linear(lambda_d * F.linear(dropout(x), A), B): the frozen
      A and B keep nothing new; lambda_d's product saves x A (tokens x r), lambda_b's (x A d) B (tokens x out),
      dropout its mask;
    - OFT (oft/layer.py OFTRotationModule.forward): r blocks of b = in / r; the Cayley-Neumann series (5 terms) keeps
      Q, Q^2, Q^3 (bmm operands), the einsum the rotation R and the input reshaped (r x tokens x b)."""
    m, tag = s.peft, spec.path
    n_in, n_out, r = spec.in_features, spec.out_features, m.r
    if m.method in ("loha", "lokr"):
        out = _input_saves(tag, in_key, T, n_in, act)
        out[f"{tag}.delta_weight"] = FP32 * n_in * n_out
        if m.method == "loha":
            out[f"{tag}.scale"] = FP32  # torch.tensor(scaling), saved by HadaWeight
        else:
            from .peft_methods import lokr_factorization

            out_k, in_n = lokr_factorization(n_out)[1], lokr_factorization(n_in)[1]
            if r < max(out_k, in_n) / 2:  # w2 = w2_a @ w2_b (peft_methods.lokr_tensors)
                out[f"{tag}.lokr_w2"] = FP32 * out_k * in_n
        return out
    if m.method == "vera":
        from .widths import CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT

        out = {f"{tag}.lora_A_out": FP32 * T * r, f"{tag}.vera_B_out": FP32 * T * n_out}
        if m.dropout > 0:
            mask = CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT if device == "cuda" else FP32
            out[f"{tag}.dropout_mask"] = mask * T * n_in
        return out
    b = n_in // r  # OFT: the einsum keeps a view of its input (x itself when fp32, else its cast)
    return {**_input_saves(tag, in_key, T, n_in, act), f"{tag}.oft_powers": 3 * FP32 * r * b * b,
            f"{tag}.delta_weight": FP32 * r * b * b}


def frozen_buffer_bytes(s) -> int:
    """Frozen tensors these methods add to the model (booked as weights): VeRA's shared projections vera_A and
    vera_B (fp32, peft_methods.vera_projection_elements); OFT's upper-triangle indices of every adapted linear,
    rows and cols of b(b-1)/2 int64 each (oft/layer.py OFTRotationModule.__init__, torch.triu_indices)."""
    m = s.peft
    if m.method == "vera":
        from .peft_methods import vera_projection_elements

        return FP32 * vera_projection_elements(m, s.model.arch)
    if m.method != "oft":
        return 0
    a = s.model.arch
    total = 0
    for spec in m.targeted_linears(a):
        b = spec.in_features // m.r
        total += 2 * 8 * (b * (b - 1) // 2) * (a.n_layers if spec in a.layer_linears else 1)
    return total


def _cat_linear_saves(s, spec, saved: dict[str, int], in_key: str, T: int, act: int, device: str) -> dict[str, int]:
    """cat's combined adapter (rank K r, peft_methods.combined_rank) in its own dtype w (`adapter_bytes_per_element`):
    peft lora/layer.py Linear.forward casts x to lora_A's dtype (a no-op when x has it, tuners_utils.py
    _cast_input_dtype), then lora_B(lora_A(dropout(x))): lora_A saves its input (the dropout output, else x itself or
    its cast), dropout its mask (CPU: in its input's dtype, aten/native/Dropout.cpp), lora_B lora_A's output."""
    from .peft_methods import combined_rank
    from .widths import CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT

    tag, w = spec.path, adapter_bytes_per_element(s)
    out = {k: v for k, v in saved.items() if k not in (f"{tag}.dropout_out", f"{tag}.dropout_mask", f"{tag}.x_fp32",
                                                        f"{tag}.lora_A_out")}
    base_saves_input = s.precision.weights in ("int8", "int4")  # (as activations._linear_saves)
    if not base_saves_input and s.peft.dropout == 0 and act == FP32:
        out.pop(in_key, None)  # plain LoRA's lora_A saved x itself; decided again below
    if s.peft.dropout > 0:
        out[f"{tag}.dropout_out"] = w * T * spec.in_features
        mask = CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT if device == "cuda" else w
        out[f"{tag}.dropout_mask"] = mask * T * spec.in_features
    elif act == w:
        out[in_key] = act * T * spec.in_features  # no cast: lora_A saves x itself
    else:
        out[f"{tag}.x_fp32"] = w * T * spec.in_features  # (the key of plain LoRA's cast, whatever its dtype)
    out[f"{tag}.lora_A_out"] = w * T * combined_rank(s.peft)
    return out
