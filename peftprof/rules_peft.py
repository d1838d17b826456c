"""[peft]: the keys each PEFT method takes and the rules between them and the rest of a variant (owned by the
PEFT-methods work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped)."""

from __future__ import annotations

from .schema import Collector, Key, Parts
from .settings import METHODS

# peft add_weighted_adapter combination types we build (tuners/lora/model.py); "none": no merge
COMBINATIONS = ("none", "linear", "cat", "svd")
SCHEMA: dict[str, Key] = {
    "method": Key("choice", choices=METHODS),
    "r": Key("int", 1, 65536),
    "alpha": Key("float", 0, 1e6, lo_open=True),
    "dropout": Key("float", 0, 1, hi_open=True),
    "target_modules": Key("targets"),
    "num_virtual_tokens": Key("int", 1, 65536),
    "use_dora": Key("bool"),
    "use_rslora": Key("bool"),
    "modules_to_save": Key("names"),
    "target_parameters": Key("names"),
    "num_adapters": Key("int", 1, 1024),
    "combination": Key("choice", choices=COMBINATIONS),
    # X-LoRA's classifier (peft XLoraConfig; run/xlora.py): depth, hidden width when deeper than 1, per-layer gates
    "xlora_depth": Key("int", 1, 64),
    "xlora_size": Key("int", 1, 1 << 20),
    "layerwise_scalings": Key("bool"),
}
# which PEFT keys apply to which method (a key set for another method is "not applicable"). LoHa/LoKr take peft's
# r and alpha (no input dropout: their rank/module dropouts are left at peft's 0), VeRA r and vera_dropout
# (`dropout`, no alpha), OFT r as peft's number of blocks per layer (oft_block_size = in_features / r; peft
# takes one of the two); peft/tuners/{loha,lokr,vera,oft}/config.py, peft 0.21.2
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "modules_to_save",
             "target_parameters", "num_adapters", "combination")
PEFT_KEYS_BY_METHOD = {
    "full": (), "lora": LORA_KEYS, "ia3": ("target_modules",),
    "prompt_tuning": ("num_virtual_tokens",), "prefix_tuning": ("num_virtual_tokens",),
    "loha": ("r", "alpha", "target_modules", "modules_to_save"),
    "lokr": ("r", "alpha", "target_modules", "modules_to_save"),
    "vera": ("r", "dropout", "target_modules", "modules_to_save"),
    "oft": ("r", "target_modules", "modules_to_save"),
    # X-LoRA: K = num_adapters LoRA experts (r, alpha, dropout, target_modules, rsLoRA scaling) and the classifier;
    # no use_dora: peft's X-LoRA raises on DoRA experts ("X-LoRA currently does not support LoRA layers with DoRA",
    # tuners/xlora/layer.py), so the key does not apply
    "xlora": ("r", "alpha", "dropout", "target_modules", "use_rslora", "num_adapters", "xlora_depth", "xlora_size",
              "layerwise_scalings"),
}
# modules peft's modules_to_save can train in full, per family (their names in transformers' models)
SAVABLE_MODULES = {"gpt2": ("wte", "wpe", "ln_f", "lm_head"),
                   "opt": ("embed_tokens", "embed_positions", "final_layer_norm", "lm_head")}
SAVABLE_DEFAULT = ("embed_tokens", "norm", "lm_head")


def check(c: Collector, cond: Collector, parts: Parts, model) -> None:
    """Rules of the newer [peft] keys against the other sections."""
    _check_methods(c, parts, model)
    _check_target_parameters(c, parts, model)
    _check_combination(c, parts)
    if parts.peft.get("method") == "xlora":
        _check_xlora(c, cond, parts, model)
    _check_library_failures(c, parts, model)


