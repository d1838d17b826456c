"""[inference]: keys and the rules between them and the rest of a variant (owned by the inference work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped)."""

from __future__ import annotations

from .schema import Collector, Key
from .settings import ADAPTER_METHODS, BNB_4BIT_KINDS, FLOAT_KINDS
from .vision import is_vision

SCHEMA: dict[str, Key] = {
    "enabled": Key("bool"),
    "merged": Key("bool"),
    "max_new_tokens": Key("int", 0, 1_000_000),
    "max_memory": Key("str", text="accelerate's size string, e.g. \"2GiB\" or \"512MB\" (\"\": no offloading)"),
}
MAX_MEMORY_ALLOWED = "a size accelerate reads (accelerate.utils.convert_file_size_to_int), e.g. \"2GiB\", \"512MB\""
# where peft can fold an adapter into quantized base weights: LoRA's bitsandbytes layers (peft/tuners/lora/bnb.py
# Linear8bitLt.merge, Linear4bit.merge: dequantize, add, requantize); IA3's (tuners/ia3/bnb.py) have no merge and
# no peft layer merges into optimum-quanto's int4 QLinear
MERGEABLE_QUANTIZED = {"lora": ("int8",) + BNB_4BIT_KINDS}
# measured on tiny llama configs (tests/test_offload.py) with accelerate 1.15 dispatch_model, peft 0.21: what fails
# when the method's modules run under accelerate's AlignDevicesHook with their weights on disk (on `meta`)
_META = "peft's forward fails under accelerate's disk offload"
OFFLOAD_FAILURES = {
    "prompt_tuning": f"{_META} (the virtual-token embedding is offloaded: \"Cannot copy out of meta tensor\")",
    "prefix_tuning": f"{_META} (the prefix embedding is offloaded: \"Cannot copy out of meta tensor\")",
    "ia3": f"{_META} (\"Tensor on device meta is not on the expected device cpu\")",
    "dora": f"{_META} (DoRA's weight norm copies the offloaded base weight: \"Cannot copy out of meta tensor\")",
    "vera": f"{_META} (shared vera_A/vera_B: \"Tensor on device cpu is not on the expected device meta\")",
    "loha": "the runner serves it but the trace fails (\"found at least two devices, cpu and meta\") and the "
            "analytic estimate models lora only: nothing would estimate it",
    "lokr": "the runner serves it but the trace fails (\"found at least two devices, cpu and meta\") and the "
            "analytic estimate models lora only: nothing would estimate it",
}


def max_memory_bytes(text: str) -> int | None:
    """accelerate's reading of a size string (its own parser: "2GiB" = 2**31, "512MB" = 512e6, lowercase "b"
    means bits); None when accelerate refuses it or it is not positive."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except (ValueError, TypeError, OverflowError):  # "infKB": int(float("inf")) overflows
        return None
    return size if isinstance(size, int) and size > 0 else None


def check(c: Collector, cond: Collector, parts, model) -> None:
    """Rules of [inference] against the other sections. `parts`: schema.Parts."""
    inf, train, peft, prec = parts.inf, parts.train, parts.peft, parts.prec
    if not inf.get("enabled", False):
        for key in [k for k in inf if k != "enabled"]:
            cond.add("inference", key, "applies only with [inference] enabled = true")
            inf.pop(key)
        return
    # training-only settings: a serving request runs no backward and no optimizer step
    if "optimizer" in train:
        c.add("training", "optimizer", "inference with an optimizer: a serving request runs no optimizer step",
              "leave optimizer unset with [inference] enabled")
    if train.get("gradient_checkpointing", "none") != "none":
        c.add("training", "gradient_checkpointing", "inference with gradient checkpointing: it recomputes "
              "activations for a backward pass that serving never runs", "none")
    if train.get("grad_accum_steps", 1) > 1:
        c.add("training", "grad_accum_steps", "inference with gradient accumulation: serving runs one request "
              "of batch_size prompts", "1")
    # [distributed] keys with [inference]: rules_distributed.py reports them (not applicable) and drops them
    if "dropout" in peft:  # eval mode: nn.Dropout is the identity
        cond.add("peft", "dropout", "does not apply when serving (eval mode: dropout is off)")
        peft.pop("dropout")
    method = peft.get("method", "lora")
    weights = prec.get("weights", "bf16")
    if inf.get("merged", False):
        if method not in ADAPTER_METHODS:
            c.add("inference", "merged", f"merging needs an adapter method (peft merge_and_unload), not {method}",
                  ", ".join(ADAPTER_METHODS))
        elif weights not in FLOAT_KINDS and weights not in MERGEABLE_QUANTIZED.get(method, ()):
            c.add("inference", "merged", f"peft cannot merge {method} into {weights} quantized weights",
                  "merged = false" + (f", or weights {' | '.join(MERGEABLE_QUANTIZED[method])}"
                                      if method in MERGEABLE_QUANTIZED else ", or float weights"))
        if peft.get("num_adapters", 1) > 1:
            c.add("inference", "merged", f"merge_and_unload folds the active adapter into the base and drops the "
                  f"other {peft['num_adapters'] - 1}: a merged model serves one adapter", "merged = false, or "
                  "num_adapters = 1")
    if method == "ia3" and weights in ("int8",) + BNB_4BIT_KINDS and prec.get("compute_dtype", "bf16") != "fp32":
        # peft tuners/ia3/bnb.py forward: x.float() before the base layer, so adapted projections return fp32 beside
        # the others' compute dtype; without k-bit preparation (training upcasts all to fp32) SDPA refuses the mix
        c.add("peft", "method", f"serving IA3 on {weights} weights: peft's IA3 bitsandbytes layers return fp32 "
              f"beside {prec.get('compute_dtype', 'bf16')} projections and SDPA refuses the mixed query/key dtypes",
              "lora, or float weights, or compute_dtype = \"fp32\"")
    text = inf.get("max_memory", "")
    if text:
        if max_memory_bytes(text) is None:
            c.add("inference", "max_memory", f"{text!r} is not a size accelerate reads", MAX_MEMORY_ALLOWED)
        if weights not in FLOAT_KINDS:
            c.add("inference", "max_memory", f"offloading {weights} quantized weights: accelerate cannot write "
                  "bitsandbytes/quanto layers to its disk offload", "float weights, or max_memory = \"\"")
        failure = OFFLOAD_FAILURES.get("dora" if method == "lora" and peft.get("use_dora") else method)
        if failure and not inf.get("merged", False):  # merge_and_unload leaves the bare base, which offloads
            c.add("inference", "max_memory", f"offloading {'lora with use_dora' if method == 'lora' else method}: "
                  f"{failure}", "method lora (use_dora = false), oft or full, or max_memory = \"\"")
    if model is not None and is_vision(model.config["model_type"]):
        c.add("inference", "enabled", f"serving is modelled for causal language models, not the image classifier "
              f"{model.config['model_type']}", "false")
        return
    if model is not None:
        seq = train.get("seq_len", 512)
        total = seq + inf.get("max_new_tokens", 0)
        limit = model.arch.max_positions
        if inf.get("max_new_tokens", 0) and total > limit:
            c.add("inference", "max_new_tokens", f"seq_len {seq} + max_new_tokens {inf['max_new_tokens']} = {total} "
                  f"exceeds the model's max_position_embeddings {limit}", f"<= {max(0, limit - seq)}")
