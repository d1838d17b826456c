"""PEFT methods beyond LoRA/IA3/prompt/prefix tuning, and LoRA's options (DoRA, rsLoRA, modules_to_save,
target_parameters, several adapters): their trainable tensors, frozen adapter bytes and saved tensors per
adapted linear. memory.py and activations.py call these hooks; each returns the plain LoRA answer unchanged
where the option is off. Bytes throughout (element counts where the name says so).

What the analytic estimator models here (each checked against the CPU runner, benchmarks/accuracy_methods.py):
DoRA's magnitude vectors, saved tensors and forward transients (a forward moment of the step, added by
estimate/__init__.py step_moments; under autocast too), their rerun inside backward under gradient checkpointing
(recompute_moments, llama-like families; docs/dora-analytic.md), rsLoRA (scaling only: nothing changes), K
resident LoRA adapters and their linear/svd merge (add_weighted_adapter: a rank-r adapter trained beside the K).
The trainable counts of LoHa, LoKr, VeRA and OFT are here too (tests/test_peft_methods.py checks them against
peft's own models); their saved tensors, cat's rank-K r adapter and modules_to_save: estimate/adapter_saves.py.
"""

from __future__ import annotations

from ..arch import Arch, LinearSpec
from ..settings import BYTES_PER_ELEMENT, Scenario, matches_target
from . import adapter_saves
from .adapter_saves import TRACE_ONLY_METHODS
from .widths import ADAPTER_BYTES_PER_ELEMENT, FP32

# families whose decoder layer is llama's (two RMSNorms, q/k/v/o, gate/up/down): DoRA's checkpointed rerun is
# modelled and checked on them (recompute_moments)
DORA_RECOMPUTE_FAMILIES = ("llama", "mistral", "qwen2")


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic estimator cannot answer for this variant's PEFT settings (None: it can)."""
    m = s.peft
    gap = adapter_saves.analytic_gap(s)  # LoHa, LoKr, VeRA, OFT, modules_to_save, target_parameters, cat
    if gap is not None:
        return gap
    if m.use_dora and s.precision.autocast != "none" and s.training.checkpoint_every:
        # (the rerun's stream and gradients, recompute_moments, are measured without autocast only)
        return "the analytic estimator does not model DoRA under autocast together with gradient checkpointing"
    if m.use_dora and s.model.arch.model_type in ("gpt2", "opt"):
        return f"the analytic estimator does not model DoRA on {s.model.arch.model_type}"
    if m.use_dora and s.training.checkpoint_every and s.model.arch.model_type not in DORA_RECOMPUTE_FAMILIES:
        # the rerun of a checkpointed layer (recompute_moments) is modelled on the llama decoder layer only
        return (f"the analytic estimator models DoRA under gradient checkpointing for "
                f"{', '.join(DORA_RECOMPUTE_FAMILIES)} only, not {s.model.arch.model_type}")
    return None


# --- trainable tensors ------------------------------------------------------------------------------------------

def _copies(spec: LinearSpec, a: Arch) -> int:
    return a.n_layers if spec in a.layer_linears else 1