def _check_methods(c: Collector, parts: Parts, model) -> None:
    """DoRA, modules_to_save, several adapters and the LoHa/LoKr/VeRA/OFT methods: what peft or our estimators
    refuse, each with its cause (the keys of other methods were already dropped as not applicable)."""
    from .arch import analytic_gap
    from .estimate.peft_methods import DORA_RECOMPUTE_FAMILIES
    from .families import family
    from .settings import PeftSettings, matches_target

    peft, weights = parts.peft, parts.prec.get("weights", "bf16")
    method = peft.get("method", PeftSettings.method)
    a = model.arch if model is not None else None
    if peft.get("use_dora"):
        if weights == "int8":
            c.add("peft", "use_dora", "DoRA on bitsandbytes int8 weights fails in peft 0.21.2 (measured: after DoRA "
                  "dequantizes the weight, an eval-mode int8 matmul finds no column statistics, 'NoneType' object "
                  "has no attribute 'dtype')", "false, or weights fp32 | fp16 | bf16 | nf4 | fp4")
        elif weights == "int4":
            c.add("peft", "use_dora", "peft's DoRA cannot dequantize optimum-quanto int4 weights",
                  "false, or weights fp32 | fp16 | bf16 | nf4 | fp4")
        elif weights in ("nf4", "fp4"):
            # the trace cannot build DoRA on its bitsandbytes stand-ins (peft dequantizes the real Params4bit), so
            # the analytic estimator must answer: refuse what it does not model (estimate/peft_methods.py)
            why = [w for w, bad in (
                (f"the {a.model_type} family" if a is not None else "", a is not None and (
                    analytic_gap(a.model_type) or a.model_type in ("gpt2", "opt"))),
                # the rerun of a checkpointed layer is modelled for the llama decoder layer (peft_methods.py)
                ("gradient checkpointing", parts.train.get("gradient_checkpointing", "none") != "none" and (
                    a is None or a.model_type not in DORA_RECOMPUTE_FAMILIES)),
                ("autocast", parts.prec.get("autocast", "none") != "none"),
                ("modules_to_save", bool(peft.get("modules_to_save"))),
                ("target_parameters", bool(peft.get("target_parameters")))) if bad]
            if why:
                c.add("peft", "use_dora", f"DoRA on {weights} with {' and '.join(why)} cannot be estimated: the "
                      "analytic estimator does not model that, and the trace cannot build DoRA on bitsandbytes "
                      "weights (peft dequantizes the real weight)", "false, or float weights")
    if method in ("loha", "lokr", "vera", "oft") and a is not None:
        if weights not in ("fp32", "fp16", "bf16") and method in ("loha", "lokr"):
            c.add("peft", "method", f"{method} on {weights} weights fails in peft 0.21.2: it adapts a bitsandbytes layer "
                  "as a plain nn.Linear and multiplies by its packed weight (measured: a shape error)",
                  "lora, ia3, prompt_tuning, prefix_tuning, or float weights")
        elif weights not in ("fp32", "fp16", "bf16"):
            c.add("peft", "method", f"{method} on {weights} weights cannot be estimated yet: the analytic estimator "
                  f"does not model {method} and the trace's bitsandbytes stand-ins have not been checked with it "
                  "(peft 0.21.2 itself trains it)", "lora, ia3, prompt_tuning, prefix_tuning, or float weights")
        fam = family(a.model_type)
        if peft.get("target_modules") is None and fam.lora_targets is None:
            c.add("peft", "target_modules", f"peft has no default for {fam.name}", ", ".join(a.linear_names))
    if method == "oft" and a is not None:
        r = peft.get("r", PeftSettings.r)
        try:
            targets = PeftSettings(method="oft", target_modules=peft.get("target_modules")).targets(a)
        except ValueError:  # no default targets: reported above
            targets = ()
        widths = sorted({sp.in_features for sp in a.layer_linears + a.model_linears
                         if any(matches_target(sp.path, t) for t in targets)})
        bad = [w for w in widths if w % r]
        if bad:
            c.add("peft", "r", f"{r} OFT blocks must divide the input width of every targeted layer (peft would "
                  f"change r silently): {', '.join(map(str, bad))} is not a multiple of {r}",
                  f"a common divisor of {', '.join(map(str, widths))}")
    saved = peft.get("modules_to_save")
    if saved and a is not None:
        allowed = SAVABLE_MODULES.get(a.model_type, SAVABLE_DEFAULT)
        unknown = [n for n in saved if n not in allowed]
        if unknown:
            c.add("peft", "modules_to_save", f"{', '.join(unknown)} is not a model-level module of {a.model_type}",
                  ", ".join(allowed))
    if peft.get("num_adapters", 1) > 1 and saved:
        c.add("peft", "num_adapters", "several adapters with modules_to_save are not estimated (each adapter would "
              "hold its own full copies)", "1, or no modules_to_save")


def _check_target_parameters(c: Collector, parts: Parts, model) -> None:
    """LoRA on nn.Parameters (peft's target_parameters, ParamWrapper): each name must end an expert stack of the
    model (transformers 5 MoE families: mlp.experts.gate_up_proj, mlp.experts.down_proj; families/moe.py), as peft
    matches it (a suffix at a dot), or peft raises 'no parameter was matched' after building the model."""
    from .settings import matches_target

    names = parts.peft.get("target_parameters")
    if not names or model is None:
        return
    experts = [p.path for p in model.arch.layer_params if p.expert]
    unknown = [n for n in names if not any(matches_target(path, n) for path in experts)]
    if unknown:
        c.add("peft", "target_parameters", f"{', '.join(unknown)} matches no expert parameter of "
              f"{model.arch.model_type}" + ("" if experts else " (a dense model: it has none)"),
              ", ".join(experts) if experts else "no target_parameters")


