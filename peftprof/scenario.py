"""Scenario files (TOML): read, validate every problem at once, expand sweeps into variants.

The raw dict from tomllib never leaves this module: callers get frozen `Scenario` objects or a
`UserError` listing every problem as `FILE: [section] key: problem (allowed: ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from . import arch as arch_mod
from . import rules_distributed, rules_inference, rules_peft
from .errors import Problem, UserError, clean, show
from .estimate.alloc_conf import ALLOWED as ALLOC_CONF_ALLOWED
from .estimate.alloc_conf import alloc_conf_problems
from .families import REGISTRY, family, generic
from .model_source import MODEL_SOURCE_KEYS, read_config_file, read_text_file, resolve_model
from .schema import POLICY_EVERY, Collector, Key, Parts, allowed_text, check_value
from .settings import (
    ATTENTIONS,
    AUTOCAST_KINDS,
    BNB_4BIT_KINDS,
    COMPUTE_DTYPES,
    DEVICES,
    FLOAT_KINDS,
    FOUR_BIT_KINDS,
    METHODS,
    OPTIMIZERS,
    WEIGHT_KINDS,
    DistributedSettings,
    InferenceSettings,
    PeftSettings,
    PrecisionSettings,
    RunSettings,
    Scenario,
    TrainingSettings,
    matches_target,
)
from .sweep import closest, collect_problems, expand, sweep_axes
from .trace import MAX_TRACED_LAYER_PASSES
from .vision import rules as vision_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SCENARIO_BYTES = 1 << 20
# The name names the results file <name>.jsonl and the files beside it (.<name>.jsonl.XXXXXXXX.tmp while it is
# written, its lock, its set-aside bad lines <name>.jsonl.bad-<time>-<n>): about 30 bytes more than the name, and
# a file name holds at most 255 bytes. Names keep non-ASCII letters (up to 4 bytes each in UTF-8).
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200
# control characters: C0, DEL, C1, bidirectional overrides and isolates, line and paragraph separators
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
TOP_LEVEL_KEYS = ("name", "description", "model", "precision", "peft", "training", "run", "distributed", "inference",
                  "sweep")
SECTIONS = ("model", "precision", "peft", "training", "run", "distributed", "inference")


SCHEMA: dict[str, dict[str, Key]] = {
    "precision": {
        "weights": Key("choice", choices=WEIGHT_KINDS),
        "double_quant": Key("bool"),
        "compute_dtype": Key("choice", choices=COMPUTE_DTYPES),
        "quant_block_size": Key("choice", choices=(32, 64, 128, 256, 512, 1024, 2048, 4096)),
        "autocast": Key("choice", choices=AUTOCAST_KINDS),
    },
    "peft": rules_peft.SCHEMA,
    "training": {
        "batch_size": Key("int", 1, 1_000_000),
        "seq_len": Key("int", 1, 10_000_000),
        "grad_accum_steps": Key("int", 1, 1_000_000),
        "optimizer": Key("choice", choices=OPTIMIZERS),
        "gradient_checkpointing": Key("policy"),
        "attention": Key("choice", choices=ATTENTIONS),
    },
    "run": {
        "device": Key("choice", choices=DEVICES),
        "steps": Key("int", 1, 100_000),
        "warmup_steps": Key("int", 0, 100_000),
        "seed": Key("int", 0, 2**32 - 1),
        "cuda_alloc_conf": Key("str", text=ALLOC_CONF_ALLOWED),
    },
    "distributed": rules_distributed.SCHEMA,
    "inference": rules_inference.SCHEMA,
}
PEFT_KEYS_BY_METHOD = rules_peft.PEFT_KEYS_BY_METHOD


_fmt = show  # a value as the user wrote it in TOML/JSON (true, "text", 3), cut when long
_closest = closest


def _section(c: Collector, raw: dict, name: str) -> dict:
    """Type- and range-check one plain section; returns its valid keys."""
    section = raw.get(name, {})
    if not isinstance(section, dict):
        c.add(name, None, "must be a table")
        return {}
    schema = SCHEMA[name]
    valid = {}
    for key, value in section.items():
        if key not in schema:
            c.add(name, key, f"unknown key{_closest(key, schema)}", ", ".join(schema))
            continue
        msg = check_value(schema[key], value)
        if msg:
            c.add(name, key, msg, allowed_text(schema[key]))
        else:
            valid[key] = tuple(value) if isinstance(value, list) else value
    return valid


def _variant(c: Collector, cond: Collector, raw: dict, base_dir: Path, name: str, variant_name: str,
             overrides: tuple, model_cache: dict) -> Scenario | None:
    """Validate one variant. Problems in `c`; not-applicable keys (conditional problems) in `cond`."""
    n0 = len(c.problems)
    model_key = json.dumps(raw.get("model"), sort_keys=True, default=str)
    if "model" not in raw:  # reported once, as the missing section
        model_cache[model_key] = (None, [])
    if model_key not in model_cache:
        mc = Collector(c.file)
        model_cache[model_key] = (resolve_model(mc, raw.get("model"), base_dir), mc.problems)
    model, model_problems = model_cache[model_key]
    c.problems.extend(model_problems)
    prec, peft, train, run, dist, inf = (_section(c, raw, s) for s in (
        "precision", "peft", "training", "run", "distributed", "inference"))

    weights = prec.get("weights", PrecisionSettings.weights)
    gap = None if model is None else arch_mod.analytic_gap(model.arch.model_type)
    accum = train.get("grad_accum_steps", 1)
    passes = model.arch.n_layers * accum if gap is not None and isinstance(accum, int) else 0
    # where the analytic estimator cannot answer, the trace must: refuse what it cannot do
    if gap is not None and weights == "int4":  # the trace cannot quantize int4 on meta tensors
        c.add("precision", "weights", f"int4 on {model.arch.model_type} cannot be estimated: {gap}, and the trace "
              "cannot quantize int4 (optimum-quanto) on meta tensors", "fp32, fp16, bf16, int8, fp4, nf4")
    elif passes > MAX_TRACED_LAYER_PASSES:
        c.add("training", "grad_accum_steps", f"{model.arch.n_layers} layers x {accum} micro-batches cannot be "
              f"estimated: {gap}, and the trace runs at most {MAX_TRACED_LAYER_PASSES} decoder-layer passes",
              f"<= {MAX_TRACED_LAYER_PASSES // model.arch.n_layers} micro-batches"
              if model.arch.n_layers <= MAX_TRACED_LAYER_PASSES else "a model the trace can run")
    if "double_quant" in prec and weights not in BNB_4BIT_KINDS:
        cond.add("precision", "double_quant", f"applies only to {' and '.join(BNB_4BIT_KINDS)} weights, not {weights}")
        prec.pop("double_quant")
    if "quant_block_size" in prec and weights not in BNB_4BIT_KINDS:
        cond.add("precision", "quant_block_size", f"applies only to bitsandbytes 4-bit weights "
                 f"({', '.join(BNB_4BIT_KINDS)}), not {weights}")
        prec.pop("quant_block_size")
    if weights in FLOAT_KINDS and prec.get("compute_dtype", weights) != weights:
        # float models compute in their own dtype (no autocast here); the key applies to quantized weights
        cond.add("precision", "compute_dtype", f"{prec['compute_dtype']} cannot compute a {weights} model "
                 f"(float weights compute in their own dtype; compute_dtype applies to quantized weights)")
        prec.pop("compute_dtype")
    prec["compute_dtype"] = prec.get("compute_dtype", weights if weights in FLOAT_KINDS else
                                     PrecisionSettings.compute_dtype)

    method = peft.get("method", PeftSettings.method)
    for key in list(peft):
        if key != "method" and key not in PEFT_KEYS_BY_METHOD[method]:
            users = [m for m, keys in PEFT_KEYS_BY_METHOD.items() if key in keys]
            cond.add("peft", key, f"does not apply to method {method} (applies to: {', '.join(users)})")
            peft.pop(key)
    if isinstance(peft.get("target_modules"), tuple):
        peft["target_modules"] = tuple(peft["target_modules"])
    policy = train.get("gradient_checkpointing", "none")
    if method == "prefix_tuning" and policy != "none":
        c.add("training", "gradient_checkpointing", "peft refuses prefix_tuning with gradient checkpointing", "none")
    if weights in FOUR_BIT_KINDS + ("int8",) and method == "full":
        c.add("peft", "method", f"full fine-tuning cannot train {weights} quantized weights",
              ", ".join(m for m in METHODS if m != "full"))
    _check_autocast(c, prec.get("autocast", "none"), weights, method)

    if "cuda_alloc_conf" in run:
        for msg in alloc_conf_problems(run["cuda_alloc_conf"]):
            c.add("run", "cuda_alloc_conf", msg.removesuffix(f"; allowed: {ALLOC_CONF_ALLOWED}"), ALLOC_CONF_ALLOWED)

    if model is not None:
        a = model.arch
        _check_family(c, family(a.model_type), a, peft, method, train)
        targets = peft.get("target_modules")
        if isinstance(targets, tuple):
            paths = [s.path for s in a.layer_linears + a.model_linears]
            unknown = [t for t in targets if not any(matches_target(p, t) for p in paths)]
            if unknown:
                shown = ", ".join(map(_fmt, unknown[:5])) + (f" and {len(unknown) - 5:,} more"
                                                              if len(unknown) > 5 else "")
                c.add("peft", "target_modules", f"{shown} not in {a.model_type} "
                      f"(its linear layers: {', '.join(a.linear_names)})", "\"all-linear\" or names from that list")
        _check_positions(c, a.max_positions, train.get("seq_len", TrainingSettings.seq_len),
                         peft.get("num_virtual_tokens", PeftSettings.num_virtual_tokens) if method == "prompt_tuning"
                         else None)
        if method == "prompt_tuning" and a.embed_dim != a.hidden_size:
            c.add("peft", "method", f"peft sizes prompt embeddings by hidden_size {a.hidden_size}, but this "
                  f"model's word embeddings are {a.embed_dim} wide (word_embed_proj_dim)",
                  ", ".join(m for m in METHODS if m != "prompt_tuning"))
        every = POLICY_EVERY.fullmatch(policy)
        if every and (len(every[1]) > 9 or int(every[1]) > a.n_layers):
            c.add("training", "gradient_checkpointing", f"{clean(policy)}: the model has only {a.n_layers} layers",
                  f"every_1 .. every_{a.n_layers}")
    parts = Parts(prec=prec, peft=peft, train=train, run=run, dist=dist, inf=inf)
    for rules in (rules_peft, rules_distributed, rules_inference, vision_rules):
        rules.check(c, cond, parts, model)
    if len(c.problems) > n0 or model is None:
        return None
    return Scenario(name=variant_name, scenario=name, description=str(raw.get("description", "")),
                    source=c.file, model=model, precision=PrecisionSettings(**prec), peft=PeftSettings(**peft),
                    training=TrainingSettings(**train), run=RunSettings(**run),
                    distributed=DistributedSettings(**dist), inference=InferenceSettings(**inf), overrides=overrides)


def _check_family(c: Collector, fam, a, peft: dict, method: str, train: dict) -> None:
    """What a model family refuses or lacks: SDPA attention (transformers builds gemma2 eager only: an unset
    attention becomes eager, recorded in the resolved scenario; an explicit sdpa is an error), and peft's
    default target modules (none for phi3 and the MoE families: target_modules must be given)."""
    if not fam.sdpa:
        if "attention" not in train:
            train["attention"] = "eager"
        elif train["attention"] == "sdpa":
            c.add("training", "attention", f"transformers builds {fam.name} with eager attention only (it refuses "
                  "sdpa)", "eager")
    if getattr(fam, "checkpointing", True) is False and train.get("gradient_checkpointing", "none") != "none":
        c.add("training", "gradient_checkpointing", f"transformers' {fam.name} model does not support gradient "
              "checkpointing", "none")
    if method in ("lora", "ia3") and peft.get("target_modules") is None:
        default = fam.ia3_targets if method == "ia3" else fam.lora_targets
        if default is None:
            c.add("peft", "target_modules", f"peft has no default for {fam.name}", ", ".join(a.linear_names))


def _check_autocast(c: Collector, autocast: str, weights: str, method: str) -> None:
    """Combinations the libraries refuse under autocast (measured, torch 2.13): fp16 autocast's loss scaler
    cannot unscale fp16 gradients (torch/amp/grad_scaler.py _unscale_grads_: "Attempting to unscale FP16
    gradients"), which full fine-tuning of fp16 weights makes; peft's virtual tokens are concatenated with
    the model's embeddings or keys/values, and autocast's cat (aten/src/ATen/autocast_mode.h prioritize)
    refuses bf16 beside fp16 ("Unexpected floating ScalarType"). The rules that need the model's targets
    (adapters on rotated projections, fp16 modules_to_save) are in rules_peft.py _check_library_failures."""
    if autocast == "fp16" and weights == "fp16" and method == "full":
        c.add("precision", "autocast", "fp16 autocast scales the loss with torch.amp.GradScaler, which refuses "
              "to unscale the fp16 gradients of fully fine-tuned fp16 weights", "none | bf16")
    half = ("fp16", "bf16")
    if method in ("prompt_tuning", "prefix_tuning") and autocast in half and weights in half and weights != autocast:
        c.add("precision", "autocast", f"{autocast} autocast of {weights} weights with {method}: torch's autocast "
              f"refuses to concatenate peft's virtual tokens in {weights} with {autocast} tensors",
              f"none | {weights}")


def _check_positions(c: Collector, max_positions: int, seq: int, virtual: int | None) -> None:
    """seq_len, plus prompt_tuning's virtual tokens (peft prepends them to the input), must fit the
    model's positions. The allowed range is shown only where it is not empty."""
    if virtual is None:
        if seq > max_positions:
            c.add("training", "seq_len", f"{seq} exceeds the model's max_position_embeddings {max_positions}",
                  f"<= {max_positions}")
        return
    if seq + virtual <= max_positions:
        return
    why = (f"num_virtual_tokens + seq_len must be <= max_position_embeddings {max_positions}: "
           f"{virtual} + {seq} > {max_positions}")
    if seq < max_positions:
        c.add("peft", "num_virtual_tokens", why, f"<= {max_positions - seq} at seq_len {seq}")
    else:
        c.add("training", "seq_len", f"{why}; seq_len alone already {'reaches' if seq == max_positions else 'exceeds'}"
              f" it, so no num_virtual_tokens fits",
              f"<= {max_positions - 1} with prompt_tuning" if max_positions > 1 else None)


def _model_keys(section: str, model=None, base_dir: Path | None = None) -> tuple:
    """The keys a [sweep] may vary in `section`; for [model] of a generic model_type (given inline or by its
    config file `model`), its transformers config class's fields."""
    if section != "model":
        return tuple(SCHEMA[section])
    model_type = model.get("model_type") if isinstance(model, dict) else None
    if model_type is None and isinstance(model, dict) and isinstance(model.get("config"), str) and base_dir:
        model_type = (read_config_file(Collector(""), model["config"], base_dir) or {}).get("model_type")
    if isinstance(model_type, str) and model_type not in REGISTRY and generic.type_reason(model_type) is None:
        return MODEL_SOURCE_KEYS + tuple(k for k in generic.accepted_keys(model_type) if k not in MODEL_SOURCE_KEYS)
    return MODEL_SOURCE_KEYS + tuple(arch_mod.ALL_MODEL_KEYS)


def _check_text(c: Collector, key: str, value: str, stem: bool = False) -> None:
    """`name` and `description` are printed in tables, reports and file names: no control characters
    (a description may span lines); the name also names the results file, so its length is bounded."""
    where = "not set, and the file name used instead " if stem else ""
    allowed_ws = "\n\t" if key == "description" else ""
    bad = next((m for m in CONTROL_CHARS.finditer(value) if m[0] not in allowed_ws), None)
    if bad:
        c.add(None, key, f"{where}contains the control character U+{ord(bad[0]):04X} at character {bad.start() + 1:,}",
              "printable characters" + (", line breaks and tabs" if key == "description" else ""))
    if key != "name":
        return
    if len(value) > MAX_NAME_CHARS:
        c.add(None, key, f"{where}is {len(value):,} characters long; it names the results file <name>.jsonl",
              f"at most {MAX_NAME_CHARS} characters")
    elif len(value.encode()) > MAX_NAME_BYTES:
        c.add(None, key, f"{where}is {len(value.encode()):,} bytes in UTF-8; it names the results file "
              f"<name>.jsonl", f"at most {MAX_NAME_BYTES} bytes")


def load_scenario(path: str | os.PathLike) -> list[Scenario]:
    """Read one scenario file into its variants; raises UserError with every problem found."""
    path = Path(path)
    c = Collector(str(path))
    try:
        text = read_text_file(path, MAX_SCENARIO_BYTES)
        raw = tomllib.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        msg = str(e) if not isinstance(e, tomllib.TOMLDecodeError) else f"not valid TOML: {e}"
        raise UserError([Problem(file=str(path), message=msg)]) from None
    except RecursionError:
        raise UserError([Problem(file=str(path), message="not valid TOML: nested too deeply")]) from None
    if not raw:
        raise UserError([Problem(file=str(path), message="empty scenario: needs at least a [model] section")])
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            c.add(None, key, f"unknown section or key{_closest(key, TOP_LEVEL_KEYS)}", ", ".join(TOP_LEVEL_KEYS))
    if "model" not in raw:
        c.add("model", None, "missing section: every scenario names a model", "preset, config or inline keys")
    for key in ("name", "description"):
        if key in raw and (not isinstance(raw[key], str) or (key == "name" and not raw[key].strip())):
            c.add(None, key, f"must be a non-empty string, got {_fmt(raw[key])}")
        elif key in raw:
            _check_text(c, key, raw[key])
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        name = path.stem
        if "name" not in raw:
            _check_text(c, "name", name, stem=True)
    # a bad [sweep] does not hide the rest: the valid axes are still expanded and every variant checked
    axes, sweep_ok = sweep_axes(c.add, raw.get("sweep"), SECTIONS,
                                lambda section: _model_keys(section, raw.get("model"), path.parent))

    base = {s: dict(raw[s]) if isinstance(raw.get(s), dict) else raw.get(s) for s in SECTIONS if s in raw}
    base["description"] = raw.get("description", "")
    model_cache: dict = {}
    results: list[tuple[Scenario | None, list[Problem], list[Problem]]] = []
    names: list[str] = []
    for vname, variant_raw, combo in expand(name, base, axes):
        vc, cond = Collector(str(path)), Collector(str(path))
        scenario = _variant(vc, cond, variant_raw, path.parent, name, vname, combo, model_cache)
        results.append((scenario, vc.problems, cond.problems))
        names.append(vname)
    collect_problems(c.add, results, names, conditional=sweep_ok)
    if c.problems:
        raise UserError(c.problems)
    out = []
    for scenario, _, cond in results:
        na = tuple(f"{p.section}.{p.key}" for p in cond)
        out.append(scenario if not na else dataclasses.replace(scenario, not_applicable=na))
    return out


def load_scenarios(paths) -> list[Scenario]:
    """Load several files; problems of all files are reported together. Results are keyed by variant name
    (the summary, the results file, the gate), so two files may not give a variant the same name."""
    out, problems = [], []
    variants: dict[str, str] = {}  # variant name -> the file that gave it
    given: set[Path] = set()
    for p in paths:
        try:
            same = Path(p).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop: load_scenario says what is wrong
            same = Path(p)
        if same in given:
            problems.append(Problem(file=str(p), message="the same file is given twice"))
            continue
        given.add(same)
        try:
            loaded = load_scenario(p)
        except UserError as e:
            problems.extend(e.problems)
            continue
        taken = next((v.name for v in loaded if v.name in variants), None)
        if taken is not None:
            problems.append(Problem(file=str(p), key="name", message=f"variant {show(taken)} is also a variant of "
                                    f"{variants[taken]}", allowed="a name of its own"))
            continue
        variants.update((v.name, str(p)) for v in loaded)
        out.extend(loaded)
    if problems:
        raise UserError(problems)
    return out
