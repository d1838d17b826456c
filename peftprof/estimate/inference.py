"""Analytic estimate of serving (`[inference] enabled`): the forward-only peak of one request, bytes throughout.

No gradients, no optimizer state, nothing saved for backward (torch.no_grad): the peak is the resident state
(weights, quantization constants, resident adapters) plus the KV cache plus the transient working set of the
largest moment of the request. Categories of the breakdown as in training, read for serving: `trainable` the
resident adapters (fp32: peft autocast_adapter_dtype), `activations` the KV cache, `logits` the vocabulary-wide
tensors, `temporaries` the rest of the working set. Sources: transformers models/llama/modeling_llama.py
(LlamaModel.forward, LlamaDecoderLayer, LlamaMLP), cache_utils.py (DynamicLayer, DynamicSlidingWindowLayer),
generation/utils.py (_sample, logits_to_keep=1); peft tuners/lora/layer.py Linear.forward; accelerate
utils/modeling.py infer_auto_device_map. Measured by `peftprof run` (tests/test_inference.py).
"""

from __future__ import annotations

from ..arch import Arch
from ..settings import BYTES_PER_ELEMENT, Scenario
from . import memory as mem
from .widths import ADAPTER_BYTES_PER_ELEMENT, compute_bytes_per_element

ANALYTIC_FAMILIES = ("llama", "mistral", "qwen2")  # rotary, RMSNorm, gated MLP, DynamicCache: modelled below
INT64 = 8
# rotary families: inv_freq and original_inv_freq buffers, head_dim / 2 fp32 values each (modeling_rope_utils.py)
ROTARY_BUFFERS = 1


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic serving estimate cannot answer (None: it can); the trace answers instead."""
    a, p, m = s.model.arch, s.precision, s.peft
    if a.model_type not in ANALYTIC_FAMILIES:
        return f"the analytic serving estimate models {', '.join(ANALYTIC_FAMILIES)}, not {a.model_type}"
    if p.is_quantized:
        return "the analytic serving estimate models float weights (quantized layers dequantize per call)"
    if m.method not in ("full", "lora") or m.use_dora or m.target_parameters or m.modules_to_save:
        return f"the analytic serving estimate models plain LoRA and the bare base, not {m.method}" + (
            " with use_dora, target_parameters or modules_to_save" if m.method == "lora" else "")
    if p.autocast != "none":
        return "the analytic serving estimate does not model autocast"
    return None


def hidden_bytes_per_element(s: Scenario) -> int:
    """The served model's hidden stream and K/V dtype: float weights compute in their own dtype; quantized layers
    compute in compute_dtype and a served (not k-bit-prepared) model keeps its other parameters in it."""
    p = s.precision
    return BYTES_PER_ELEMENT[p.weights] if not p.is_quantized else compute_bytes_per_element(s)


def kv_cache_bytes_per_token_per_layer(a: Arch, bytes_per_element: int) -> int:
    """One key and one value vector per KV head: 2 * n_kv_heads * head_dim * bytes (MHA: n_kv = n_heads; GQA:
    fewer; MQA: 1). transformers cache_utils.py DynamicLayer stores [batch, n_kv_heads, tokens, head_dim]."""
    return 2 * a.n_kv_heads * a.head_dim * bytes_per_element


def kv_cache_tokens(a: Arch, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(tokens held by a full-attention layer, by a sliding-window layer) when the last token is chosen:
    the prompt plus max_new_tokens - 1 decoded tokens (the last one is never fed back). A sliding layer
    (cache_utils.py DynamicSlidingWindowLayer.update) keeps a view of the last window - 1 tokens of the
    concatenated storage: after the prefill that storage is the whole prompt, after a decode step
    min(tokens, window)."""
    full = prompt_len + max(0, max_new_tokens - 1)
    if not a.sliding_window or max_new_tokens <= 1:
        return full, full
    return full, min(full, a.sliding_window)


def kv_cache_bytes(s: Scenario, tokens_full: int, tokens_sliding: int | None = None) -> int:
    """KV cache of the whole model for the batch: full layers hold `tokens_full`, sliding ones `tokens_sliding`."""
    a = s.model.arch
    per = kv_cache_bytes_per_token_per_layer(a, hidden_bytes_per_element(s)) * s.training.batch_size
    sliding = a.n_sliding_layers if tokens_sliding is not None else 0
    return per * (tokens_full * (a.n_layers - sliding) + (tokens_sliding or 0) * sliding)