def _check_combination(c: Collector, parts: Parts) -> None:
    """peft's static merge of the K adapters (LoraModel.add_weighted_adapter, tuners/lora/model.py), trained as
    a new adapter: what peft or our estimators refuse (method other than lora: dropped as not applicable)."""
    peft = parts.peft
    combo = peft.get("combination", "none")
    if combo == "none":
        return
    if peft.get("num_adapters", 1) < 2:
        c.add("peft", "combination", f"{combo} merges the K adapters of num_adapters; there is "
              f"{peft.get('num_adapters', 1)}", "none, or num_adapters >= 2")
    if peft.get("target_parameters"):
        c.add("peft", "combination", "peft's add_weighted_adapter does not support target_parameters (it raises "
              "'does not support targeting nn.Parameter')", "none, or no target_parameters")
    if peft.get("use_dora"):
        c.add("peft", "combination", "a DoRA merge is not what it says in peft 0.21.2: the combined adapter's magnitude "
              "is computed from the base weight before the merged A and B are written (measured)",
              "none, or use_dora = false")
    if (parts.dist or {}).get("world_size", 1) > 1:
        c.add("peft", "combination", "a merge across several processes has not been checked against a measurement",
              "none, or [distributed] world_size = 1")
    if (parts.inf or {}).get("enabled"):
        c.add("peft", "combination", "serving a merged adapter beside its K sources is not estimated",
              "none, or [inference] enabled = false")


def _check_xlora(c: Collector, cond: Collector, parts: Parts, model) -> None:
    """X-LoRA (peft XLoraModel, run/xlora.py): K >= 2 frozen LoRA experts and a trained gating classifier. What
    peft 0.21.2 refuses or breaks on (measured on CPU), and what neither estimator has been checked on."""
    from .families import family

    peft, prec, train = parts.peft, parts.prec, parts.train
    k = peft.get("num_adapters", 1)
    if k < 2:
        c.add("peft", "num_adapters", f"X-LoRA gates K LoRA experts; there is {k}", ">= 2")
    if peft.get("xlora_depth", 1) == 1 and "xlora_size" in peft:
        cond.add("peft", "xlora_size", "the classifier's hidden width applies only with xlora_depth > 1 (peft "
                 "ignores it at depth 1)")
        peft.pop("xlora_size")
    weights = prec.get("weights", "bf16")
    if weights in ("int8", "fp4", "nf4"):
        c.add("precision", "weights", f"X-LoRA on {weights} weights fails in peft 0.21.2: it gates only plain "
              "lora.Linear layers (tuners/xlora/model.py convert_layers_to_xlora) and hands its gates to the "
              "bitsandbytes LoRA layers as an argument they do not take (measured: 'forward() got an unexpected "
              "keyword argument scalings')", "fp32 | fp16 | bf16")
    elif weights == "int4":
        c.add("precision", "weights", "X-LoRA on int4 weights cannot be estimated: the analytic estimator does not "
              "model X-LoRA and the trace cannot quantize int4 (optimum-quanto) on meta tensors", "fp32 | fp16 | bf16")
    if weights == "fp16" and prec.get("autocast", "none") == "fp16":
        c.add("precision", "autocast", "X-LoRA's classifier is built in the model's dtype, so with fp16 weights its "
              "gradients are fp16 and GradScaler refuses to unscale them (measured: 'Attempting to unscale FP16 "
              "gradients')", "none | bf16, or fp32 | bf16 weights")
    if train.get("gradient_checkpointing", "none") != "none":
        c.add("training", "gradient_checkpointing", "X-LoRA fails under gradient checkpointing in peft 0.21.2: its "
              "gates reach the experts through forward pre-hooks removed when the forward returns, so the "
              "recomputation in backward runs without them (measured: torch.utils.checkpoint 'A different number "
              "of tensors was saved during the original forward and recomputation')", "none")
    if train.get("optimizer", "adamw").startswith("paged"):
        c.add("training", "optimizer", "with X-LoRA the share of the classifier's optimizer state that bitsandbytes "
              "pages on CUDA is not estimated", "adamw | adamw_8bit | sgd")
    if (parts.dist or {}).get("world_size", 1) > 1:
        c.add("peft", "method", "X-LoRA across several processes has not been checked against a measurement",
              "lora, or [distributed] world_size = 1")
    if (parts.inf or {}).get("enabled"):
        c.add("peft", "method", "serving X-LoRA (its scaling pass and gated experts) is not estimated",
              "lora, or [inference] enabled = false")
    if model is not None:
        from .families import REGISTRY

        a = model.arch
        if a.model_type not in REGISTRY:  # (image classifiers: vision/rules.py refuses every method but lora, full)
            c.add("peft", "method", f"X-LoRA on {a.model_type}, a model type outside peftprof's families, has not "
                  "been checked (its classifier reads the last hidden state, whose width differs between models)",
                  "lora, or a model of the families of `peftprof presets`")
            return
        fam = family(a.model_type)
        if peft.get("target_modules") is None and fam.lora_targets is None:
            c.add("peft", "target_modules", f"peft has no default for {fam.name}", ", ".join(a.linear_names))