def trainable_tensors(m, a: Arch) -> tuple[int, ...] | None:
    """Element counts of every trainable tensor where this module models the method or option; None: the
    plain method (memory._trainable_tensors answers). Per targeted linear (in x out), peft 0.21.2:
    - LoRA + DoRA (tuners/lora/dora.py DoraLinearLayer.update_layer): lora_A r x in, lora_B out x r and the
      magnitude vector, out values;
    - LoHa (tuners/loha/layer.py create_adapter_parameters): hada_w1_a, hada_w2_a out x r; hada_w1_b,
      hada_w2_b r x in: 2r(in + out);
    - LoKr (tuners/lokr/layer.py update_layer): out = a*b and in = c*d factorized (`lokr_factorization`);
      w1 a x c in full, w2 b x d in full or as w2_a b x r, w2_b r x d when r < max(b, d) / 2;
    - VeRA (tuners/vera/layer.py update_layer): lambda_d (r) and lambda_b (out) per layer; the random
      projections vera_A / vera_B are shared frozen buffers (`vera_projection_elements`);
    - OFT (tuners/oft/layer.py update_layer): r blocks of size b = in / r, each b(b-1)/2 skew-symmetric values
      (OFTRotationModule.weight r x b(b-1)/2)."""
    if m.method == "lora" and m.use_dora:
        out = []
        for spec in m.targeted_linears(a):
            out += [m.r * spec.in_features, spec.out_features * m.r, spec.out_features] * _copies(spec, a)
        return tuple(out)
    if m.method == "lora" and m.combination == "cat":
        out = []
        for spec in m.targeted_linears(a):
            r = combined_rank(m)
            out += [r * spec.in_features, spec.out_features * r] * _copies(spec, a)
        return tuple(out)
    if m.method not in TRACE_ONLY_METHODS:
        return None
    out = []
    for spec in m.targeted_linears(a):
        i, o, r = spec.in_features, spec.out_features, m.r
        if m.method == "loha":
            per = [o * r, r * i, o * r, r * i]
        elif m.method == "lokr":
            per = lokr_tensors(i, o, r)
        elif m.method == "vera":
            per = [o, r]
        else:
            b = i // r
            per = [r * (b * (b - 1) // 2)]
        out += per * _copies(spec, a)
    return tuple(out)


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft tuners/lokr/layer.py `factorization` (decompose_factor -1, peft's default): the divisor pair (m <= n)
    with m*n = dimension and the smallest m + n."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    if m > n:
        n, m = m, n
    return m, n


def lokr_tensors(in_features: int, out_features: int, r: int) -> list[int]:
    """LoKr's tensors for one linear (peft defaults: decompose_both False, decompose_factor -1)."""
    in_m, in_n = lokr_factorization(in_features)
    out_l, out_k = lokr_factorization(out_features)
    tensors = [out_l * in_m]  # w1: decompose_both is off, so always in full
    if r < max(out_k, in_n) / 2:
        tensors += [out_k * r, r * in_n]
    else:
        tensors.append(out_k * in_n)
    return tensors


def vera_projection_elements(m, a: Arch) -> int:
    """VeRA's shared frozen projections (tuners/vera/model.py _init_vera_A_vera_B): vera_A r x max(in) and
    vera_B max(out) x r over the targeted linears, fp32 buffers."""
    specs = m.targeted_linears(a)
    if m.method != "vera" or not specs:
        return 0
    return m.r * (max(sp.in_features for sp in specs) + max(sp.out_features for sp in specs))


# --- resident adapters ------------------------------------------------------------------------------------------

def combined_rank(m) -> int:
    """Rank of peft's combined adapter (tuners/lora/model.py _check_add_weighted_adapter, equal ranks): linear
    keeps r, cat sums the K ranks (K r), svd takes the largest (r, svd_rank unset); "none": r."""
    return m.r * m.num_adapters if m.combination == "cat" else m.r


def frozen_adapter_bytes(s: Scenario) -> int:
    """Adapters resident but not trained, in the adapter dtype (fp32: peft's autocast_adapter_dtype): without a
    combination num_adapters - 1 of them (peft add_adapter), each as large as the trained one; with one all K
    (add_weighted_adapter adds the combined adapter, the one trained, beside them), each of rank r."""
    m = s.peft
    if m.num_adapters <= 1 or m.method != "lora":  # (the loader gives num_adapters to LoRA only)
        return 0
    if m.combination != "none":
        one = sum((m.r * sp.in_features + sp.out_features * m.r) * _copies(sp, s.model.arch)
                  for sp in m.targeted_linears(s.model.arch))
        return m.num_adapters * one * ADAPTER_BYTES_PER_ELEMENT + svd_factor_excess_bytes(s)
    from .memory import trainable_tensors as all_trainable  # (memory.py imports this module)

    return (m.num_adapters - 1) * sum(all_trainable(s)) * ADAPTER_BYTES_PER_ELEMENT


def svd_factor_excess_bytes(s: Scenario) -> int:
    """peft's svd merge (tuners/lora/model.py _svd_generalized_task_arithmetic_weighted_adapter) takes
    torch.linalg.svd(delta, full_matrices=True) of each out x in delta and sets lora_A.data = Vh[:r, :], a view:
    the whole in x in Vh (fp32, the adapter dtype) stays alive behind the r x in adapter for as long as the model
    does (B = U[:, :r] @ diag(S) is a new tensor). The bytes beyond lora_A's own, never trained; booked with the
    frozen adapters (the runner counts them with the trainable storages). Measured on CPU."""
    m = s.peft
    if m.method != "lora" or m.combination != "svd":
        return 0
    a = s.model.arch
    return ADAPTER_BYTES_PER_ELEMENT * sum((sp.in_features - m.r) * sp.in_features * _copies(sp, a)
                                           for sp in m.targeted_linears(a))


# --- saved tensors ----------------------------------------------------------------------------------------------

def _dora_targeted(s: Scenario, spec: LinearSpec) -> bool:
    m = s.peft
    return m.method == "lora" and m.use_dora and any(matches_target(spec.path, t) for t in m.targets(s.model.arch))


def dora_weight_copy_saved(s: Scenario) -> bool:
    """With lora_dropout > 0, DoRA recomputes the base output from the dropped input and the weight cast to the
    input's dtype, F.linear(dropout(x), weight.to(x.dtype)) (peft tuners/lora/dora.py DoraLinearLayer.forward,
    variants.py DoraLinearVariant.forward): x is fp32 (the adapter dtype), so any base other than fp32 (bf16,
    fp16, and bitsandbytes' dequantized weight) makes an fp32 copy, which the matmul saves for the input's
    gradient. Without dropout peft reuses the base layer's output and saves no weight."""
    return s.peft.dropout > 0 and s.precision.weights != "fp32"


def linear_saves(s: Scenario, spec, saved: dict[str, int], in_key: str, T: int, act: int,
                 device: str) -> dict[str, int]:
    """Tensors one adapted linear saves for backward, given what the plain method saves (`saved`).

    DoRA (peft tuners/lora/dora.py DoraLinearLayer.forward) adds, on top of LoRA's:
    result_dora = (m / ||W + s BA||_c - 1) * base_result + (m / ||.||_c) * lora_B(lora_A(x)) * s, whose
    products save (autograd derivatives.yaml mul.Tensor) base_result (out x tokens, in the base output's dtype;
    with dropout the recomputed fp32 output), lora_B's output (fp32), and the out-sized vectors ||.||_c (the
    division's divisor), m / ||.||_c and its minus-one (3 fp32 vectors); with dropout on a non-fp32 base the
    fp32 weight copy (`dora_weight_copy_saved`). The weight norm itself is detached (DoRA paper sec. 4.3):
    its full-size terms (the identity, B A, W + s BA) are transients of the forward. Measured on CPU."""
    saved = adapter_saves.linear_saves(s, spec, saved, in_key, T, act, device)  # methods other than LoRA/DoRA
    if not _dora_targeted(s, spec):
        return saved
    out = dict(saved)
    tag = spec.path
    n_out = spec.out_features
    if s.precision.autocast != "none":
        return _autocast_dora_saves(s, spec, out, T)
    base_out = ADAPTER_BYTES_PER_ELEMENT if s.peft.dropout > 0 else act
    out[f"{tag}.dora_base_out"] = base_out * T * n_out
    out[f"{tag}.dora_lora_out"] = ADAPTER_BYTES_PER_ELEMENT * T * n_out
    out[f"{tag}.dora_vectors"] = 3 * FP32 * n_out
    if dora_weight_copy_saved(s):
        out[f"{tag}.dora_weight"] = ADAPTER_BYTES_PER_ELEMENT * spec.n_weight_params
    return out


def _autocast_dora_saves(s: Scenario, spec: LinearSpec, out: dict[str, int], T: int) -> dict[str, int]:
    """DoRA's saves under torch.autocast (estimate/autocast.py): lora_B's output comes in the autocast dtype; the
    base output is the base layer's (its linear output dtype) or, with dropout, F.linear(dropout(x), W.to(fp32)),
    an autocast mm that returns the autocast dtype and saves a fresh autocast-dtype cast of the weight (not a leaf
    that requires grad, so not cached; the input's cast is lora_A's); the products promote to fp32 but save their
    factors. Measured on CPU."""
    from . import autocast as amp

    ac, tag, n_out = amp.autocast_bytes(s), spec.path, spec.out_features
    if s.peft.dropout > 0:
        out[f"{tag}.dora_base_out"] = ac * T * n_out
        out[f"{tag}.dora_weight"] = ac * spec.n_weight_params
    else:
        out[f"{tag}.dora_base_out"] = amp.linear_output_bytes(s) * T * n_out
    out[f"{tag}.dora_lora_out"] = ac * T * n_out
    out[f"{tag}.dora_vectors"] = 3 * FP32 * n_out
    return out


def first_layer_unsaved_bytes(s: Scenario, saves: dict[str, int]) -> int:
    """Without checkpointing the first decoder layer's input needs no gradient (frozen embeddings): up to and
    including the first group of linears that holds an adapter (activations.LAYER_LINEAR_GROUPS), DoRA's products
    there save neither the minus-one vector (its other factor needs no gradient) nor, with dropout, the weight
    copy (neither matmul operand needs a gradient). Measured on CPU."""
    if not (s.peft.method == "lora" and s.peft.use_dora) or s.training.checkpoint_every:
        return 0
    from .activations import LAYER_LINEAR_GROUPS  # (activations.py imports this module)

    a = s.model.arch
    specs = {spec.path.rsplit(".", 1)[-1]: spec for spec in a.layer_linears}
    unsaved = 0
    for group in LAYER_LINEAR_GROUPS.get(a.model_type, LAYER_LINEAR_GROUPS["llama"]):
        members = [specs[n] for n in group if n in specs]
        for spec in members:
            unsaved += saves.get(f"{spec.path}.dora_weight", 0) + saves.get(f"{spec.path}.dora_vectors", 0) // 3
        if any(_dora_targeted(s, spec) for spec in members):
            break
    return unsaved


# --- the forward moment ---------------------------------------------------------------------------------------

def dora_forward_transient_bytes(s: Scenario, spec: LinearSpec, T: int, products: int = 3) -> int:
    """Transients of DoRA's forward for one adapted linear (in x out), peft tuners/lora/dora.py
    DoraLinearLayer.forward, all fp32 (the adapter dtype): get_lora_weight runs lora_B(lora_A(I_in)) on an in x in
    identity, whose autograd graph keeps the identity and lora_A's in x r output alive (lora_A's weight needs a
    gradient) with the in x out result until the forward returns. Then the larger of
    - the weight norm: W cast to fp32 (a copy unless W is fp32), s * lora_weight and W + s * lora_weight, and
    - the rescaling: the weight copy, lora_A's and lora_B's outputs (tokens x r, tokens x out: saved, but made
      here), the three out-sized vectors and three tokens x out products (`products`: fewer where a checkpointed
      layer's rerun stops early, `recompute_moments`).
    With dropout the base output is recomputed in fp32 (F.linear(dropout(x), W), booked as the saved dora_base_out)
    after the weight norm, while the base layer's own output (in its dtype) is held by peft's Linear.forward
    throughout. Measured on CPU (forward, and the recomputed forward of a checkpointed layer)."""
    i, o, r = spec.in_features, spec.out_features, s.peft.r
    copy = 0 if s.precision.weights == "fp32" else 1
    if s.precision.autocast != "none":
        return _autocast_dora_transient_bytes(s, spec, T, products)
    held = FP32 * (i * i + i * r + i * o + copy * i * o)
    norm = FP32 * 2 * i * o
    rescale = FP32 * (T * r + T * o + 3 * o + products * T * o)
    if s.peft.dropout > 0:
        from .widths import activation_bytes_per_element

        own = activation_bytes_per_element(s) * T * o
        norm += own - FP32 * T * o  # (the fp32 recomputed output is not made yet)
        rescale += own
    return held + max(norm, rescale)


def _autocast_dora_transient_bytes(s: Scenario, spec: LinearSpec, T: int, products: int) -> int:
    """`dora_forward_transient_bytes` under torch.autocast: lora_A's mm saves the autocast-dtype cast of the
    identity, not the fp32 identity, which is freed when get_lora_weight returns; lora_A's and lora_B's outputs
    come in the autocast dtype and `lora_weight.to(x.dtype)` adds an fp32 copy. Three moments: the end of
    get_lora_weight (fp32 identity, its cast, both outputs), the weight norm, the rescaling (lora_B's output over x
    in the autocast dtype, three fp32 products). With dropout, the base layer's own output is held throughout and
    the recomputed base output (autocast dtype, booked as dora_base_out) comes after the weight norm. Measured on
    CPU."""
    from . import autocast as amp

    i, o, r = spec.in_features, spec.out_features, s.peft.r
    ac = amp.autocast_bytes(s)
    copy = 0 if s.precision.weights == "fp32" else 1
    casts = ac * (i * i + i * r + i * o)
    held = casts + FP32 * (1 + copy) * i * o
    first = FP32 * i * i + casts
    norm = held + FP32 * 2 * i * o
    rescale = held + ac * (T * r + T * o) + FP32 * (3 * o + products * T * o)
    if s.peft.dropout > 0:
        own = amp.linear_output_bytes(s) * T * o
        first += own - ac * T * o
        norm += own - ac * T * o
        rescale += own
    return max(first, norm, rescale)


def forward_moments(s: Scenario, device: str, grads_live: int) -> list[tuple[str, dict[str, int]]]:
    """DoRA's forward can be the peak of the step: its weight-norm transients (`dora_forward_transient_bytes`,
    largest on down_proj, whose in x in identity is intermediate^2) come on top of everything the forward has saved
    so far. The moment of each adapted linear of the last decoder layer: saved tensors of the layers before it and
    of the model before the layers, this layer's saved tensors up to that linear, the hidden states held but not
    saved (`_forward_stream_bytes`), and its transients. No logits yet. (estimate/__init__.py step_moments adds
    these.)"""
    m = s.peft
    if not (m.method == "lora" and m.use_dora) or s.training.checkpoint_every:
        return []
    from . import activations as act_mod  # (activations.py imports this module)
    from .widths import activation_bytes_per_element

    a = s.model.arch
    T = act_mod.tokens_per_micro_batch(s)
    saves = act_mod.layer_saves(s, device)
    stream = activation_bytes_per_element(s)
    before = (a.n_layers - 1) * sum(saves.values()) + act_mod.model_activation_bytes(s, device) \
        - act_mod.final_norm_saved_bytes(s) - act_mod.lm_head_saved_bytes(s)
    # layer 0 saves less (first_layer_unsaved_bytes); in a one-layer model that is this layer, and what it lacks
    # comes before the last moments, the ones that matter
    before -= act_mod.first_layer_unsaved_bytes(s, device)
    moments = []
    for spec in a.layer_linears:
        if not _dora_targeted(s, spec):
            continue
        partial = _saved_before_the_norm_bytes(saves, spec)
        live = _forward_stream_bytes(s, spec, T, stream) + _autocast_stream_bytes(s, spec, saves, T)
        moments.append(("forward", {"gradients": grads_live, "activations": before + partial, "logits": 0,
                                    "temporaries": live + dora_forward_transient_bytes(s, spec, T)}))
    return moments


# an adapted linear's saved tensors made before DoRA's weight norm: the base output, the adapter input's fp32 cast
# and dropout; under autocast also the base mm's weight cast and the cached casts of lora_A/lora_B (get_lora_weight)
_MADE_BEFORE_THE_NORM = ("dora_base_out", "x_fp32", "dropout_out", "dropout_mask", "w_cast", "lora_casts")


def _saved_before_the_norm_bytes(saves: dict[str, int], spec: LinearSpec) -> int:
    """What one layer has saved when an adapted linear computes DoRA's weight norm: the saves of everything before
    the linear (`saves` is in forward order) and the linear's own made before the norm (the base output and the
    adapter's input: its fp32 cast, dropout, casts)."""
    keys = list(saves)
    mine = [k for k in keys if k.startswith(spec.path + ".")]
    first = keys.index(mine[0]) if mine else len(keys)
    return sum(saves[k] for k in keys[:first]) + sum(saves.get(f"{spec.path}.{k}", 0) for k in _MADE_BEFORE_THE_NORM)


def _autocast_stream_bytes(s: Scenario, spec: LinearSpec, saves: dict[str, int], T: int) -> int:
    """Under autocast, alive unsaved while DoRA's weight norm runs: peft's fp32 cast of the adapter input
    (lora/layer.py _cast_input_dtype; saved only as its autocast-dtype cast, made later by lora_A) unless the input
    is fp32 already, and down_proj's input (the autocast-dtype product act(gate) * up: the base mm saves the weight's
    cast, lora_A its own cast). Measured on CPU."""
    if s.precision.autocast == "none":
        return 0
    from . import autocast as amp

    mlp_mid = spec.path.endswith("down_proj")
    in_dtype = amp.linear_output_dtype(s) if mlp_mid else (
        s.precision.autocast if spec.path.endswith("o_proj") else amp.norm_output_dtype(s, "cpu"))
    total = 0 if in_dtype == amp.FP32_NAME else FP32 * T * spec.in_features
    if s.peft.dropout > 0:  # dropout's fp32 output: saved only as lora_A's cast of it
        total += FP32 * T * spec.in_features
    if mlp_mid and "mlp_mid" not in saves and amp.stream_bytes(s) == FP32:  # (else in _forward_stream_bytes)
        total += BYTES_PER_ELEMENT[in_dtype] * T * spec.in_features
    return total


def _forward_stream_bytes(s: Scenario, spec: LinearSpec, T: int, stream: int) -> int:
    """Hidden states alive but not saved while a linear of the last layer runs (transformers modeling_llama.py):
    the position ids (int64) and the input embeddings, held by the model's forward. In an fp32 model every other
    one is saved already (RMSNorm saves its fp32 input, which is the tensor itself; LoRA's A saves its input
    itself). Otherwise also the layer's input (held by the decoder loop; the embeddings themselves in a one-layer
    model), the norm's output that feeds the linear, in the MLP the residual after attention, and for the down
    projection its input. Measured on CPU."""
    a = s.model.arch
    total = 8 * T + stream * T * a.hidden_size
    if stream == FP32:
        return total
    mlp = spec.path.startswith("mlp.")
    n_hidden = (a.n_layers > 1) + 1 + mlp
    total += stream * T * a.hidden_size * n_hidden
    if spec.path.endswith("down_proj"):
        total += stream * T * spec.in_features
    return total


# --- the recomputed forward of a checkpointed layer ---------------------------------------------------------------

def recompute_moments(s: Scenario, device: str, grads: int, grads_live: int) -> list[tuple[str, dict[str, int]]]:
    """Under gradient checkpointing the backward of a checkpointed layer first reruns its forward
    (torch/utils/checkpoint.py, non-reentrant: `recompute_fn` under `_recomputation_hook`, which keeps what the
    forward saves and stops after the last of it), DoRA's weight norm included: its transients
    (`dora_forward_transient_bytes`) come inside backward. The moment of each adapted linear of each checkpointed
    layer i: gradients of the layers above, the saved tensors of layers 0..i (layer i's checkpoint), the model's
    logits held, and as temporaries the gradients alive when the recompute starts (`_recompute_trigger_grad_bytes`),
    what the rerun has saved up to that linear, the hidden states it holds unsaved (`_recompute_stream_bytes`) and
    the transients. (estimate/__init__.py step_moments adds these.) Measured on CPU."""
    m = s.peft
    a = s.model.arch
    n, k = a.n_layers, s.training.checkpoint_every
    if not (m.method == "lora" and m.use_dora) or not k:
        return []
    from . import activations as act_mod  # (activations.py imports this module)
    from .widths import activation_bytes_per_element

    T = act_mod.tokens_per_micro_batch(s)
    saves = act_mod.layer_saves(s, device)
    per_layer = sum(saves.values())
    held = [act_mod.checkpoint_bytes_per_layer(s, device) if i % k == 0 else per_layer for i in range(n)]
    model_level = act_mod.model_activation_bytes(s, device) - act_mod.final_norm_saved_bytes(s) \
        - act_mod.lm_head_saved_bytes(s)
    stream = activation_bytes_per_element(s)
    # (as activations.layer_backward_peak: adapter gradients arrive layer by layer, from the last)
    per_layer_grad = grads // n
    trigger = _recompute_trigger_grad_bytes(s, T, stream)
    # an fp32 RMSNorm saves its input itself (`.to(float32)` is a no-op): in the rerun that is the checkpoint
    overlap = saves.get("input_layernorm.in_fp32", 0) if stream == FP32 else 0
    inner = []
    for spec in a.layer_linears:
        if not _dora_targeted(s, spec):
            continue
        partial = _saved_before_the_norm_bytes(saves, spec)
        # the rerun stops once the last saved tensor is recomputed (checkpoint.py _StopRecomputationError): after
        # down_proj's `mag_norm_scale * lora_result` (llama family: nothing saved after it), one product alive
        last = spec.path.endswith("down_proj") and a.n_norms_per_layer == 2
        # (measured: with an fp32 stream the residual after attention and the second norm's output, each saved,
        # count once in the rerun)
        twice = saves.get("x2", 0) if stream == FP32 and spec.path.startswith("mlp.") else 0
        inner.append(trigger + partial - overlap - twice + _recompute_stream_bytes(s, spec, saves, T, stream)
                     + dora_forward_transient_bytes(s, spec, T, products=1 if last else 3))
    if not inner:
        return []
    moments = []
    for i in range(0, n, k):
        g = grads if s.training.grad_accum_steps > 1 else grads - (i + 1) * per_layer_grad
        moments.append(("backward", {"gradients": max(g, grads_live), "activations": sum(held[:i + 1]) + model_level,
                                     "logits": act_mod.held_logits_bytes(s), "temporaries": max(inner)}))
    return moments


def _recompute_trigger_grad_bytes(s: Scenario, T: int, stream: int) -> int:
    """Gradients alive when the first backward node of a checkpointed layer unpacks a saved tensor and the rerun
    starts: the layer output's gradient, made by the RMSNorm above it (the next layer's input norm or the final
    norm: its multiply and pow paths, summed), and, when the layer's last linear (down_proj) carries DoRA, peft's
    `result.to(torch_result_dtype)` and `result + result_dora` on a non-fp32 base (fp32 and base-dtype copies) and
    the scaling's product (`* scaling`), all tokens x hidden. Measured on CPU (llama family)."""
    a = s.model.arch
    th = T * a.hidden_size
    down = next((sp for sp in a.layer_linears if sp.path.endswith("down_proj")), None)
    if down is not None and _dora_targeted(s, down):
        return 3 * FP32 * th if stream == FP32 else (2 * FP32 + 3 * stream) * th
    if s.precision.weights in ("nf4", "fp4") and down is not None:
        # bitsandbytes MatMul4Bit keeps its tensors on ctx, out of checkpointing's reach: down_proj's backward
        # runs before the rerun, whose trigger is then act(gate) * up, with down's fp32 input gradient alive
        return stream * th + FP32 * T * down.in_features
    return 2 * stream * th


def _recompute_stream_bytes(s: Scenario, spec: LinearSpec, saves: dict[str, int], T: int, stream: int) -> int:
    """Hidden states the rerun of a checkpointed layer holds but has not saved while `spec` runs (transformers
    modeling_llama.py LlamaDecoderLayer, LlamaMLP): the input norm's output through the attention unless a lora_A
    saved it (fp32 stream, no dropout); in the MLP the residual after attention (unless the fp32 norm saved it as
    its own input) and, for down_proj, its input unless saved; in the attention the outputs of the q/k/v
    projections run before `spec`. With dropout on a non-fp32 stream, peft's fp32 cast
    of the adapter input (lora/layer.py _cast_input_dtype) stays alive beside the dropped copy it saves. The
    layer's input is its checkpoint (activations); the second norm's output is not found alive. Measured on CPU."""
    a = s.model.arch
    th = stream * T * a.hidden_size
    cast = FP32 * T * spec.in_features if s.peft.dropout > 0 and stream != FP32 else 0
    if not spec.path.startswith("mlp."):
        # the outputs of the q/k/v projections run before this one wait for rotary and attention to save them
        from . import autocast as amp

        qkv = [sp for sp in a.layer_linears if sp.path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
        earlier = qkv[:[sp.path for sp in qkv].index(spec.path)] if spec in qkv else []
        waiting = sum(BYTES_PER_ELEMENT[amp.linear_output_dtype(s)] * T * sp.out_features for sp in earlier)
        return cast + waiting + (0 if "x1" in saves else th)
    total = cast + (0 if stream == FP32 else th)
    if spec.path.endswith("down_proj") and "mlp_mid" not in saves:
        total += stream * T * spec.in_features
    return total