def weight_bytes(s: Scenario) -> int:
    """The served base: float weights in their dtype; quantized linears as memory.py counts them (packed 4-bit,
    int8) with every other parameter in the compute dtype (no k-bit preparation when serving)."""
    a, p = s.model.arch, s.precision
    rotary = ROTARY_BUFFERS * a.head_dim * 4 if a.n_position_embeddings == 0 else 0
    if not p.is_quantized:
        return a.n_params * BYTES_PER_ELEMENT[p.weights] + rotary
    linear = sum(spec.n_weight_params for spec in mem.quantized_linears(a))
    packed = sum((spec.n_weight_params + 1) // 2 for spec in mem.quantized_linears(a)) if p.is_4bit else linear
    return packed + (a.n_params - linear) * compute_bytes_per_element(s) + rotary


def one_adapter_bytes(s: Scenario) -> int:
    """One adapter's parameters (memory.trainable_tensors, peft's shapes) in fp32 (peft autocast_adapter_dtype)."""
    if s.peft.method == "full":
        return 0
    single = s if s.peft.num_adapters == 1 else _with_one_adapter(s)
    return sum(mem.trainable_tensors(single)) * ADAPTER_BYTES_PER_ELEMENT


def _with_one_adapter(s: Scenario) -> Scenario:
    import dataclasses

    return dataclasses.replace(s, peft=dataclasses.replace(s.peft, num_adapters=1))


def resident_adapter_bytes(s: Scenario) -> int:
    """num_adapters adapters on one base when unmerged; none once merged (merge_and_unload folds the active one
    into the base weights and removes the adapter layers)."""
    if s.inference.merged:
        return 0
    return s.peft.num_adapters * one_adapter_bytes(s)


def _lora_extra(s: Scenario, name: str, in_features: int, out_features: int, tokens: int) -> int:
    """Bytes a LoRA adapter adds beside a targeted linear's base output (0 if not targeted or merged). peft
    LoRA Linear.forward (eval, unmerged): x is cast to the fp32 adapter dtype (a copy unless the base is fp32),
    then result + lora_B(lora_A(x)) * scaling holds B's output and its scaled copy (fp32) beside the base result."""
    m = s.peft
    if m.method != "lora" or s.inference.merged:
        return 0
    if not any(spec.name == name for spec in m.targeted_linears(s.model.arch)):
        return 0
    cast = tokens * in_features * ADAPTER_BYTES_PER_ELEMENT if hidden_bytes_per_element(s) != ADAPTER_BYTES_PER_ELEMENT \
        else 0
    return cast + 2 * tokens * out_features * ADAPTER_BYTES_PER_ELEMENT


def prompt_moments(s: Scenario, tokens: int, loads: dict[str, int] | None = None) -> list[tuple[int, int, int]]:
    """(decoder layers whose KV cache is already written, temporaries, loaded weights) at the largest moments of the
    last decoder layer's forward over `tokens` = batch x sequence positions. LlamaModel.forward holds the input
    embeddings and the layer's input; the layer holds its normed input (attention) or its post-attention residual and normed
    input (MLP). Attention (LlamaAttention.forward, apply_rotary_pos_emb): q, k, v projected, then q * cos +
    rotate_half(q) * sin (three q-sized tensors beside the projection), then the same for k while q's result is
    held; the layer's own cache is written after. LlamaMLP: down(act(gate(x)) * up(x)): act, up and their product.
    Rotary cos and sin: batch x seq x head_dim each. `loads` (offloading, estimate/offload.py): bytes of each
    base linear (path in the layer) that accelerate loads while that linear runs, beside its input and output."""
    a = s.model.arch
    load = (loads or {}).get
    e = hidden_bytes_per_element(s)
    h, inter, n = a.hidden_size, a.intermediate_size, a.n_layers
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    held = (2 if n > 1 else 1) * tokens * h * e + 2 * tokens * a.head_dim * e  # embeddings, layer input, cos/sin
    # candidates as (temporaries, loaded): the larger sum wins
    attn = (tokens * e * max(4 * q + 2 * kv, 2 * q + 5 * kv), 0)
    for name, width_in, width_out, before in (("q_proj", h, q, 0), ("k_proj", h, kv, q), ("v_proj", h, kv, q + kv)):
        out = tokens * e * (before + width_out)
        attn = max(attn, (out + _lora_extra(s, name, width_in, width_out, tokens), 0),
                   (out, load(f"self_attn.{name}", 0)), key=sum)
    o_out = tokens * e * (q + h)
    attn = max(attn, (o_out + _lora_extra(s, "o_proj", q, h, tokens), 0), (o_out, load("self_attn.o_proj", 0)),
               key=sum)
    mlp = (3 * tokens * inter * e, 0)
    for name, width_in, width_out, out in (("gate_proj", h, inter, tokens * inter * e),
                                           ("up_proj", h, inter, 2 * tokens * inter * e),
                                           ("down_proj", inter, h, tokens * e * (inter + h))):
        mlp = max(mlp, (out + _lora_extra(s, name, width_in, width_out, tokens), 0), (out, load(f"mlp.{name}", 0)),
                  key=sum)
    # + the normed input (attention); the post-attention residual and the normed input (MLP)
    return [(n - 1, held + attn[0] + tokens * h * e, attn[1]), (n, held + mlp[0] + 2 * tokens * h * e, mlp[1])]


def memory_breakdown(s: Scenario, *, device: str) -> tuple[dict[str, int], str]:
    """(breakdown, phase) of the request's peak: the larger of the prompt's forward (the whole prompt's KV cache
    written, the largest layer's temporaries) and, when generating, the last decode step (the cache at prompt +
    max_new_tokens - 1 tokens, plus one layer's old keys and values while torch.cat makes the new ones).
    Offloading (max_memory): only the modules accelerate keeps on the device are resident, and the moments
    while an offloaded module runs add the one copy of its weights that accelerate loads (estimate/offload.py)."""
    from .cuda import CUDA_CUBLAS_WORKSPACE_BYTES

    a, b, t = s.model.arch, s.training.batch_size, s.training.seq_len
    n = s.inference.max_new_tokens
    e = hidden_bytes_per_element(s)
    persistent = {"weights": weight_bytes(s), "quant_constants": mem.quant_constant_bytes(s),
                  "trainable": resident_adapter_bytes(s), "gradients": 0, "optimizer": 0,
                  "overhead": CUDA_CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0}
    plan = offload_plan(s, device)
    loads: dict[str, int] | None = None
    model_loads: list[tuple[str, int]] = []  # (module, bytes) of offloaded model-level modules
    if plan is not None:
        persistent.update(weights=plan.resident_weight_bytes, trainable=plan.resident_adapter_bytes)
        loads = plan.layer_linear_loads if plan.layers_offloaded else None
        embed = a.vocab_size * a.hidden_size * e
        model_loads = [m for m, off in (("embed", plan.embed_offloaded), ("lm_head", plan.lm_head_offloaded)) if off]
        model_loads = [(m, embed) for m in model_loads]
    moments = prompt_moments(s, b * t, loads)
    hidden = b * t * a.hidden_size * e
    if n == 0:  # one forward without a cache: logits of every position, in the hidden dtype
        logits = b * t * a.vocab_size * e
        cands = [{"logits": logits, "temporaries": hidden}]  # the final norm's output
        cands += [{"temporaries": w, "weights": loaded} for _, w, loaded in moments]
        for module, size in model_loads:  # the embedding's output, or the final norm's and the logits
            cands.append({"weights": size, "temporaries": hidden, "logits": logits if module == "lm_head" else 0})
        return _with(persistent, max(cands, key=lambda d: sum(d.values()))), "forward"
    ids = 2 * b * t * INT64  # generate's attention mask and cache positions
    layer_kv = kv_cache_bytes_per_token_per_layer(a, e) * b * t  # after the prefill every layer holds the prompt
    cands = [{"activations": done * layer_kv, "temporaries": w + ids, "weights": loaded} for done, w, loaded in moments]
    full, sliding = kv_cache_tokens(a, t, n)
    per_layer = kv_cache_bytes_per_token_per_layer(a, e) * b
    # one layer's previous keys during torch.cat: DynamicLayer.update assigns the new keys before concatenating the
    # values (half a layer); a sliding layer concatenates both before assigning (a whole layer)
    old = per_layer * (sliding - 1) if a.n_sliding_layers else per_layer // 2 * (full - 1)
    logits = b * a.vocab_size * (e + 4)  # the last position's logits and generate's fp32 copy of them
    cache = kv_cache_bytes(s, full, sliding)
    step_ids = 2 * b * (t + n) * INT64
    cands.append({"activations": cache, "temporaries": max(old, logits) + step_ids})
    for module, size in model_loads:
        if module == "lm_head":  # prefill: the whole prompt's cache, the final norm's output, the last position's logits
            cands.append({"activations": a.n_layers * layer_kv, "weights": size, "temporaries": hidden + ids,
                          "logits": b * a.vocab_size * e})
        else:
            cands.append({"weights": size, "temporaries": hidden + ids})
    # the last decode step: the (nearly) whole cache while the largest offloaded module's weights are loaded
    step_loads = [size for _, size in model_loads] + list((loads or {}).values())
    if step_loads:
        cands.append({"activations": cache, "weights": max(step_loads), "temporaries": step_ids,
                      "logits": logits if plan.lm_head_offloaded else 0})  # beside the last step's fp32 copy
    return _with(persistent, max(cands, key=lambda d: sum(d.values()))), "forward"


def _with(persistent: dict[str, int], varying: dict[str, int]) -> dict[str, int]:
    """The breakdown: persistent state plus a moment's bytes, category by category (results.CATEGORIES)."""
    from ..results import CATEGORIES

    return {c: persistent.get(c, 0) + varying.get(c, 0) for c in CATEGORIES}


def offload_plan(s: Scenario, device: str):
    """estimate/offload.py's plan for `[inference] max_memory` (None without offloading): accelerate's
    placement under the cap on this device."""
    if not s.inference.max_memory:
        return None
    from ..rules_inference import max_memory_bytes
    from .offload import offload_plan as plan

    return plan(s, max_memory_bytes(s.inference.max_memory), device)


def estimate_inference(s: Scenario, *, device: str, gpu=None) -> dict:
    """The analytic serving estimate as the estimate JSON (README): peak, breakdown, KV cache and placement."""
    from ..results import CATEGORIES
    from . import AnalyticUnsupported

    gap = analytic_gap(s)
    if gap:
        raise AnalyticUnsupported(f"{s.name}: {gap}; --method trace answers")
    breakdown, phase = memory_breakdown(s, device=device)
    breakdown = {c: int(breakdown.get(c, 0)) for c in CATEGORIES}
    peak = sum(breakdown.values())
    a, n = s.model.arch, s.inference.max_new_tokens
    out = {"method": "analytic", "device": device, "mode": "inference", "peak_bytes": peak, "peak_phase": phase,
           "breakdown": breakdown, "paged_optimizer_bytes": 0, "n_params": a.n_params,
           "n_trainable_params": 0, "flops_per_step": forward_flops(s),
           "tokens_per_step": s.training.batch_size * (n or s.training.seq_len)}
    out.update(inference_fields(s))  # run/infer.py serving_fields: the same for a traced estimate
    plan = offload_plan(s, device)
    if plan is not None:
        out.update(offload_fields(s, plan.device_map, device_bytes=plan.resident_weight_bytes
                                  + plan.resident_adapter_bytes, disk_bytes=plan.disk_bytes,
                                  read_bytes_per_forward=plan.read_bytes_per_forward, device=device))
    if device == "cuda":
        from .cuda import cuda_reserved_and_device_bytes

        out.update(cuda_reserved_and_device_bytes(peak))
    if gpu is not None:
        need = out.get("device_bytes", peak)
        out.update(gpu=gpu.name, fits=need <= gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - need)
    return out


def inference_fields(s: Scenario) -> dict:
    """Serving facts shared by the analytic and the trace estimate: KV cache sizes and the offload placement."""
    a, n = s.model.arch, s.inference.max_new_tokens
    e = hidden_bytes_per_element(s)
    out = {"kv_cache_bytes_per_token_per_layer": kv_cache_bytes_per_token_per_layer(a, e),
           "resident_adapter_bytes": resident_adapter_bytes(s)}
    if n and s.peft.method == "prompt_tuning" and not a.n_sliding_layers:
        # peft 0.21 PeftModelForCausalLM.prepare_inputs_for_generation looks for model_kwargs["past_key_values"],
        # which transformers 5 passes as "cache": every decode step is taken for the first and the virtual tokens
        # are prepended again, so the cache grows by 1 + num_virtual_tokens per step (measured, to the byte)
        v = s.peft.num_virtual_tokens
        tokens = s.training.seq_len + v + (n - 1) * (1 + v)
        out["kv_cache_bytes"] = kv_cache_bytes(s, tokens)
    elif n and s.peft.method not in ("prompt_tuning", "prefix_tuning"):  # prefix tuning (and sliding): not modelled
        full, sliding = kv_cache_tokens(a, s.training.seq_len, n)
        out["kv_cache_bytes"] = kv_cache_bytes(s, full, sliding)
    return out


def offload_fields(s: Scenario, device_map: dict, *, device_bytes: int, disk_bytes: int,
                   read_bytes_per_forward: int, device: str = "cpu") -> dict:
    """What offloading adds to a serving estimate (the analytic one from estimate/offload.py, the trace from
    accelerate's own map): `device_map`, `placement_bytes` (parameters and buffers on the device, parameters
    written to disk), `disk_bytes` (beside the device peak, as `host_bytes` is for CPU offload of training) and
    the latency term: the offloaded weights are read back from disk on every forward (accelerate
    AlignDevicesHook.pre_forward), one forward per generated token (max_new_tokens 0: one forward)."""
    forwards = max(1, s.inference.max_new_tokens)
    return {"device_map": dict(device_map), "placement_bytes": {device: device_bytes, "disk": disk_bytes},
            "disk_bytes": disk_bytes, "disk_read_bytes_per_forward": read_bytes_per_forward,
            "disk_read_bytes_per_token": read_bytes_per_forward if s.inference.max_new_tokens else 0,
            "disk_read_bytes_per_request": read_bytes_per_forward * forwards}


def forward_flops(s: Scenario) -> int:
    """2 FLOPs per parameter per token through the linears and lm_head (Kaplan et al. 2020, forward only)."""
    a = s.model.arch
    tokens = s.training.batch_size * (s.training.seq_len + s.inference.max_new_tokens)
    return 2 * a.n_active_params * tokens