# the projections whose outputs transformers rotates (rotate_half's torch.cat) in the rotary families
ROTATED_PROJECTIONS = ("q_proj", "k_proj", "qkv_proj")


def _targeted_leaves(parts: Parts, a) -> list[str]:
    """Leaf names of the layer linears the variant's target_modules reach (as peft matches them)."""
    from .settings import PeftSettings, matches_target

    peft = parts.peft
    try:
        targets = PeftSettings(method="lora", target_modules=peft.get("target_modules")).targets(a)
    except ValueError:  # no default targets: reported elsewhere
        return []
    leaves = [sp.path.rsplit(".", 1)[-1] for sp in a.layer_linears + a.model_linears
              if any(matches_target(sp.path, t) for t in targets)]
    return sorted(set(leaves))


def _check_library_failures(c: Collector, parts: Parts, model) -> None:
    """Variants that load but on which peft or torch raise during the real step (found by fuzzing `peftprof
    run` and `estimate --method trace`, measured on CPU with peft 0.21.2, torch 2.13; tests/test_loader_crashes.py
    reproduces each failure)."""
    peft, prec = parts.peft, parts.prec
    method = peft.get("method", "lora")
    weights, autocast = prec.get("weights", "bf16"), prec.get("autocast", "none")
    a = model.arch if model is not None else None
    if a is not None and a.model_type == "gpt2" and method in ("loha", "lokr", "oft"):
        # peft/tuners/lycoris_utils.py _create_new_module, peft/tuners/oft/model.py _create_new_module
        c.add("peft", "method", f"{method} on gpt2 fails in peft 0.21.2: gpt2's attention and MLP layers are "
              f"transformers Conv1D, which peft's {method} does not adapt (measured: TypeError 'Target module "
              "... Conv1D ... not supported')", "lora, ia3, vera, xlora, prompt_tuning, prefix_tuning, full")
    half = ("fp16", "bf16")
    if (a is not None and method in ("loha", "lokr", "vera", "oft", "xlora") and weights in half
            and autocast in half and weights != autocast and a.n_position_embeddings == 0):
        rotated = [n for n in _targeted_leaves(parts, a) if n in ROTATED_PROJECTIONS]
        if rotated:
            # the adapted layer returns the base dtype; transformers' rotate_half concatenates it under autocast,
            # whose cat refuses a half type other than its own (aten/src/ATen/autocast_mode.h prioritize)
            c.add("precision", "autocast", f"{autocast} autocast of {weights} weights with {method} on "
                  f"{', '.join(rotated)}: the adapted layers return {weights} queries/keys, which torch's autocast "
                  f"refuses to concatenate in transformers' rotate_half (measured: RuntimeError 'Unexpected "
                  "floating ScalarType in at::autocast::prioritize')",
                  f"none | {weights}, or target_modules without {', '.join(rotated)}")
    if weights == "fp16" and autocast == "fp16":
        trained = [what for what, bad in (
            ("modules_to_save", bool(peft.get("modules_to_save"))),
            ("combination = \"cat\"", method == "lora" and peft.get("combination", "none") == "cat")) if bad]
        if trained:
            # torch/amp/grad_scaler.py _unscale_grads_; peft copies modules_to_save, and add_weighted_adapter's
            # cat builds the combined adapter, in the base weights' dtype
            c.add("precision", "autocast", f"fp16 autocast with {' and '.join(trained)} on fp16 weights: peft "
                  "makes those trained parameters fp16, and fp16 autocast's GradScaler refuses to unscale their "
                  "gradients (measured: ValueError 'Attempting to unscale FP16 gradients')",
                  "none | bf16, or fp32 | bf16 weights")
    if a is not None and a.model_type == "opt" and method == "xlora":
        mlp = [n for n in _targeted_leaves(parts, a) if n in ("fc1", "fc2")]
        if mlp:
            # OPTDecoderLayer flattens the hidden states to (tokens, hidden) before fc1/fc2, while X-LoRA's
            # gates are (batch, seq, layers, K) (peft/tuners/xlora/layer.py)
            c.add("peft", "target_modules", f"X-LoRA on opt's {', '.join(mlp)} fails in peft 0.21.2: opt runs "
                  "them on flattened (tokens, hidden) states, which X-LoRA's per-token gates (batch, seq) do not "
                  "broadcast to (measured: a shape broadcast RuntimeError)",
                  "q_proj, k_proj, v_proj, out_proj")
